"""One row of a batched generation: incremental detokenization, stop strings, limits, EOS,
cancellation. The decode function is a fake byte-level tokenizer whose tokens may cut a
UTF-8 character in two, as real byte-level BPE vocabularies do."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from gateway.errors import BadRequest
from gateway.worker.rows import Delta, Event, Failed, Finished, Row, SamplingParams

EOS = 0
NI = "你".encode()  # three bytes: e4 bd a0
VOCAB: dict[int, bytes] = {
    EOS: b"",  # a special token: decodes to nothing (skip_special_tokens)
    1: b"he",
    2: b"llo",
    3: b" ",
    4: NI[:2],  # the first two bytes of 你
    5: NI[2:],  # its last byte
    6: b"E",
    7: b"N",
    8: b"D",
    9: b"x",
    10: "好".encode(),
    11: "😀".encode()[:1],
    12: "😀".encode()[1:3],
    13: "😀".encode()[3:],
    14: b"\n",
    15: b"END",
}


def decode(ids: Sequence[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def deltas(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, Delta)]

    @property
    def streamed(self) -> str:
        return "".join(self.deltas)

    @property
    def finished(self) -> Finished:
        ends = [e for e in self.events if isinstance(e, (Finished, Failed))]
        assert len(ends) == 1, self.events
        assert ends[0] is self.events[-1]  # nothing after the end
        assert isinstance(ends[0], Finished)
        return ends[0]


def make_row(
    max_new_tokens: int = 50, stop: Sequence[str] = (), prompt: int = 3
) -> tuple[Row, Recorder]:
    recorder = Recorder()
    row = Row(
        prompt_ids=list(range(prompt)),
        params=SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(stop)),
        stop_ids=frozenset({EOS}),
        decode=decode,
        emit=recorder,
    )
    return row, recorder


def feed(row: Row, tokens: Sequence[int]) -> None:
    for token in tokens:
        row.push(token)


# -- detokenization -------------------------------------------------------------------------


def test_each_token_is_streamed_as_soon_as_it_spells_whole_characters() -> None:
    row, out = make_row()
    feed(row, [1, 2, 3])
    assert out.deltas == ["he", "llo", " "]
    assert not row.done


def test_half_a_character_is_held_until_its_last_byte_arrives() -> None:
    row, out = make_row()
    feed(row, [1, 4])
    assert out.deltas == ["he"]  # no U+FFFD for the dangling bytes of 你
    row.push(5)
    assert out.deltas == ["he", "你"]


def test_a_four_byte_character_cut_in_three_tokens_arrives_whole() -> None:
    row, out = make_row()
    feed(row, [11, 12])
    assert out.deltas == []
    row.push(13)
    assert out.deltas == ["😀"]


def test_a_half_character_left_at_the_length_limit_is_flushed_as_a_replacement() -> None:
    row, out = make_row(max_new_tokens=2)
    feed(row, [10, 4])
    done = out.finished
    assert done.reason == "length"
    assert done.text == "好\ufffd"  # the bytes really were cut: say so, do not drop them
    assert out.streamed == done.text


def test_the_final_text_is_what_the_deltas_spelled() -> None:
    row, out = make_row(max_new_tokens=9)
    feed(row, [1, 2, 3, 4, 5, 10, 11, 12, 13])
    done = out.finished
    assert done.text == "hello 你好😀" == out.streamed
    assert (done.reason, done.prompt_tokens, done.completion_tokens) == ("length", 3, 9)


# -- stop strings ---------------------------------------------------------------------------


def test_a_stop_string_ends_the_row_and_is_not_part_of_the_text() -> None:
    row, out = make_row(stop=["END"])
    feed(row, [1, 2, 15, 9])
    done = out.finished
    assert (done.reason, done.text) == ("stop", "hello")
    assert done.completion_tokens == 3  # the token that completed the stop counts
    assert out.streamed == "hello"


def test_a_stop_string_split_across_tokens_is_found() -> None:
    row, out = make_row(stop=["END"])
    feed(row, [1, 6, 7, 8])
    assert (out.finished.reason, out.finished.text) == ("stop", "he")


def test_a_possible_stop_prefix_is_held_back_while_streaming() -> None:
    row, out = make_row(stop=["END"])
    feed(row, [1, 6])
    assert out.streamed == "he"  # "E" may begin "END": not sent yet
    row.push(7)
    assert out.streamed == "he"  # nor "EN"
    row.push(8)
    assert out.finished.text == "he" == out.streamed  # nothing to take back


def test_held_back_text_is_released_once_it_cannot_be_a_stop() -> None:
    row, out = make_row(stop=["END"])
    feed(row, [6, 7])
    assert out.streamed == ""
    row.push(9)
    assert out.streamed == "ENx"
    assert not row.done


def test_held_back_text_is_flushed_when_the_row_ends_without_the_stop() -> None:
    row, out = make_row(max_new_tokens=3, stop=["END"])
    feed(row, [1, 6, 7])
    done = out.finished
    assert (done.reason, done.text) == ("length", "heEN")
    assert out.streamed == "heEN"


def test_the_earliest_of_several_stop_strings_wins() -> None:
    row, out = make_row(stop=["llo", "\n", "he"])
    feed(row, [9, 1, 2])
    assert out.finished.text == "x"


def test_a_stop_string_at_the_very_start_gives_an_empty_reply() -> None:
    row, out = make_row(stop=["he"])
    row.push(1)
    assert (out.finished.reason, out.finished.text, out.deltas) == ("stop", "", [])


def test_a_multibyte_stop_string_split_mid_character_is_found() -> None:
    row, out = make_row(stop=["你好"])
    feed(row, [1, 4, 5])
    assert out.streamed == "he"  # 你 may begin 你好
    row.push(10)
    assert (out.finished.reason, out.finished.text, out.streamed) == ("stop", "he", "he")


@pytest.mark.parametrize("seed", range(40))
def test_streamed_deltas_always_equal_the_final_text(seed: int) -> None:
    """Random byte soup (characters cut anywhere, stray bytes) and random stop strings."""
    rng = random.Random(seed)
    tokens = [rng.choice(list(VOCAB)[1:]) for _ in range(rng.randint(1, 40))]
    full = decode(tokens)
    stops = [
        full[i : i + rng.randint(1, 4)] for i in rng.sample(range(len(full)), k=min(2, len(full)))
    ]
    stops = [s for s in stops if s and "\ufffd" not in s] if seed % 2 else ["END", "\n"]
    row, out = make_row(max_new_tokens=len(tokens), stop=stops)
    streamed_so_far: list[str] = []
    for token in tokens:
        row.push(token)
        streamed_so_far.append(out.streamed)
    done = out.finished
    assert out.streamed == done.text  # never more, never less than the reply
    assert all(done.text.startswith(s) for s in streamed_so_far)  # nothing taken back
    cuts = [i for s in stops if (i := full.find(s)) >= 0]
    assert done.text == (full[: min(cuts)] if cuts else full)
    assert done.reason == ("stop" if cuts else "length")
    assert not any(s in done.text for s in stops)


# -- limits, EOS, cancellation, failure -----------------------------------------------------


def test_the_row_ends_after_exactly_max_new_tokens() -> None:
    row, out = make_row(max_new_tokens=2)
    feed(row, [1, 2, 3, 9])
    assert (out.finished.reason, out.finished.text, out.finished.completion_tokens) == (
        "length",
        "hello",
        2,
    )
    assert row.output_ids == [1, 2]  # later tokens are ignored


def test_eos_ends_the_row_and_is_not_counted_or_shown() -> None:
    row, out = make_row()
    feed(row, [1, 2, EOS, 3])
    done = out.finished
    assert (done.reason, done.text, done.completion_tokens) == ("stop", "hello", 2)


def test_eos_flushes_held_back_text() -> None:
    row, out = make_row(stop=["END"])
    feed(row, [1, 6, EOS])
    assert (out.finished.reason, out.finished.text, out.streamed) == ("stop", "heE", "heE")


def test_a_cancelled_row_ends_at_its_next_token_keeping_what_it_said() -> None:
    row, out = make_row()
    feed(row, [1, 2])
    row.cancelled.set()
    row.push(3)
    done = out.finished
    assert (done.reason, done.text, done.completion_tokens) == ("cancelled", "hello", 2)


def test_finish_is_reported_once() -> None:
    row, out = make_row()
    row.push(1)
    row.finish("length")
    row.finish("cancelled")
    row.push(2)
    assert out.finished.reason == "length"


def test_a_failed_row_reports_the_error_and_then_nothing() -> None:
    row, out = make_row()
    row.push(1)
    error = BadRequest("boom")
    row.fail(error)
    row.push(2)
    row.finish("length")
    assert out.events[-1] == Failed(error)
    assert row.finish_reason == "error"
    assert out.deltas == ["he"]


def test_greedy_means_temperature_zero() -> None:
    assert SamplingParams(max_new_tokens=1).greedy
    assert not SamplingParams(max_new_tokens=1, temperature=0.7).greedy


@pytest.mark.parametrize("breaks_at", ["a token", "the final flush"])
def test_a_row_whose_detokenizer_raises_fails_alone_without_raising(breaks_at: str) -> None:
    broken = False

    def flaky(ids: Sequence[int]) -> str:
        if broken:
            raise ValueError("no such token")
        return decode(ids)

    recorder = Recorder()
    row = Row([1], SamplingParams(max_new_tokens=9), frozenset({EOS}), flaky, recorder)
    feed(row, [1, 4])  # "he", then half a character, held back
    broken = True
    if breaks_at == "a token":
        row.push(5)
    row.finish("length")  # the held-back bytes need one last decode
    row.push(2)
    ends = [e for e in recorder.events if not isinstance(e, Delta)]
    assert len(ends) == 1 and ends[0] is recorder.events[-1] and isinstance(ends[0], Failed)
    assert ends[0].error.message == "detokenizing failed: ValueError: no such token"
    assert row.finish_reason == "error" and recorder.deltas == ["he"]


def test_a_row_whose_reply_channel_breaks_ends_in_error_without_raising() -> None:
    # The row shares its batch: an error telling its own client must not escape the step.
    def broken(event: object) -> None:
        raise RuntimeError("the reply channel broke")

    row = Row([1], SamplingParams(max_new_tokens=9), frozenset({EOS}), decode, broken)
    row.push(1)
    row.push(4)
    row.push(2)
    assert row.finish_reason == "error"
