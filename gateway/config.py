"""The registry: `models.yaml` parsed into typed, validated, immutable settings.

Every default lives here, in one place. Unknown keys are rejected; `gateway.config_load`
turns a file into a `Registry` or raises `ConfigError` listing every mistake with its
YAML path, line and a fix hint.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Names a model may not take: they are routes of the gateway itself.
RESERVED_NAMES = frozenset(
    {
        "v1",
        "health",
        "ready",
        "admin",
        "metrics",
        "docs",
        "redoc",
        "openapi.json",
        "favicon.ico",
        "static",
    }
)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: object) -> int:
    """Accept 1024, "512MiB", "22GiB", "1.5 GB"; return a byte count."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 22GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"expected a size such as 22GiB or 512MiB, got {value!r}")


ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(gt=0)]
DeviceKey = Annotated[str, BeforeValidator(lambda v: str(v))]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The accepted range of each sampling setting, for requests and the registry alike (see
# `SamplingFields` in protocol.py for what each means and why these bounds).
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=1_000_000)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Generation(Strict):
    """Generation defaults; a request overrides them field by field."""

    max_new_tokens: int = Field(256, gt=0)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: list[str] = []


class Limits(Strict):
    max_new_tokens: int = Field(4096, gt=0)
    context_length: int | None = Field(None, gt=0)
    max_concurrency: int = Field(32, gt=0)
    max_queue: int = Field(256, ge=0)
    queue_timeout_s: float = Field(60.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    # Messages in one request (the seed route counts system, each history turn, the prompt):
    # the work a request costs before the model sees it grows with this count.
    max_messages: int = Field(1024, gt=0)


class Batching(Strict):
    max_batch_size: int = Field(8, gt=0)
    # No gather window by default (as Triton's dynamic batcher): rows that arrive while a
    # batch runs are batched anyway, and a window only delays every request that finds
    # the engine idle (5 ms cost a lone 16-token request 20% on the benchmark model).
    batch_wait_ms: float = Field(0.0, ge=0)
    # Rows join and leave a running batch between decoding steps, for models whose cache
    # the engine can splice (transformers' own decoder-only models with full attention);
    # other models, or `false`, batch whole `generate` calls (gateway/worker/decoding.py).
    continuous: bool = True


class PythonEnv(Strict):
    """Either requirements installed into a model-local venv, or an existing interpreter."""

    requirements: list[str] = []
    python: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> PythonEnv:
        if bool(self.requirements) == bool(self.python):
            raise ValueError("give either `requirements` (a list) or `python` (a path), not both")
        return self


class Upstream(Strict):
    """A remote OpenAI-compatible server that serves this model instead of a local worker."""

    url: str
    model: str | None = None
    api_key_env: str | None = None


Hub = Literal["local", "modelscope", "huggingface"]
DType = Literal["float32", "bfloat16", "float16", "auto"]
# `auto`: flash_attention_2 where flash-attn is installed and the GPU, dtype and model
# support it, else sdpa where the model supports it, else the model's own default.
Attention = Literal["auto", "flash_attention_2", "sdpa", "eager"]


def max_memory_problem(max_memory: dict[str, int], devices: object) -> str | None:
    """Why a `max_memory` cannot place a model on `devices`, or None when it can.

    A budget names every GPU of the entry (a model is placed without asking the GPUs how
    big they are, so `plan` and the loader agree) and nothing else but `cpu`, which
    allows CPU offload. Disk offload is never allowed: a model read from disk per token
    is too slow to serve.
    """
    gpus = [str(d) for d in devices] if isinstance(devices, list) else []
    if "disk" in max_memory:
        return "disk offload is not supported; name `cpu` to allow CPU offload"
    foreign = [k for k in max_memory if k != "cpu" and k not in gpus]
    if foreign:
        return f"device {foreign[0]!r} is not in `devices` ({devices})"
    missing = [g for g in gpus if g not in max_memory]
    if missing:
        return (
            f"no budget for GPU {missing[0]}: give one for every GPU in `devices`, "
            "or leave `max_memory` out to use each GPU's free memory"
        )
    return None


class ModelEntry(Strict):
    description: str | None = None
    source: str | None = None
    hub: Hub = "local"
    revision: str | None = None
    cache_dir: str | None = None
    auto_pull: bool = True
    upstream: Upstream | None = None
    adapter: str = "chat_template"
    dtype: DType = "auto"
    devices: Literal["cpu"] | list[Annotated[int, Field(ge=0)]] = "cpu"
    max_memory: dict[DeviceKey, ByteSize] | None = None
    attention: Attention = "auto"
    trust_remote_code: bool = False
    python_env: PythonEnv | None = None
    env: dict[str, str] = {}
    system_prompt: str | None = None
    generation: Generation = Generation()
    limits: Limits = Limits()
    batching: Batching = Batching()
    idle_unload_s: float | None = Field(None, ge=0)
    pinned: bool = False
    memory_bytes: ByteSize | None = None
    planning_config: str | None = None

    @field_validator("max_memory")
    @classmethod
    def _budget_fits_devices(
        cls, value: dict[str, int] | None, info: ValidationInfo
    ) -> dict[str, int] | None:
        if value is not None and "devices" in info.data:  # a bad `devices` reports itself
            problem = max_memory_problem(value, info.data["devices"])
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _source_or_upstream(self) -> ModelEntry:
        if (self.source is None) == (self.upstream is None):
            raise ValueError("give either `source` (a path or hub id) or `upstream` (a URL)")
        if isinstance(self.devices, list) and not self.devices:
            raise ValueError("`devices` must be `cpu` or a non-empty list of GPU indices")
        limit = self.limits.max_new_tokens
        generation = self.generation
        if (
            "max_new_tokens" not in generation.model_fields_set
            and generation.max_new_tokens > limit
        ):
            # Only the limit is written: the default length follows it down.
            clamped = generation.model_copy(update={"max_new_tokens": limit})
            object.__setattr__(self, "generation", clamped)
        if self.generation.max_new_tokens > limit:
            raise ValueError(
                f"generation.max_new_tokens ({self.generation.max_new_tokens}) exceeds "
                f"limits.max_new_tokens ({self.limits.max_new_tokens})"
            )
        return self

    @property
    def is_remote(self) -> bool:
        return self.upstream is not None


class Auth(Strict):
    """API keys are never written in the file: name an environment variable or a key file."""

    api_keys_env: str | None = None
    api_keys_file: str | None = None
    admin_keys_env: str | None = None
    admin_keys_file: str | None = None


class GatewaySettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(6006, ge=0, le=65535)
    default_model: str | None = None
    idle_unload_s: float | None = Field(None, ge=0)
    load_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    probe_interval_s: float = Field(5.0, gt=0)  # health probe of each ready worker
    probe_failures: int = Field(3, gt=0)  # consecutive failed probes before a restart
    memory_budget: dict[DeviceKey, ByteSize] = {}
    max_body_bytes: int = Field(4 * 2**20, gt=0)
    cache_dir: str = ".cache"
    envs_dir: str = ".cache/envs"
    # A model whose `python_env` is not built yet gets it built on its first load (pip
    # output in the model's progress and the log); off, the load fails naming the command.
    auto_build_envs: bool = True
    watch_config: bool = True
    cors_origins: list[str] = []
    auth: Auth = Auth()


class Registry(Strict):
    gateway: GatewaySettings = GatewaySettings()
    models: dict[str, ModelEntry]
