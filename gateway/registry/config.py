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
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from adapters import ADAPTERS

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
        "playground",
    }
)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# A device in `max_memory` and `memory_budget`: the CPU or a GPU index (YAML's `0:` too).
DEVICE_KEY = r"cpu|[0-9]+"


def any_case(word: str) -> str:
    """`word` as a case-insensitive regular expression without flags: JSON Schema patterns
    (ECMA-262) have no inline `(?i)`."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


# The sizes `parse_bytes` takes, as a JSON Schema pattern built from the same unit table.
SIZE_PATTERN = (
    r"^\s*[0-9]+(\.[0-9]+)?\s*("
    + "|".join(any_case(unit) for unit in sorted(_UNITS, key=len, reverse=True) if unit)
    + r")?\s*$"
)


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


def device_key(value: object) -> str:
    """A device key as a string (`0:` in YAML is an integer); `disk` passes for the
    budget validators to refuse by name."""
    key = str(value)
    if key != "disk" and not re.fullmatch(DEVICE_KEY, key):
        raise ValueError(f"expected `cpu` or a GPU index such as 0, got {key!r}")
    return key


ByteSize = Annotated[
    int,
    BeforeValidator(parse_bytes),
    Field(gt=0),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "exclusiveMinimum": 0},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "description": "A byte count, or a number and a unit: 22GiB, 512MiB, 1.5 GB.",
            "examples": ["22GiB", "512MiB", "1.5 GB", 1073741824],
        }
    ),
]
DeviceKey = Annotated[str, BeforeValidator(device_key)]
# What the JSON schema says of a device mapping's keys (`disk` is refused by both).
DEVICE_KEYS_SCHEMA: JsonDict = {"propertyNames": {"pattern": f"^({DEVICE_KEY})$"}}


class Strict(BaseModel):
    # No setting is infinite or NaN: a timeout of .inf never fires, an interval of 1e-300
    # is a busy loop (see the intervals' own lower bounds).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The accepted range of each sampling setting, for requests and the registry alike (see
# `SamplingFields` in protocol.py for what each means and why these bounds).
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=1_000_000)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10, allow_inf_nan=False)]
# Stop strings, as a request may send them (OpenAI's limit of 8), so a default can never
# fail the requests it is filled into.
MAX_STOPS = 8
MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Generation(Strict):
    """Generation defaults; a request overrides them field by field."""

    max_new_tokens: int = Field(
        256, gt=0, description="Tokens to generate when a request does not say."
    )
    temperature: Temperature | None = Field(
        None, description="Sampling temperature in [0, 2]; 0 is greedy. Unset: the model's own."
    )
    top_p: TopP | None = Field(
        None, description="Nucleus sampling in (0, 1]; 1 is off. Unset: the model's own."
    )
    top_k: TopK | None = Field(
        None, description="Sample from the k most likely tokens; 0 is off. Unset: the model's own."
    )
    repetition_penalty: RepetitionPenalty | None = Field(
        None, description="Penalty in [0.01, 10] for tokens already seen; 1 is off."
    )
    stop: list[StopString] = Field(
        [], max_length=MAX_STOPS, description="Strings that end a reply (at most 8)."
    )


class Limits(Strict):
    """What one request may ask of this model, and how many it serves at once."""

    max_new_tokens: int = Field(
        4096, gt=0, description="The most tokens a request may ask to generate."
    )
    context_length: int | None = Field(
        None,
        gt=0,
        description=(
            "Prompt plus reply, in tokens. Unset: the smaller of the model config's limit and "
            "the tokenizer's `model_max_length`; lower clamps it."
        ),
    )
    max_concurrency: int = Field(32, gt=0, description="Requests generating at once.")
    max_queue: int = Field(
        256, ge=0, description="Requests waiting for a slot; beyond it a request gets 429."
    )
    queue_timeout_s: float = Field(
        60.0, gt=0, description="Seconds a request waits in the queue before it gets 503."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a reply may take before the request gets 504."
    )
    # Messages in one request (the seed route counts system, each history turn, the prompt):
    # the work a request costs before the model sees it grows with this count.
    max_messages: int = Field(1024, gt=0, description="Messages in one request.")


class Batching(Strict):
    """How requests to this model share its forward passes."""

    max_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description=(
            "Requests that decode together. auto: sized by the worker after loading, the rows "
            "whose KV cache at the full context fits 80% of the memory its devices have left, "
            "at most limits.max_concurrency and 64 (gateway/worker/sizing.py)."
        ),
    )
    # No gather window by default (as Triton's dynamic batcher): rows that arrive while a
    # batch runs are batched anyway, and a window only delays every request that finds
    # the engine idle (5 ms cost a lone 16-token request 20% on the benchmark model).
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Milliseconds a request that finds the engine idle waits for company.",
    )
    # Rows join and leave a running batch between decoding steps, for models whose cache
    # the engine can splice (transformers' own decoder-only models with full attention);
    # other models, or `false`, batch whole `generate` calls (gateway/worker/decoding.py).
    continuous: bool = Field(
        True,
        description=(
            "Requests join and leave a running batch between decoding steps (transformers' own "
            "decoder-only models); false, or other models, batch whole `generate` calls."
        ),
    )


class PythonEnv(Strict):
    """Either requirements installed into a model-local venv, or an existing interpreter."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["requirements"], "properties": {"requirements": {"minItems": 1}}},
                {
                    "required": ["python"],
                    "properties": {"python": {"type": "string", "minLength": 1}},
                },
            ]
        }
    )

    requirements: list[str] = Field(
        [], description="pip requirements installed into this model's own venv under `envs_dir`."
    )
    python: str | None = Field(
        None, description="An existing interpreter to run the worker on (a path or a name on PATH)."
    )

    @model_validator(mode="after")
    def _one_of(self) -> PythonEnv:
        if bool(self.requirements) == bool(self.python):
            raise ValueError("give either `requirements` (a list) or `python` (a path), not both")
        return self


