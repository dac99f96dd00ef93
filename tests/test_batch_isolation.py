"""One row's sampling settings or prompt never change another row of its batch.

First the sampler alone, on hand-made logits (NaN, infinities, nothing left to choose);
then the engine on the tiny model, both batching modes: a row with extreme settings, or a
prompt that makes the model's logits NaN, beside normal greedy rows whose text must be
exactly what they get alone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base import LoadSpec
from adapters.chat_template import ChatTemplateAdapter
from gateway.api.protocol import SamplingFields
from gateway.errors import GatewayError
from gateway.worker.engine import Engine
from gateway.worker.rows import Delta, Event, Failed, Finished, Row, SamplingParams
from gateway.worker.sampling import RowSampler

NAN, INF = math.nan, math.inf

# -- the sampler alone ----------------------------------------------------------------------

VOCAB = 12


def sampler_row(**params: Any) -> tuple[Row, list[Event]]:
    events: list[Event] = []
    sampling = SamplingParams(**{"max_new_tokens": 4, **params})
    return Row([1, 2, 3], sampling, frozenset(), lambda ids: "", events.append), events


def normal_logits() -> torch.Tensor:
    return torch.linspace(-3.0, 2.0, VOCAB)[
        torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    ]


def choose(rows: list[Row], scores: torch.Tensor) -> torch.Tensor:
    return RowSampler(rows)(torch.zeros(len(rows), 1, dtype=torch.long), scores.clone())


def one_hot_choice(row_scores: torch.Tensor) -> int:
    finite = torch.isfinite(row_scores).nonzero().flatten().tolist()
    assert len(finite) == 1, row_scores  # exactly one token left for generate's argmax
    return int(finite[0])


POISONED_LOGITS = {
    "all NaN": torch.full((VOCAB,), NAN),
    "all -inf": torch.full((VOCAB,), -INF),
    "NaN and -inf": torch.tensor([NAN, -INF] * (VOCAB // 2)),
}


@pytest.mark.parametrize("logits", POISONED_LOGITS.values(), ids=list(POISONED_LOGITS))
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_a_row_with_no_usable_logit_fails_alone_and_the_others_scores_are_untouched(
    logits: torch.Tensor, temperature: float
) -> None:
    greedy, _ = sampler_row()
    sampled, _ = sampler_row(temperature=0.9, top_k=5, seed=7)
    bad, bad_events = sampler_row(temperature=temperature)
    scores = torch.stack([normal_logits(), logits, normal_logits()])
    expected = choose([greedy, sampler_row(temperature=0.9, top_k=5, seed=7)[0]], scores[[0, 2]])
    out = choose([greedy, bad, sampled], scores)
    assert torch.equal(out[0], expected[0])  # the plain greedy row: its logits as they were
    assert one_hot_choice(out[2]) == one_hot_choice(expected[1])  # the same draw as without
    assert bad.done and isinstance(bad_events[-1], Failed)
    error = bad_events[-1].error
    assert error.status == 500 and error.code == "sampling_failed"
    assert "no finite logit" in error.message
    one_hot_choice(out[1])  # a placeholder token, so generate's argmax is well defined


def test_a_greedy_row_with_some_nan_logits_takes_the_best_real_one() -> None:
    row, events = sampler_row()
    logits = normal_logits()
    best = int(logits.argmax())
    logits[(best + 1) % VOCAB] = NAN  # argmax would take the NaN
    assert one_hot_choice(choose([row], logits[None])[0]) == best
    assert not events and not row.done


@pytest.mark.parametrize("temperature", [0.0, 0.8, 2.0])
def test_an_infinite_logit_is_chosen_and_never_turns_into_nan(temperature: float) -> None:
    row, events = sampler_row(temperature=temperature, seed=1)
    logits = normal_logits()
    logits[5] = INF
    assert one_hot_choice(choose([row], logits[None])[0]) == 5
    assert not events


@pytest.mark.parametrize("penalty", [1e-38, 1e38, 0.0, NAN, INF])
def test_a_penalty_that_overflows_a_logit_still_chooses_a_token(penalty: float) -> None:
    for temperature in (0.0, 1.0):
        row, events = sampler_row(temperature=temperature, repetition_penalty=penalty, seed=3)
        logits = torch.linspace(-1.0, 1.0, VOCAB)  # tokens 1, 2, 3 (the prompt) are negative
        out = choose([row], torch.stack([logits]))
        choice = one_hot_choice(out[0])
        assert 0 <= choice < VOCAB
        assert not any(isinstance(e, Failed) for e in events), events


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": NAN},
        {"temperature": INF},
        {"temperature": 1.0, "top_p": -1.0},
        {"temperature": 1.0, "top_p": NAN},
        {"temperature": 1.0, "top_k": 2**62},
        {"temperature": -1.0, "repetition_penalty": 2.0},
        {"temperature": 1e30},
        {"temperature": 1.0, "seed": 2**70},  # beyond what a torch generator takes
    ],
    ids=str,
)
def test_settings_no_request_may_send_still_end_cleanly_for_that_row_alone(
    params: dict[str, Any],
) -> None:
    """A model's own generation defaults reach the sampler unvalidated."""
    greedy, _ = sampler_row()
    bad, events = sampler_row(**params)
    scores = torch.stack([normal_logits(), normal_logits()])
    out = choose([greedy, bad], scores)
    assert torch.equal(out[0], scores[0])
    one_hot_choice(out[1])
    for event in events:
        assert isinstance(event, Failed) and isinstance(event.error, GatewayError)
        assert event.error.message


