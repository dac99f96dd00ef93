"""The generic transformers adapter: what it reads from a loaded model and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from adapters.base import LoadSpec, TransformersAdapter


def tokenizer(model_max_length: int | None) -> PreTrainedTokenizerFast:
    """A real (tiny) tokenizer; `None` leaves `model_max_length` unset, as many models do."""
    backend = Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kwargs)


def adapter(
    config: PretrainedConfig, model_max_length: int | None, clamp: int | None = None
) -> TransformersAdapter:
    made = TransformersAdapter(LoadSpec(Path("unused"), context_length=clamp))
    made.model = SimpleNamespace(config=config)  # context_length reads only the config
    made.tokenizer = tokenizer(model_max_length)
    return made


def test_an_unset_tokenizer_limit_is_transformers_sentinel() -> None:
    assert tokenizer(None).model_max_length == VERY_LARGE_INTEGER


def test_a_tokenizer_limit_below_the_model_s_wins() -> None:
    # TransNormerLLM-7B the other way round; a model trained longer than its tokenizer says.
    assert adapter(LlamaConfig(max_position_embeddings=8192), 2048).context_length() == 2048


def test_a_model_limit_below_the_tokenizer_s_wins() -> None:
    assert adapter(LlamaConfig(max_position_embeddings=2048), 8192).context_length() == 2048


def test_the_tokenizer_sentinel_is_no_limit() -> None:
    assert adapter(LlamaConfig(max_position_embeddings=4096), None).context_length() == 4096
    huge = adapter(LlamaConfig(max_position_embeddings=4096), 10**12)
    assert huge.context_length() == 4096


@pytest.mark.parametrize("key", ["max_sequence_length", "seq_length", "n_positions"])
def test_other_spellings_of_the_model_limit_count(key: str) -> None:
    config = PretrainedConfig(**{key: 1024})
    assert adapter(config, 8192).context_length() == 1024


def test_neither_limit_known_falls_back_to_2048() -> None:
    assert adapter(PretrainedConfig(), None).context_length() == 2048


def test_the_tokenizer_limit_alone_counts() -> None:
    assert adapter(PretrainedConfig(), 512).context_length() == 512


def test_the_registry_clamp_caps_both() -> None:
    config = LlamaConfig(max_position_embeddings=8192)
    assert adapter(config, 4096, clamp=1000).context_length() == 1000
    assert adapter(config, 4096, clamp=100_000).context_length() == 4096
