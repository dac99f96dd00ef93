"""Per-row sampling and stopping, for `model.generate` and the continuous decoding loop.

`generate` applies one sampling configuration to a whole batch; rows of a dynamic batch
each bring their own. `RowSampler` (a logits processor) therefore makes each row's choice
itself, with the row's own temperature, top-k, top-p, repetition penalty and seeded
generator, and leaves only the chosen token finite, so generate's greedy argmax takes it
(the continuous loop in `decoding.py` calls it the same way, then takes the argmax).
`RowStopper` (a stopping criterion, called once per step with the ids so far) feeds each
row its new token and reports per row whether it is finished, so a row that hits EOS, a
stop string, its own token limit or a client disconnect stops without ending the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from gateway.worker.rows import Row


class RowSampler(LogitsProcessor):  # type: ignore[misc]
    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        for index, row in enumerate(self.rows):
            params = row.params
            if row.done or (params.greedy and params.repetition_penalty == 1.0):
                continue  # plain greedy: generate's own argmax is exactly right
            logits = scores[index]
            if params.repetition_penalty != 1.0:
                logits = _penalize(logits, row, params.repetition_penalty)
            choice = int(torch.argmax(logits)) if params.greedy else _sample(logits, row)
            scores[index].fill_(-float("inf"))
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
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # always keeps the most likely token
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if row.generator is None:
        row.generator = torch.Generator(device=logits.device)
        if params.seed is None:
            row.generator.seed()
        else:
            row.generator.manual_seed(params.seed)
    return int(torch.multinomial(probs, 1, generator=row.generator))