class Upstream(Strict):
    """A remote OpenAI-compatible server that serves this model instead of a local worker."""

    url: str = Field(description="Base URL of the remote OpenAI-compatible server.")
    model: str | None = Field(
        None, description="The model name upstream. Unset: this entry's name."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the upstream's API key."
    )


Engine = Literal["transformers", "vllm", "command"]
# The placeholders a `command` argv may name, filled at each start (backends/engines/argv.py).
COMMAND_PLACEHOLDERS = ("port", "host", "model_path", "socket", "name")
# Flags the gateway owns when it starts vLLM: it must know where the engine listens and
# under what name, and it talks to the engine without a key.
GATEWAY_OWNED_VLLM_FLAGS = frozenset(
    {"model", "served-model-name", "host", "port", "uds", "api-key", "root-path"}
)
_FLAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
EngineArgValue = str | int | float | bool | list[str | int | float] | dict[str, object]


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0].replace("_", "-").lower()


def check_engine_args(value: list[str] | dict[str, object]) -> list[str] | dict[str, object]:
    """`engine_args` as a list of argv strings or a mapping of flag to value; neither may
    set a flag the gateway owns."""
    if isinstance(value, dict):
        for flag in value:
            if not _FLAG.match(flag.lstrip("-")) or flag.startswith("---"):
                raise ValueError(f"{flag!r} is not a flag name such as max-num-seqs")
        flags = [_flag_name(flag) for flag in value]
    else:
        if any("\x00" in item for item in value):
            raise ValueError("an engine argument may not contain a NUL character")
        flags = [_flag_name(item) for item in value if item.startswith("-")]
    # vLLM's parser takes any unambiguous prefix of a long flag (`--por` is `--port`).
    owned = sorted({o for f in flags if f for o in GATEWAY_OWNED_VLLM_FLAGS if o.startswith(f)})
    if owned:
        raise ValueError(
            f"--{owned[0]} is set by the gateway (from the entry and its own port); "
            "leave it out of `engine_args`, also as a prefix of it"
        )
    return value