# -- the engine on the tiny model -----------------------------------------------------------

NORMAL = ["hello", "你好,你是谁？", "a much longer prompt with many more words in it"]
NORMAL_TOKENS = 8
MODES = {"continuous": True, "per-generate": False}


@pytest.fixture(scope="module")
def adapter(tiny_model: Path) -> ChatTemplateAdapter:
    loaded = ChatTemplateAdapter(LoadSpec(path=tiny_model, dtype="float32"))
    loaded.load()
    return loaded


class Runner:
    def __init__(self, adapter: Any, continuous: bool) -> None:
        self.adapter = adapter
        self.engine = Engine(adapter, 8, 0.05, continuous=continuous)
        assert self.engine.continuous == continuous
        self.engine.start()

    def row(self, prompt: str, **params: Any) -> tuple[Row, list[Event], threading.Event]:
        events: list[Event] = []
        ended = threading.Event()

        def emit(event: Event) -> None:
            events.append(event)
            if not isinstance(event, Delta):
                ended.set()

        ids = self.adapter.chat_prompt([{"role": "user", "content": prompt}]).ids
        sampling = SamplingParams(**{"max_new_tokens": NORMAL_TOKENS, **params})
        stops = frozenset(self.adapter.stop_token_ids())
        return Row(ids, sampling, stops, self.adapter.decode, emit), events, ended

    def run(self, *rows: tuple[Row, list[Event], threading.Event]) -> list[Event]:
        """Submit the rows together; each one's ending event (Finished or Failed)."""
        for row, _, _ in rows:
            self.engine.submit(row)
        for _, _, ended in rows:
            assert ended.wait(60)
        ends = [events[-1] for _, events, _ in rows]
        assert all(isinstance(end, (Finished, Failed)) for end in ends), ends
        return ends

    def texts(self, *rows: tuple[Row, list[Event], threading.Event]) -> list[str]:
        ends = self.run(*rows)
        assert all(isinstance(end, Finished) for end in ends), ends
        return [end.text for end in ends]  # type: ignore[union-attr]


@pytest.fixture(scope="module", params=MODES)
def runner(adapter: ChatTemplateAdapter, request: pytest.FixtureRequest) -> Iterator[Runner]:
    made = Runner(adapter, MODES[request.param])
    yield made
    made.engine.stop()


@pytest.fixture(scope="module")
def alone(runner: Runner) -> list[str]:
    return [runner.texts(runner.row(prompt))[0] for prompt in NORMAL]


def test_a_vanishing_repetition_penalty_does_not_fail_its_batch(
    runner: Runner, alone: list[str]
) -> None:
    poison = runner.row("x", max_new_tokens=2, temperature=1.0, repetition_penalty=1e-38)
    *normal, bad = runner.run(*(runner.row(p) for p in NORMAL), poison)
    assert [getattr(end, "text", end) for end in normal] == alone
    assert isinstance(bad, Finished)  # the penalty is absurd, not fatal


