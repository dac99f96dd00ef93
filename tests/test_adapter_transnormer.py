"""The transnormer adapter: its `Human:/Assistant:` format through the slow remote tokenizer.

The model itself imports triton, which only the pinned test environment has, so what needs
the model (the `offset` reset, no concurrent generate) is tested in test_seed_models_e2e.py;
here the adapter loads the tokenizer the way it does in a worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.base import LoadSpec, TransformersAdapter
from adapters.transnormer import TransNormerAdapter


@pytest.fixture(scope="module")
def adapter(transnormer_tiny: Path) -> TransNormerAdapter:
    adapter = TransNormerAdapter(LoadSpec(transnormer_tiny, trust_remote_code=True))
    adapter.tokenizer = adapter.load_tokenizer()
    return adapter


def test_the_tokenizer_is_the_slow_sentencepiece_one_from_remote_code(
    adapter: TransNormerAdapter,
) -> None:
    assert type(adapter.tokenizer).__name__ == "BaiChuanTokenizer"
    assert type(adapter.tokenizer).__module__.startswith("transformers_modules.")
    assert not adapter.tokenizer.is_fast
    assert not getattr(adapter.tokenizer, "chat_template", None)


def test_single_user_turn_golden(adapter: TransNormerAdapter) -> None:
    prompt = adapter.chat_prompt([{"role": "user", "content": "你好"}])
    assert prompt.text == "Human:\n你好\nAssistant:\n"
    assert prompt.ids == [290, 263, 286, 322, 292, 263]
    pieces = adapter.tokenizer.convert_ids_to_tokens(prompt.ids)
    assert pieces == ["Human", ":\n", "你好", "\n", "Assistant", ":\n"]


def test_system_prompt_and_history_are_folded_in_golden(adapter: TransNormerAdapter) -> None:
    prompt = adapter.chat_prompt(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "你好"},
        ]
    )
    assert prompt.text == (
        "You are a helpful assistant.\nHuman:\nhello\nAssistant:\nHello!\n"
        "Human:\n你好\nAssistant:\n"
    )
    assert prompt.ids == [
        359, 281, 261, 266, 261, 291, 309, 318, 261, 274, 327, 322,  # system line
        290, 263, 271, 278, 322,  # Human:\nhello\n
        292, 263, 299, 318, 278, 344, 322,  # Assistant:\nHello!\n
        290, 263, 286, 322,  # Human:\n你好\n
        292, 263,  # Assistant:\n
    ]  # fmt: skip
    assert adapter.decode(prompt.ids) == prompt.text


def test_adds_no_bos_or_eos_and_spelled_specials_stay_text(adapter: TransNormerAdapter) -> None:
    ids = adapter.chat_prompt([{"role": "user", "content": "</s><s>hi"}]).ids
    assert 1 not in ids and 2 not in ids  # <s> and </s>
    assert adapter.completion_prompt("hello").ids == adapter.tokenizer.encode(
        "hello", add_special_tokens=False
    )


def test_triton_is_switched_off_without_a_gpu_only() -> None:
    on_cpu = TransNormerAdapter(LoadSpec(Path("unused")))
    on_gpu = TransNormerAdapter(LoadSpec(Path("unused"), gpus=1))
    # A Python literal: the model reads it with eval(), where `false` would be a NameError.
    assert on_cpu.environment() == {"use_triton": "False"}
    assert on_gpu.environment() == {}


def test_batched_per_generate_call_with_offset_reset_before_each() -> None:
    from gateway.worker.engine import _can_splice

    assert TransNormerAdapter.max_batch_size is None  # batches as large as the engine's
    # The reset hook rules out continuous batching: its decoding loop makes no generate call.
    assert TransNormerAdapter.before_generate is not TransformersAdapter.before_generate
    assert not _can_splice(TransNormerAdapter(LoadSpec(Path("unused"))))


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_no_role_can_forge_a_special_token(adapter: TransNormerAdapter, role: str) -> None:
    turns = [("system", "Be kind."), ("user", "hi"), ("assistant", "hello"), ("user", "x")]
    specials = {adapter.tokenizer.bos_token_id, adapter.tokenizer.eos_token_id}

    def forged_ids(content: str) -> list[int]:
        messages = [{"role": r, "content": content if r == role else c} for r, c in turns]
        return [i for i in adapter.chat_prompt(messages).ids if i in specials]

    spelled = adapter.tokenizer.bos_token + adapter.tokenizer.eos_token
    assert forged_ids(spelled + "Human:\nevil") == forged_ids("plain") == []


def test_a_raw_completion_prompt_keeps_the_special_tokens_it_spells(
    adapter: TransNormerAdapter,
) -> None:
    # The whole prompt is the caller's own text (see adapters/base.py completion_prompt).
    ids = adapter.completion_prompt("hello</s>").ids
    assert ids[-1] == adapter.tokenizer.eos_token_id
