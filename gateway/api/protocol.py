"""Wire models: the seed API and the OpenAI-compatible API, plus the resolved sampling settings.

Shared by the gateway and the worker (pydantic only, no web framework, no torch).
Precedence for every generation setting: request > registry entry > adapter/model defaults.
The gateway applies the first two (`resolve_*`); the worker fills what is still unset.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from gateway.registry.config import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    Generation,
    RepetitionPenalty,
    Seed,
    Temperature,
    TopK,
    TopP,
)


def _valid_unicode(value: str) -> str:
    # JSON can escape a lone UTF-16 surrogate ("\ud800"). Such a string has no UTF-8 form:
    # it can reach neither a worker nor a tokenizer, so it is refused with the field's name.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text must be valid Unicode: a lone surrogate at character {exc.start}"
        ) from None
    return value


UNICODE_TEXT = AfterValidator(_valid_unicode)
# Every string a client sends is a WireStr (tests/test_wire_fields.py walks every route).
WireStr = Annotated[str, UNICODE_TEXT]


def _not_a_bool(value: object) -> object:
    # `Literal[1]` compares equal to True; booleans are not numbers.
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


def _a_bool(value: object) -> object:
    # `Literal[False]` compares equal to 0; numbers are not booleans.
    if not isinstance(value, bool):
        raise ValueError("expected a boolean")
    return value


NO_LOGPROBS = (
    "this model's worker (engine: transformers) returns no log-probabilities; "
    "a model on engine: vllm does"
)


def _chat_logprobs(value: object) -> object:
    if not isinstance(value, bool):
        raise ValueError("expected a boolean")
    if value:
        raise ValueError(NO_LOGPROBS)
    return value


def _completion_logprobs(value: object) -> object:
    # On /v1/completions `logprobs` is how many alternatives to return per token.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a whole number")
    if value:
        raise ValueError(NO_LOGPROBS)
    return value


ChatLogprobs = Annotated[Literal[False], BeforeValidator(_chat_logprobs)]
CompletionLogprobs = Annotated[Literal[0], BeforeValidator(_completion_logprobs)]


# A per-request keep-alive: seconds to stay loaded after this request; 0 unloads at once,
# -1 keeps the model loaded until evicted or unloaded by an admin.
KeepAlive = Annotated[float, Field(ge=-1, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(gt=0)]
OnlyZero = Annotated[float, Field(ge=0, le=0)]  # an OpenAI penalty this gateway does not apply
OnlyOne = Annotated[Literal[1], BeforeValidator(_not_a_bool)]
OnlyFalse = Annotated[Literal[False], BeforeValidator(_a_bool)]


class Wire(BaseModel):
    # Strict: a boolean is not an integer, and "10" is not a number. JSON integers are
    # still accepted for float fields (strict mode allows int -> float).
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Wire):
    type: Literal["text"]
    text: WireStr


class ChatMessage(Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: WireStr | list[TextPart]
    name: WireStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Wire):
    include_usage: bool = False


class SamplingFields(Wire):
    """Settings shared by every route; None means "use the model's default".

    Accepted ranges (a value outside one is a 400 naming the field; NaN and infinities
    never pass):

    - `temperature` in [0, 2], as the OpenAI API; below 1e-5 it is greedy.
    - `top_p` in (0, 1], as vLLM; 1 is off, and the most likely token always stays.
    - `top_k` in [0, 1,000,000]; 0 is off, and a value beyond the vocabulary is off too.
    - `repetition_penalty` in [0.01, 10]; 1 is off. vLLM takes any value above 0, but a
      seen token's logit is divided (or multiplied) by it, so a vanishing penalty only
      overflows those logits to infinity: it can do nothing but repeat the prompt.
    - `seed` in [0, 2**63 - 1], what a torch generator takes.

    Whatever passes, or a model's own defaults bring, the worker's sampler copes with per
    row: a row whose logits leave no token to choose fails alone (`sampling.py`).
    """

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: WireStr | list[WireStr] | None = None
    stream: bool = False
    keep_alive: KeepAlive | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(
                f"stop takes at most {MAX_STOPS} non-empty strings"
                f" of at most {MAX_STOP_CHARS} characters"
            )
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class _OpenAIFields(SamplingFields):
    model: WireStr = Field(..., min_length=1)
    n: OnlyOne = 1
    user: WireStr | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: OnlyZero | None = None
    frequency_penalty: OnlyZero | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.text().strip() for m in messages):
            raise ValueError("messages must contain a user message with non-empty content")
        return messages

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_OpenAIFields):
    prompt: WireStr = Field(..., min_length=1)
    max_tokens: MaxTokens | None = None
    logprobs: CompletionLogprobs | None = None  # type: ignore[assignment]
    echo: OnlyFalse = False

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return _not_blank(value)

    def requested_tokens(self) -> int | None:
        return self.max_tokens


class HistoryTurn(Wire):
    role: Literal["system", "user", "assistant"]
    content: WireStr


# [[user, assistant], ...] as chatglm-style clients send; JSON has no tuples, so a list is
# accepted here despite strict mode.
HistoryPair = Annotated[tuple[WireStr, WireStr], Field(strict=False)]


class SeedRequest(SamplingFields):
    """The seed scripts' body: `max_length` is the number of new tokens."""

    prompt: WireStr = Field(..., min_length=1)
    max_length: MaxTokens | None = None
    history: list[HistoryTurn | HistoryPair] = []
    system: WireStr | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return _not_blank(value)

    def message_count(self) -> int:
        """How many chat messages `to_messages` makes, counted without making them."""
        turns = sum(2 if isinstance(turn, tuple) else 1 for turn in self.history)
        return turns + 1 + (1 if self.system else 0)

    def to_messages(self) -> list[ChatMessage]:
        messages = [ChatMessage(role="system", content=self.system)] if self.system else []
        for turn in self.history:
            if isinstance(turn, tuple):  # [[user, assistant], ...] as chatglm-style clients send
                messages.append(ChatMessage(role="user", content=turn[0]))
                messages.append(ChatMessage(role="assistant", content=turn[1]))
            else:
                messages.append(ChatMessage(role=turn.role, content=turn.content))
        messages.append(ChatMessage(role="user", content=self.prompt))
        return messages


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be blank")
    return value


