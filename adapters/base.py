"""The adapter seam, and the generic transformers loader every adapter builds on.

An adapter owns one prompt family: how a model is loaded (dtype, placement, remote code,
tokenizer quirks), how chat messages become prompt token ids, which tokens end a reply and
which generation defaults the model ships. It runs only inside a worker process; it must
work on every transformers version a worker may run (4.47 and 5.x), so version-dependent
calls are confined to this module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeGuard

from adapters.loading import attention, torch_dtype

log = logging.getLogger(__name__)

Message = Mapping[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class LoadSpec:
    """Everything an adapter needs to load a model, resolved by the worker."""

    path: Path
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto
    gpus: int = 0  # GPUs visible to this worker (already narrowed by CUDA_VISIBLE_DEVICES)
    # Keyed by local GPU ordinal, and "cpu" when the entry allows CPU offload.
    max_memory: dict[int | str, int] | None = None
    attention: str = "auto"  # auto | flash_attention_2 | sdpa | eager
    trust_remote_code: bool = False
    revision: str | None = None
    context_length: int | None = None  # registry clamp; None = the model's own


@dataclass(frozen=True)
class SamplingDefaults:
    """What the model's own generation_config asks for when a request leaves a field unset."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # the rendered prompt, when the adapter renders text first
    extra: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    """What the worker's engine uses. Contract:

    - `environment()` is read before `load()`; its variables are set unless the registry's
      `env` already sets them.
    - `load()` is called once, before anything else, in the worker's main thread.
    - `chat_prompt()`/`completion_prompt()` are pure and thread-safe.
    - `chat_prompt()` keeps message content literal: text that spells a special token is
      tokenized as text, so no message can end its turn or forge another; only the format's
      own markup yields special tokens. `completion_prompt()` takes the caller's raw text,
      special tokens and all.
    - `before_generate()` runs in the generation thread right before every `generate` call.
      Continuous batching (see `gateway/worker/decoding.py`) makes no such call, so an
      adapter that overrides the hook batches whole `generate` calls instead.
    - `max_batch_size` of 1 means the model must never see two requests in one batch.
    """

    name: ClassVar[str]
    max_batch_size: ClassVar[int | None]
    model: Any
    tokenizer: Any

    def environment(self) -> dict[str, str]: ...
    def load(self) -> None: ...
    def chat_prompt(self, messages: Sequence[Message]) -> Prompt: ...
    def completion_prompt(self, text: str) -> Prompt: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def stop_token_ids(self) -> set[int]: ...
    def pad_token_id(self) -> int: ...
    def context_length(self) -> int: ...
    def sampling_defaults(self) -> SamplingDefaults: ...
    def before_generate(self) -> None: ...


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