class CommandEngine(Strict):
    """Any OpenAI-compatible server, started by the gateway for this model."""

    argv: list[str] = Field(
        min_length=1,
        description=(
            "The command and its arguments; {port}, {host}, {model_path}, {socket} and {name} "
            "are filled at each start ({{ and }} for literal braces)."
        ),
    )
    ready_path: str = Field(
        "/health",
        pattern=r"^/[^\s]*$",
        description="Path that answers 200 once the server is ready; also its health probe.",
    )

    @field_validator("argv")
    @classmethod
    def _known_placeholders(cls, argv: list[str]) -> list[str]:
        import string

        for item in argv:
            if "\x00" in item:
                raise ValueError("an argument may not contain a NUL character")
            try:
                parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(item)]
            except ValueError as exc:
                raise ValueError(f"{item!r}: {exc} (write {{{{ and }}}} for braces)") from None
            fields = [f for f, _, _ in parsed if f is not None]
            if any(spec or conv for f, spec, conv in parsed if f is not None):
                raise ValueError(
                    f"{item!r}: a placeholder is filled as it is: no format spec or conversion"
                )
            unknown = [f for f in fields if f not in COMMAND_PLACEHOLDERS]
            if unknown:
                raise ValueError(
                    f"{item!r} names {{{unknown[0]}}}; the placeholders are "
                    + ", ".join(f"{{{p}}}" for p in COMMAND_PLACEHOLDERS)
                )
        return argv

    def names(self, placeholder: str) -> bool:
        return any("{" + placeholder + "}" in item for item in self.argv)