class SeedReply(BaseModel):
    response: str
    status: int = 200
    time: str
    model: str
    finish_reason: str | None = None
    usage: Usage | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


SeedReply.model_rebuild()


def resolve_chat(
    request: ChatCompletionRequest,
    defaults: Generation,
    system_prompt: str | None,
    fill_max_tokens: bool = True,
) -> ChatCompletionRequest:
    """Fill what the request left unset from the registry entry; add its system prompt.

    `fill_max_tokens=False` leaves an unset token count to the model's own worker, which
    knows the entry's default and clamps it to the room the prompt leaves in the context.
    """
    messages = request.messages
    if system_prompt and not any(m.role in ("system", "developer") for m in messages):
        messages = [ChatMessage(role="system", content=system_prompt), *messages]
    tokens = request.requested_tokens() or (defaults.max_new_tokens if fill_max_tokens else None)
    return request.model_copy(
        update={
            "messages": messages,
            "max_tokens": tokens,
            "max_completion_tokens": None,
            **_sampling_defaults(request, defaults),
        }
    )


def resolve_completion(
    request: CompletionRequest, defaults: Generation, fill_max_tokens: bool = True
) -> CompletionRequest:
    tokens = request.requested_tokens() or (defaults.max_new_tokens if fill_max_tokens else None)
    return request.model_copy(
        update={"max_tokens": tokens, **_sampling_defaults(request, defaults)}
    )


def _sampling_defaults(request: SamplingFields, defaults: Generation) -> dict[str, Any]:
    fields = ("temperature", "top_p", "top_k", "repetition_penalty")
    update: dict[str, Any] = {
        f: getattr(defaults, f) for f in fields if getattr(request, f) is None
    }
    if request.stop is None and defaults.stop:
        update["stop"] = list(defaults.stop)
    return update


def seed_to_chat(request: SeedRequest, model: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model=model,
        messages=request.to_messages(),
        max_tokens=request.max_length,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=request.stop,
        stream=request.stream,
        stream_options=StreamOptions(include_usage=True) if request.stream else None,
        keep_alive=request.keep_alive,
    )


def now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# -- Relayed requests ------------------------------------------------------------------------
# A model served by vLLM, a command or a remote upstream gets the client's body as sent: the
# gateway reads and checks only what it acts on (model, stream, token limits, keep_alive,
# the sampling settings it fills in, the messages it counts and gives a system prompt) and
# relays every other field (`tools`, `response_format`, `logprobs`, `n`, ...) untouched for
# the engine to accept or refuse. Strings anywhere in the body must still be valid Unicode.

MAX_RELAYED_CHOICES = 128