def test_a_row_whose_detokenizer_raises_fails_alone(runner: Runner, alone: list[str]) -> None:
    def broken(ids: Any) -> str:
        raise ValueError("no such token")

    row, events, ended = runner.row("hello")
    bad = (Row(row.prompt_ids, row.params, row.stop_ids, broken, row.emit), events, ended)
    *normal, failed = runner.run(*(runner.row(p) for p in NORMAL), bad)
    assert [getattr(end, "text", end) for end in normal] == alone
    assert isinstance(failed, Failed) and "detokenizing failed" in failed.error.message


extreme_floats = st.sampled_from([0.0, 1e-38, 1e-6, 0.01, 0.5, 1.0, 2.0, 1e6, 1e38, INF, NAN])
extreme_settings = st.fixed_dictionaries(
    {
        "temperature": extreme_floats | st.floats(0, 2),
        "top_p": extreme_floats | st.floats(0, 1) | st.just(-1.0),
        "top_k": st.sampled_from([0, 1, 2, 50, 599, 600, 601, 10**6, 2**62]),
        "repetition_penalty": extreme_floats | st.floats(0.01, 10),
        "seed": st.none() | st.integers(0, 2**63 - 1) | st.just(2**64),
        "max_new_tokens": st.integers(1, 12),
    }
)


def within_accepted_ranges(params: dict[str, Any]) -> bool:
    fields = {k: v for k, v in params.items() if k != "max_new_tokens"}
    try:
        SamplingFields.model_validate(fields)
    except pydantic.ValidationError:
        return False
    return True


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    params=extreme_settings,
    prompt=st.sampled_from(["x", "hello", "谢谢", NORMAL[2] * 2]),
    position=st.integers(0, len(NORMAL)),
)
def test_a_row_with_extreme_settings_never_changes_the_other_rows_of_its_batch(
    runner: Runner, alone: list[str], params: dict[str, Any], prompt: str, position: int
) -> None:
    rows = [runner.row(p) for p in NORMAL]
    rows.insert(position, runner.row(prompt, **params))
    ends = runner.run(*rows)
    extreme = ends.pop(position)
    assert [getattr(end, "text", end) for end in ends] == alone
    if within_accepted_ranges(params):  # whatever validation lets through must work
        assert isinstance(extreme, Finished), (params, extreme)
    elif isinstance(extreme, Failed):
        assert isinstance(extreme.error, GatewayError) and extreme.error.message


@pytest.fixture(scope="module")
def nan_adapter(tiny_model: Path, adapter: ChatTemplateAdapter) -> tuple[ChatTemplateAdapter, str]:
    """The tiny model with one token's embedding NaN, and a prompt that has that token."""
    poisoned = ChatTemplateAdapter(LoadSpec(path=tiny_model, dtype="float32"))
    poisoned.load()
    prompt = "天地玄黄"
    ids = set(adapter.chat_prompt([{"role": "user", "content": prompt}]).ids)
    for other in NORMAL:
        ids -= set(adapter.chat_prompt([{"role": "user", "content": other}]).ids)
    ids.discard(poisoned.pad_token_id())
    assert ids, "the prompt needs a token no normal prompt has"
    with torch.no_grad():
        poisoned.model.get_input_embeddings().weight[min(ids)] = NAN
    return poisoned, prompt


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_a_prompt_that_makes_the_logits_nan_fails_only_its_own_row(
    nan_adapter: tuple[ChatTemplateAdapter, str], mode: str, temperature: float
) -> None:
    poisoned, prompt = nan_adapter
    run = Runner(poisoned, MODES[mode])
    try:
        expected = [run.texts(run.row(p))[0] for p in NORMAL]
        rows = [run.row(p, max_new_tokens=NORMAL_TOKENS) for p in NORMAL]
        rows.insert(1, run.row(prompt, temperature=temperature, seed=5))
        normal_a, bad, *normal_b = run.run(*rows)
        assert [getattr(end, "text", end) for end in [normal_a, *normal_b]] == expected
        assert isinstance(bad, Failed), bad
        assert bad.error.status == 500 and bad.error.code == "sampling_failed"
        assert "no finite logit" in bad.error.message
        assert run.texts(run.row(NORMAL[0])) == expected[:1]  # the engine goes on
    finally:
        run.engine.stop()