class TransformersAdapter:
    """A causal LM loaded with the Auto classes. Subclasses override prompt rendering."""

    name: ClassVar[str] = "transformers"
    max_batch_size: ClassVar[int | None] = None
    # Adapters that place special tokens by id set this, so that text which spells a special
    # token ("</s>") is encoded as text and a user cannot end a turn or forge one.
    literal_text: ClassVar[bool] = False

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        self.tokenizer = self.load_tokenizer()
        self.model = self.load_model()
        self.model.eval()
        self.after_load()

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            str(self.spec.path),
            trust_remote_code=self.spec.trust_remote_code,
            revision=self.spec.revision,
        )

    def load_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.spec.path), **self.model_kwargs())

    def model_kwargs(self) -> dict[str, Any]:
        on_gpu = self.spec.gpus > 0
        dtype = torch_dtype(self.spec.dtype, on_gpu)
        dtype_key = "dtype" if transformers_major() >= 5 else "torch_dtype"
        kwargs: dict[str, Any] = {
            dtype_key: dtype,
            "trust_remote_code": self.spec.trust_remote_code,
            "revision": self.spec.revision,
        }
        model_class = None
        if on_gpu or self.spec.max_memory:  # placed under a budget, as `plan` places it
            from gateway.worker.placing import meta_model

            meta = meta_model(self.spec.path, self.spec.trust_remote_code, self.spec.revision)
            model_class = type(meta)
            kwargs["device_map"] = self.placement(meta, dtype)
        implementation = attention(self.spec.attention, model_class, dtype, on_gpu)
        if implementation:
            kwargs["attn_implementation"] = implementation
        return kwargs

    def placement(self, meta: Any, dtype: Any) -> dict[str, int | str]:
        """The placement `llm-gateway plan` shows (gateway/worker/placing.py), or refusal."""
        from gateway.worker.placing import (
            allowed_devices,
            device_map,
            loader_budget,
            refuse_outside,
        )

        if self.spec.gpus == 1 and not self.spec.max_memory:
            return {"": 0}  # one GPU without a budget: all of it there
        budget = loader_budget(self.spec.max_memory, self.spec.gpus)
        placed = device_map(meta, budget, dtype)
        refuse_outside(placed, allowed_devices(budget, self.spec.gpus))
        return {"": "cpu"} if set(placed.values()) == {"cpu"} else placed

    def after_load(self) -> None:
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- prompts ---------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        raise NotImplementedError

    def completion_prompt(self, text: str) -> Prompt:
        # A raw completion prompt is wholly the caller's own text, with no turn of anyone
        # else's to protect: special tokens it spells are special, so that a client can
        # write the model's format itself (as vLLM and the OpenAI API take raw prompts).
        return Prompt(self.encode(text, add_special_tokens=True, literal=False), text)

    def encode(
        self, text: str, add_special_tokens: bool = False, literal: bool | None = None
    ) -> list[int]:
        """Token ids of `text`; `literal` (default: the adapter's `literal_text`) keeps text
        that spells a special token as text."""
        split = self.literal_text if literal is None else literal
        ids = self.tokenizer(
            text, add_special_tokens=add_special_tokens, split_special_tokens=split
        )["input_ids"]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # -- generation facts ------------------------------------------------------------------

    def stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.stop_token_ids(), default=0)
        return int(pad)

    def context_length(self) -> int:
        """The smallest of the model's own position limit, the tokenizer's `model_max_length`
        and the registry's clamp, where each is set; 2048 when none is."""
        config = self.model.config
        native = [getattr(config, key, None) for key in _POSITION_KEYS]
        tokenizer = getattr(self.tokenizer, "model_max_length", None)
        limits = [v for v in (*native, tokenizer, self.spec.context_length) if _is_limit(v)]
        return min(limits) if limits else 2048

    def sampling_defaults(self) -> SamplingDefaults:
        config = getattr(self.model, "generation_config", None)
        if config is None or not getattr(config, "do_sample", False):
            return SamplingDefaults(repetition_penalty=_float(config, "repetition_penalty", 1.0))
        return SamplingDefaults(
            temperature=_float(config, "temperature", 1.0),
            top_p=_float(config, "top_p", 1.0),
            top_k=int(getattr(config, "top_k", 0) or 0),
            repetition_penalty=_float(config, "repetition_penalty", 1.0),
        )

    def environment(self) -> dict[str, str]:
        """Variables the model's code reads at import time; the registry's `env` wins."""
        return {}

    def before_generate(self) -> None:
        """Hook for models that keep per-call state on their modules."""


# Where configs keep the longest sequence the model was built for.
_POSITION_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "seq_length",
    "n_positions",
    "max_seq_len",
)
# transformers writes int(1e30) (VERY_LARGE_INTEGER) for "no limit known": nothing that large
# is a real limit.
_UNSET_FROM = 10**9


def _is_limit(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < _UNSET_FROM


def _float(config: Any, key: str, default: float) -> float:
    value = getattr(config, key, None)
    return float(value) if isinstance(value, (int, float)) else default
