"""Per-row sampling and stopping, for `model.generate` and the continuous decoding loop.

`generate` applies one sampling configuration to a whole batch; rows of a dynamic batch
each bring their own. `RowSampler` (a logits processor) therefore makes each row's choice
itself, with the row's own temperature, top-k, top-p, repetition penalty and seeded
generator, and leaves only the chosen token finite, so generate's greedy argmax takes it
(the continuous loop in `decoding.py` calls it the same way, then takes the argmax).
`RowStopper` (a stopping criterion, called once per step with the ids so far) feeds each
row its new token and reports per row whether it is finished, so a row that hits EOS, a
stop string, its own token limit or a client disconnect stops without ending the batch.

Rows share a batch but nothing else: whatever one row's settings or prompt do to its own
logits (NaN, infinities, nothing left after top-k, top-p or the penalty), the sampler
treats NaN as an impossible token and +inf as a certain one, and a row that still has no
token to choose fails alone, with its own error; the others' scores are never touched.
Nothing raises out of `RowSampler`, since an exception there ends the whole batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from gateway.errors import GatewayError
from gateway.worker.rows import Row, SamplingParams

log = logging.getLogger(__name__)
_NEG_INF = -float("inf")


class RowSampler(LogitsProcessor):  # type: ignore[misc]
    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        # One reduction for the batch: a row whose best logit is finite has no NaN and no
        # +inf, so plain greedy rows keep generate's own argmax.
        healthy = torch.isfinite(scores.amax(dim=-1)).tolist()
        for index, row in enumerate(self.rows):
            params = row.params
            if row.done:
                continue
            if healthy[index] and params.greedy and params.repetition_penalty == 1.0:
                continue  # plain greedy: generate's own argmax is exactly right
            choice = _choose_or_fail(scores[index], row)
            scores[index].fill_(_NEG_INF)
            scores[index, choice] = 0.0
        return scores


class RowStopper(StoppingCriteria):  # type: ignore[misc]
    def __init__(self, rows: Sequence[Row], on_step: Callable[[], None]) -> None:
        self.rows = rows
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.on_step()
        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest, strict=True):
            row.push(int(token))
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


class NoTokenLeft(GatewayError):
    """A row's logits left no token to choose: a model or settings problem, not the client's."""

    default_code = "sampling_failed"


def _choose_or_fail(logits: torch.Tensor, row: Row) -> int:
    """The row's next token; on any failure the row alone fails (token 0 is a placeholder
    for a row that is done and will be dropped or padded)."""
    try:
        return _choose(logits, row)
    except GatewayError as exc:
        row.fail(exc)
    except Exception as exc:  # a sampler error is this row's, never the batch's
        log.exception("sampling failed for one row")
        message = f"sampling failed for this request: {type(exc).__name__}: {exc}"
        row.fail(NoTokenLeft(message[:500]))
    return 0


def _choose(logits: torch.Tensor, row: Row) -> int:
    params = row.params
    logits = _usable(logits, params, "the model gave no finite logit for any token")
    if params.repetition_penalty != 1.0:
        penalized = _penalize(logits, row, params.repetition_penalty)
        logits = _usable(penalized, params, "the repetition penalty left no finite logit")
    return int(torch.argmax(logits)) if params.greedy else _sample(logits, row)


def _usable(logits: torch.Tensor, params: SamplingParams, empty: str) -> torch.Tensor:
    """Logits with NaN read as "impossible" and +inf as "certain"; raises if none remain."""
    logits = logits.float().masked_fill(torch.isnan(logits), _NEG_INF)
    top = float(logits.max())
    if top == math.inf:  # the limit of a huge logit: only the infinite ones are candidates
        return torch.where(logits == math.inf, 0.0, _NEG_INF)
    if top == _NEG_INF:
        raise _no_token(params, empty)
    return logits


def _penalize(logits: torch.Tensor, row: Row, penalty: float) -> torch.Tensor:
    seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), device=logits.device)
    logits = logits.clone()
    values = logits[seen]
    logits[seen] = torch.where(values < 0, values * penalty, values / penalty)
    return logits


def _sample(logits: torch.Tensor, row: Row) -> int:
    params = row.params
    # Shift so the best logit is 0 before dividing: a tiny temperature then gives -inf to
    # the others (a greedy choice) instead of inf/nan.
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        threshold = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < threshold, _NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p
        drop[0] = False  # the most likely token always stays
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    # multinomial raises on NaN or an all-zero row (and asserts on a GPU, which would end
    # every request on the device): check first.
    if not 0.0 < float(probs.sum()) < math.inf:
        raise _no_token(params, "sampling left no token with a finite, positive probability")
    return int(torch.multinomial(probs, 1, generator=_generator(row, logits.device)))


def _generator(row: Row, device: torch.device) -> torch.Generator:
    if row.generator is None:
        row.generator = torch.Generator(device=device)
        if row.params.seed is None:
            row.generator.seed()
        else:
            row.generator.manual_seed(row.params.seed)
    generator: torch.Generator = row.generator
    return generator


def _no_token(params: SamplingParams, what: str) -> NoTokenLeft:
    return NoTokenLeft(
        f"cannot choose a token for this request: {what} (temperature={params.temperature}, "
        f"top_k={params.top_k}, top_p={params.top_p}, "
        f"repetition_penalty={params.repetition_penalty})"
    )