Hub = Literal["local", "modelscope", "huggingface"]
DType = Literal["float32", "bfloat16", "float16", "auto"]
# `auto`: flash_attention_2 where flash-attn is installed and the GPU, dtype and model
# support it, else sdpa where the model supports it, else the model's own default.
Attention = Literal["auto", "flash_attention_2", "sdpa", "eager"]
GpuIndex = Annotated[int, Field(ge=0)]
# Emptiness is refused by `ModelEntry` with its own message; the schema says it as minItems.
GpuList = Annotated[
    list[GpuIndex],
    WithJsonSchema({"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}),
]


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


class Replicas(Strict):
    """How many copies of a model a Ray cluster runs (`serve --cluster`; one machine runs one)."""

    min: int = Field(
        0,
        ge=0,
        le=1024,
        strict=True,
        description=(
            "Replicas kept while deployed. 0: the cluster scales the model to zero after its "
            "idle_unload_s (never, when it has none) and back on the next request."
        ),
    )
    max: int = Field(1, ge=1, le=1024, strict=True, description="The most replicas it scales to.")
    target_ongoing_requests: float = Field(
        2.0,
        gt=0,
        le=100_000,
        description="Requests in flight per replica that the autoscaler aims for.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) exceeds replicas.max ({self.max})")
        return self


ResourceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$")]


class ModelEntry(Strict):
    """One model: where its weights come from, how it loads, and how it serves."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["source"], "properties": {"source": {"type": "string"}}},
                {"required": ["upstream"], "properties": {"upstream": {"type": "object"}}},
            ]
        }
    )

    description: str | None = Field(None, description="Shown in /v1/models.")
    source: str | None = Field(
        None,
        description=(
            "A local path (relative to this file) or a hub id; exactly one of `source` and "
            "`upstream`."
        ),
    )
    hub: Hub = Field("local", description="Where `source` lives.")
    revision: str | None = Field(
        None,
        description="Hub revision. Unset: `master` on ModelScope, `main` on Hugging Face.",
    )
    cache_dir: str | None = Field(
        None, description="This model's own snapshot cache instead of `gateway.cache_dir`."
    )
    auto_pull: bool = Field(True, description="Fetch missing weights on first use.")
    upstream: Upstream | None = Field(
        None,
        description=(
            "A remote OpenAI-compatible server that serves this name instead of a local worker."
        ),
    )
    engine: Engine = Field(
        "transformers",
        description=(
            "What serves the model: `transformers` (the gateway's own worker), `vllm` (vLLM's "
            "OpenAI server, started in `python_env`) or `command` (any OpenAI-compatible "
            "server started by `command`)."
        ),
    )
    engine_args: list[str] | dict[str, EngineArgValue] | None = Field(
        None,
        description=(
            "Extra vLLM flags: a list of arguments, or a mapping of flag to value (true: the "
            "bare flag, false: left out, a list: several values, a mapping: JSON)."
        ),
    )
    command: CommandEngine | None = Field(
        None, description="For `engine: command`: how to start the server."
    )
    adapter: str = Field(
        "chat_template",
        description="The prompt family: a name from adapters/.",
        json_schema_extra={"enum": list(ADAPTERS)},
    )
    dtype: DType = Field(
        "auto",
        description=(
            "Weights' dtype. auto: float32 on CPU; on GPU bfloat16, or float16 where a GPU is "
            "older than compute capability 8.0."
        ),
    )
    devices: Literal["cpu"] | GpuList = Field(
        "cpu", description="`cpu`, or a list of GPU indices such as [0, 1]."
    )
    max_memory: dict[DeviceKey, ByteSize] | None = Field(
        None,
        description=(
            "GPU index to size, one for every GPU in `devices` (unset: each GPU's free memory); "
            "naming `cpu` allows CPU offload. Disk offload is never used."
        ),
        json_schema_extra=DEVICE_KEYS_SCHEMA,
    )
    attention: Attention = Field(
        "auto",
        description=(
            "Attention kernel. auto: flash_attention_2 where flash-attn, the GPU, the dtype "
            "and the model allow it, else sdpa where the model supports it, else the model's own."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Run the model's own modeling code (in its worker only)."
    )
    python_env: PythonEnv | None = Field(
        None,
        description="The worker's own Python. Unset: the gateway's interpreter.",
    )
    env: dict[str, str] = Field(
        {},
        description="Environment variables for the worker (never a key source of the registry).",
    )
    threads: int | None = Field(
        None,
        gt=0,
        le=1024,
        strict=True,
        description=(
            "Intra-op threads of a CPU worker. Unset: its share of the cores, less one left to "
            "the gateway, among the CPU workers running at launch (gateway/backends/threads.py)."
        ),
    )
    system_prompt: str | None = Field(
        None, description="Added when a request brings no system message."
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        description=(
            "The chat prompt format, over the adapter's: inline Jinja (text with `{%` or "
            "`{{`), or a template file (relative to this file). The worker renders it with the "
            "tokenizer; vLLM gets it as `--chat-template`."
        ),
    )
    generation: Generation = Field(Generation(), description="Defaults a request may override.")
    limits: Limits = Field(Limits(), description="Per-request and concurrency limits.")
    batching: Batching = Field(Batching(), description="How requests are batched.")
    idle_unload_s: float | None = Field(
        None, ge=0, description="Unload after this many idle seconds, over the gateway's."
    )
    pinned: bool = Field(False, description="Never unloaded for being idle, never evicted.")
    memory_bytes: ByteSize | None = Field(
        None,
        description="The model's footprint for memory budgets, when its weight files cannot tell.",
    )
    planning_config: str | None = Field(
        None,
        description=(
            "A directory with config.json (and remote modeling code) that `llm-gateway plan` "
            "reads when the weights are not downloaded."
        ),
    )
    replicas: Replicas = Field(
        Replicas(), description="Copies on a Ray cluster, and their autoscaling (cluster only)."
    )
    resources: dict[ResourceName, Annotated[float, Field(gt=0, le=1e9)]] = Field(
        {},
        description=(
            "Custom Ray resources each replica needs, beyond the GPUs of `devices` and the "
            "CPUs of `threads` (cluster only): a node label such as `{a100: 1}`."
        ),
    )

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

    @field_validator("engine_args")
    @classmethod
    def _engine_args(
        cls, value: list[str] | dict[str, object] | None
    ) -> list[str] | dict[str, object] | None:
        return None if value is None else check_engine_args(value)

    @model_validator(mode="after")
    def _source_or_upstream(self) -> ModelEntry:
        self._check_engine()
        if self.engine == "command":
            pass  # a command may start a server that finds its own weights
        elif (self.source is None) == (self.upstream is None):
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

    def _check_engine(self) -> None:
        if self.engine != "transformers" and self.upstream is not None:
            raise ValueError(f"`upstream` serves the model itself: drop `engine: {self.engine}`")
        if self.engine == "command":
            if self.command is None:
                raise ValueError("`engine: command` needs `command: {argv: [...]}`")
            if self.command.names("model_path") and self.source is None:
                raise ValueError("the command names {model_path}: give `source`")
        elif self.command is not None:
            raise ValueError("`command` is only for `engine: command`")
        if self.chat_template is not None and (self.engine == "command" or self.upstream):
            raise ValueError(
                "`chat_template` is for the gateway's own worker and vLLM; a command or an "
                "upstream server formats prompts itself"
            )
        if self.engine_args is not None and self.engine != "vllm":
            raise ValueError(
                "`engine_args` is only for `engine: vllm` (a command carries its own arguments)"
            )
        if self.engine == "vllm" and "VLLM_API_KEY" in self.env:
            raise ValueError(
                "env.VLLM_API_KEY is --api-key: the gateway talks to its engine without a key "
                "(put keys in gateway.auth)"
            )
        if "RAY_AUTH_TOKEN" in self.env:
            raise ValueError(
                "env.RAY_AUTH_TOKEN is the cluster's secret: the gateway reads it from its own "
                "environment or RAY_AUTH_TOKEN_PATH, never from models.yaml"
            )
        if self.threads is not None and (self.engine != "transformers" or self.upstream):
            raise ValueError(
                "`threads` is for the gateway's own worker; give an engine its threads "
                "through its own flags or `env`"
            )

    @property
    def is_remote(self) -> bool:
        return self.upstream is not None

    @property
    def relays(self) -> bool:
        """Served by a server the gateway relays to (vLLM, a command, a remote upstream)
        rather than its own worker: request fields it does not read pass through."""
        return self.upstream is not None or self.engine != "transformers"


class Auth(Strict):
    """API keys are never written in the file: name an environment variable or a key file."""

    api_keys_env: str | None = Field(
        None, description="Environment variable holding comma-separated API keys."
    )
    api_keys_file: str | None = Field(
        None, description="File of API keys, one a line (`#` comments)."
    )
    admin_keys_env: str | None = Field(
        None, description="Environment variable holding comma-separated keys for /admin/*."
    )
    admin_keys_file: str | None = Field(
        None,
        description="File of keys for /admin/*, one a line. Without admin keys, API keys open it.",
    )


ClusterAddress = Annotated[
    str,
    StringConstraints(
        pattern=r"^ray(:auto|:[A-Za-z0-9_.\[\]:-]{1,250}|://[A-Za-z0-9_.\[\]:-]{1,250})?$"
    ),
]


def cluster_only_settings(entry: ModelEntry) -> list[str]:
    """The settings of an entry that only a cluster applies."""
    fields = ("replicas", "resources")
    return [name for name in fields if name in entry.model_fields_set]


class GatewaySettings(Strict):
    """The gateway process: where it listens, its timeouts, budgets and caches."""

    host: str = Field("127.0.0.1", description="Interface `serve` binds (--host overrides).")
    port: int = Field(6006, ge=0, le=65535, description="Port `serve` binds (--port overrides).")
    default_model: str | None = Field(
        None, description="The model POST / serves; a name under `models`."
    )
    idle_unload_s: float | None = Field(
        None,
        ge=0,
        description="Unload a model idle this many seconds. Unset: never.",
    )
    load_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a request waits for its model to load before 503."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="Seconds unloading or shutdown waits for requests in flight."
    )
    probe_interval_s: float = Field(
        5.0, ge=0.1, description="Seconds between health probes of each ready worker."
    )
    probe_failures: int = Field(
        3, gt=0, description="Consecutive failed probes before the worker is replaced."
    )
    memory_budget: dict[DeviceKey, ByteSize] = Field(
        {},
        description="Device to the bytes loaded models may hold there; others are unlimited.",
        json_schema_extra=DEVICE_KEYS_SCHEMA,
    )
    max_body_bytes: int = Field(
        4 * 2**20, gt=0, description="Request bodies larger than this get 413."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "A client connection must send a whole request header within this time of opening "
            "(or of its previous response), else it is closed (gateway/api/connections.py)."
        ),
    )
    max_connections: int = Field(
        1024,
        gt=0,
        description=(
            "Open client connections at most (lowered to fit the descriptor limit); beyond it "
            "the oldest idle one is closed."
        ),
    )
    cache_dir: str = Field(".cache", description="Where hub snapshots live.")
    envs_dir: str = Field(".cache/envs", description="Where per-model Python environments live.")
    auto_build_envs: bool = Field(
        True,
        description=(
            "Build a model's missing `python_env` on its first load (pip's output in its "
            "progress and the log); false: the load fails naming `llm-gateway env build`."
        ),
    )
    watch_config: bool = Field(
        True, description="Reload this file when it changes (also on SIGHUP and /admin/reload)."
    )
    cors_origins: list[str] = Field([], description="Browser origins allowed by CORS.")
    auth: Auth = Field(Auth(), description="Where API keys come from (never this file).")
    playground: bool = Field(
        True, description="Serve the web playground at /playground; false: 404."
    )
    cluster: ClusterAddress | None = Field(
        None,
        description=(
            "Serve the models on a Ray cluster (`serve --cluster` overrides): `ray` starts a "
            "local one; `ray:auto` or `ray:HOST:PORT` joins one by its GCS address; "
            "`ray://HOST:PORT` goes through Ray Client. Unset: this machine alone."
        ),
    )

    @field_validator("memory_budget")
    @classmethod
    def _no_disk_budget(cls, value: dict[str, int]) -> dict[str, int]:
        if "disk" in value:
            raise ValueError("disk is not a budgeted device: name `cpu` or GPU indices")
        return value


def _model_names_schema() -> JsonDict:
    """`models` keys as JSON Schema: the name pattern, no reserved route (in any case)."""
    reserved = "|".join(any_case(name) for name in sorted(RESERVED_NAMES))
    return {"pattern": MODEL_NAME.pattern, "not": {"pattern": f"^({reserved})$"}}


class Registry(Strict):
    """models.yaml: the gateway's settings and every model it serves."""

    gateway: GatewaySettings = Field(GatewaySettings(), description="The gateway process.")
    models: dict[str, ModelEntry] = Field(
        description=(
            "Every model, by name: its route (POST /<name>) and its OpenAI `model`. Letters, "
            "digits, '.', '_', '-', at most 64, and not a route of the gateway."
        ),
        json_schema_extra={"propertyNames": _model_names_schema()},
    )


def key_sources(registry: Registry) -> frozenset[str]:
    """The environment variables the registry reads keys from."""
    auth = registry.gateway.auth
    names = {auth.api_keys_env, auth.admin_keys_env}
    names |= {e.upstream.api_key_env for e in registry.models.values() if e.upstream}
    return frozenset(name for name in names if name)