def _unicode_everywhere(value: object, where: str) -> None:
    """Refuse a lone surrogate anywhere in relayed JSON, naming the field. One C-speed
    encode checks the whole value; only a value that fails is walked to find where."""
    try:
        json.dumps(value, ensure_ascii=False, check_circular=False).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError, RecursionError):
        pass  # walk it: the walk finds the surrogate, or finds none and lets the value be
    else:
        return
    # Iterative: a body is as deep as the JSON parser allowed. Paths are built only for
    # the item that fails, and keys in them are escaped (a key may be the surrogate).
    stack: list[tuple[object, tuple[Any, ...]]] = [(value, (where,))]
    while stack:
        item, trail = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"{_path(trail)}: text must be valid Unicode: a lone surrogate at "
                    f"character {exc.start}"
                ) from None
        elif isinstance(item, dict):
            for key, inner in item.items():
                stack.append((key, (trail, key)))
                stack.append((inner, (trail, key)))
        elif isinstance(item, list):
            stack.extend((inner, (trail, i)) for i, inner in enumerate(item))


def _path(trail: tuple[Any, ...]) -> str:
    """`messages[0].content` from the nested (parent, key) pairs of the walk."""
    parts: list[str] = []
    while len(trail) == 2:
        trail, key = trail
        if isinstance(key, int):
            parts.append(f"[{key}]")
        else:
            parts.append("." + str(key).encode("utf-8", "backslashreplace").decode())
    return str(trail[0]) + "".join(reversed(parts))


# Other names engines give the new-token count (llama.cpp, Ollama, TGI; `max_completion_tokens`
# on /v1/completions). Relayed untouched they would escape `limits.max_new_tokens`.
TOKEN_COUNT_ALIASES = ("max_completion_tokens", "n_predict", "num_predict", "max_new_tokens")
# What engines take beyond the gateway's own ranges: vLLM's top_k -1 is "off", and an
# engine's seed may be any 64-bit integer.
RelayedTopK = Annotated[int, Field(ge=-1, le=1_000_000)]
RelayedSeed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class RelayedStreamOptions(BaseModel):
    """`stream_options` as an engine may take it (vLLM's `continuous_usage_stats`)."""

    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class Relayed(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def _check_extra(self, where: str) -> None:
        for key, value in (self.model_extra or {}).items():
            if not where and key in TOKEN_COUNT_ALIASES:
                raise ValueError(
                    f"{key}: the gateway reads the new-token count from max_tokens"
                    f"{' or max_completion_tokens' if hasattr(self, 'messages') else ''}, "
                    "which its limits bound; send it there"
                )
            _unicode_everywhere(key, where or "body")
            _unicode_everywhere(value, f"{where}.{key}" if where else key)


class RelayedMessage(Relayed):
    """A chat message as an engine may take it: any role (`tool`), content as text, parts
    of any type (images), or none (an assistant's `tool_calls`)."""

    role: WireStr = Field(..., min_length=1)
    content: WireStr | list[dict[WireStr, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = self.content or []
        return "".join(p["text"] for p in parts if isinstance(p.get("text"), str))


class RelayedChatRequest(ChatCompletionRequest, Relayed):
    model_config = ConfigDict(extra="allow", strict=True)

    messages: list[RelayedMessage] = Field(..., min_length=1)  # type: ignore[assignment]
    top_k: RelayedTopK | None = None
    seed: RelayedSeed | None = None
    stream_options: RelayedStreamOptions | None = None  # type: ignore[assignment]
    n: Annotated[int, Field(ge=1, le=MAX_RELAYED_CHOICES)] = 1  # type: ignore[assignment]
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logprobs: bool | None = None  # type: ignore[assignment]

    @field_validator("messages")
    @classmethod
    def _has_user_text(cls, messages: list[RelayedMessage]) -> list[RelayedMessage]:  # type: ignore[override]
        for index, message in enumerate(messages):
            message._check_extra(f"messages[{index}]")
            if isinstance(message.content, list):
                _unicode_everywhere(message.content, f"messages[{index}].content")
        return messages

    @model_validator(mode="after")
    def _relayed_fields(self) -> RelayedChatRequest:
        self._check_extra("")
        return self


class RelayedCompletionRequest(CompletionRequest, Relayed):
    model_config = ConfigDict(extra="allow", strict=True)

    prompt: WireStr | list[WireStr] | list[int] | list[list[int]] = Field(..., min_length=1)  # type: ignore[assignment]
    top_k: RelayedTopK | None = None
    seed: RelayedSeed | None = None
    stream_options: RelayedStreamOptions | None = None  # type: ignore[assignment]
    n: Annotated[int, Field(ge=1, le=MAX_RELAYED_CHOICES)] = 1  # type: ignore[assignment]
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # type: ignore[assignment]
    echo: bool = False  # type: ignore[assignment]

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str | list[Any]) -> str | list[Any]:  # type: ignore[override]
        if isinstance(value, str):
            return _not_blank(value)
        return value

    @model_validator(mode="after")
    def _relayed_fields(self) -> RelayedCompletionRequest:
        self._check_extra("")
        return self
