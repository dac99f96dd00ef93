"""Any model whose tokenizer ships a chat template (most modern instruct models), and the
registry's own `chat_template:` over any adapter (`TemplatePrompts`).

Message content is text, never markup: content that spells one of the tokenizer's special
tokens (`<|end|>`, `<|system|>`) is tokenized as the characters it is, while the template's
own markup keeps its special tokens. Such content is rendered around: the template is
rendered with a placeholder for each message's content, its markup split at its special
tokens (placed by id), and the text between them, content included, tokenized with special
tokens split. Content that spells no special token takes the plain path (render, then
tokenize), which is what the model was trained on, token for token.

A template is code from a model repository or a registry: it is rendered here (not by
`apply_chat_template`) in the sandboxed environment transformers builds (the same options,
filters and globals), with bounds transformers lacks, so that no template can wedge the
worker: a deadline (`RENDER_DEADLINE_S`, enforced in the rendering thread by a trace
function on the template's own frames), a cap on the characters rendered (64 per token of
the model's context, at least 1 MiB), and the same cap on every `+`, `*` and `~` result and
every macro or `{% set %}` block inside it, checked before the result is built where it can
be. A template that breaks (an error in it, or past a bound) is `TemplateFailed`, the
server's problem; one that refuses the conversation with `raise_exception` is the client's
(a ValueError, as every other prompt the adapter refuses).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from itertools import islice
from types import FrameType
from typing import Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from adapters.base import Message, Prompt, TransformersAdapter

# Private-use characters: no template writes them, so they mark where each content goes.
_SLOT = re.compile("\ue000([0-9]+)\ue001")

# A chat template renders in well under a millisecond; a few seconds is only ever a loop.
RENDER_DEADLINE_S = 2.0
# What one render may produce: more characters than the context could hold as tokens
# (64 a token is far beyond any vocabulary's average) is a template gone wrong.
MIN_OUTPUT_CHARS = 1 << 20
OUTPUT_CHARS_PER_TOKEN = 64
# Integer arithmetic past this many bits (a `**` or `*` of huge numbers) runs in C, where
# the deadline cannot stop it; no template needs numbers this large.
MAX_INT_BITS = 1 << 16
_BATCH = 16  # pieces of output measured at a time
_CLIP = 300  # characters of an exception's message quoted back
# The file name Jinja gives code compiled from a string: the template's frames carry it.
_TEMPLATE_FILE = "<template>"
# The cap of the render in progress in this thread (and a floor outside any render).
_output_limit: ContextVar[int] = ContextVar("chat_template_output_limit", default=MIN_OUTPUT_CHARS)


class TemplateFailed(Exception):
    """The chat template itself failed: an error in it, or past a bound (the message says
    which, for the client). The server's problem, not the request's."""


class TemplateRefused(jinja2.TemplateError):
    """The template's own `raise_exception(...)`: it refuses the conversation."""


class RenderLimit(Exception):
    """A render passed its deadline or its size cap (the message says which)."""


def _check_size(size: int) -> None:
    limit = _output_limit.get()
    if size > limit:
        raise RenderLimit(f"it builds a text or list of more than {limit} characters or items")


_SIZED = (str, list, tuple)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse, before it is computed, a `+`, `*` or `**` whose result is past the cap."""
    if operator == "+":
        if isinstance(left, _SIZED) and isinstance(right, _SIZED):
            _check_size(len(left) + len(right))
    elif operator == "*":
        if isinstance(left, _SIZED) and isinstance(right, int):
            _check_size(len(left) * right)
        elif isinstance(right, _SIZED) and isinstance(left, int):
            _check_size(len(right) * left)
        elif (
            isinstance(left, int)
            and isinstance(right, int)
            and left.bit_length() + right.bit_length() > MAX_INT_BITS
        ):
            raise RenderLimit(f"it computes a number of more than {MAX_INT_BITS} bits")
    elif (
        operator == "**"
        and isinstance(left, int)
        and isinstance(right, int)
        and right > 0
        and right * max(left.bit_length() - 1, 0) > MAX_INT_BITS
    ):
        raise RenderLimit(f"it computes a number of more than {MAX_INT_BITS} bits")


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with every `~` result checked against the cap (`~` is not an
    operator the sandbox intercepts), and nothing computed while compiling."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_size(")
        super().visit_Concat(node, frame)
        self.write(")")

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        # Only literals are folded at compile time: a constant filter call (`'x'|center(10**9)`)
        # would otherwise run while compiling, outside every bound (the environment is not
        # `optimized` for the same reason).
        if not isinstance(node, nodes.TemplateData | nodes.Const):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    # Intercepted operators are never folded at compile time, so no constant is built there.
    intercepted_binops = frozenset({"+", "*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return self.binop_table[operator](left, right)

    @staticmethod
    def concat(pieces: Iterable[str]) -> str:
        """Joins the output of every macro, call block and `{% set %}` block."""
        parts = list(pieces)
        _check_size(sum(map(len, parts)))
        return "".join(parts)

    @staticmethod
    def checked_size(value: Any) -> Any:
        if isinstance(value, str):
            _check_size(len(value))
        return value


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers' templates use to mark the
    assistant's tokens for training masks: here, its body."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's own convention)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Macro) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise TemplateRefused(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which a prompt must not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in a template, without the dict class itself (no type-hackery)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """`namespace(...)`, refusing underscore-prefixed attributes (CPython's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Jinja's own signature trick, so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot set an underscore-prefixed attribute ({name!r})"
            )


@lru_cache(maxsize=2)
def environment(strict: bool = False) -> jinja2.Environment:
    """The sandbox chat templates render in: transformers' (`trim_blocks`, `lstrip_blocks`,
    loop controls, `{% generation %}`, its `tojson`, `raise_exception`, `strftime_now`, `dict`
    and `namespace`), bounded. `strict`: an undefined name is an error (`check`)."""
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_Generation, "jinja2.ext.loopcontrols"],
        undefined=jinja2.StrictUndefined if strict else jinja2.Undefined,
        optimized=False,  # no constant folding: see _CodeGenerator
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def compile_template(source: str, strict: bool = False) -> jinja2.Template:
    """The template compiled in `environment(strict)`; jinja2.TemplateSyntaxError if it is not
    Jinja. Compiled once per text: rendering a compiled template is thread-safe."""
    return environment(strict).from_string(source)


def render_bounded(
    template: jinja2.Template,
    context: Mapping[str, Any],
    *,
    max_chars: int = MIN_OUTPUT_CHARS,
    deadline_s: float = RENDER_DEADLINE_S,
) -> str:
    """The template rendered on `context`, or RenderLimit once it has run `deadline_s` or
    produced `max_chars` characters. Whatever else the template raises propagates."""
    monotonic = time.monotonic  # a local: the tracer runs on every line of the template
    deadline = monotonic() + deadline_s

    def trace_template(frame: FrameType, event: str, arg: Any) -> Any:
        if monotonic() > deadline:
            # Raising here also ends tracing in this thread; `finally` restores it.
            raise RenderLimit(f"it ran for more than {deadline_s:g} s (a loop that does not end?)")
        return trace_template

    def trace_call(frame: FrameType, event: str, arg: Any) -> Any:
        # Only the template's own code is traced line by line; Jinja's runtime is not.
        return trace_template if frame.f_code.co_filename == _TEMPLATE_FILE else None

    pieces: list[str] = []
    size = 0
    generator = template.generate(**context)
    limit = _output_limit.set(max_chars)
    previous = sys.gettrace()
    sys.settrace(trace_call)
    try:
        # In batches: Python code runs slower while tracing is on, so the pieces are taken
        # and measured by C code (`islice`, `sum`). A piece is the template's own text or a
        # value, and the values that `+`, `*`, `~` and blocks build are within the cap.
        while batch := list(islice(generator, _BATCH)):
            size += sum(map(len, batch))
            if size > max_chars:
                raise RenderLimit(f"it rendered more than {max_chars} characters")
            pieces += batch
    finally:
        sys.settrace(previous)
        _output_limit.reset(limit)
    return "".join(pieces)


def _clip(text: str) -> str:
    return text if len(text) <= _CLIP else f"{text[:_CLIP]}… ({len(text) - _CLIP} more characters)"


class TemplatePrompts:
    """Chat prompts rendered by a Jinja chat template over an adapter's tokenizer: the
    tokenizer's own (`template=None`) or one given by the registry. Everything else (stop
    tokens, decoding, loading) stays the adapter's."""

    def __init__(
        self,
        adapter: TransformersAdapter,
        template: str | None = None,
        *,
        deadline_s: float = RENDER_DEADLINE_S,
    ) -> None:
        self.adapter = adapter
        self.template = template
        self.deadline_s = deadline_s
        self._specials: re.Pattern[str] | None = None
        self._max_chars: int | None = None
        self._tokens: dict[str, Any] | None = None

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        if self.template is None and not getattr(self.adapter.tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; use /v1/completions, "
                "or pick the adapter of its model family in models.yaml"
            )
        specials = self.special_tokens()
        if not any(specials.search(m["content"]) for m in messages):
            text = self.render(messages)
            # Only the template's markup can spell special tokens here, and they are meant.
            # Templates already carry BOS; tokenizing with special tokens added would double it.
            return Prompt(self.adapter.encode(text, add_special_tokens=False, literal=False), text)
        return self.literal_prompt(messages)

    def render(self, messages: Sequence[Message]) -> str:
        """The template rendered as `apply_chat_template(..., add_generation_prompt=True)`
        would, bounded: ValueError when the template refuses the messages, TemplateFailed
        when it breaks."""
        # The tokenizer's own template, when the registry gives none (a named default too).
        source = self.template
        if source is None:
            source = str(self.adapter.tokenizer.get_chat_template())
        context = {
            **self.token_names(),
            "messages": [dict(m) for m in messages],
            "tools": None,
            "documents": None,
            "add_generation_prompt": True,
        }
        try:
            return render_bounded(
                compile_template(source),
                context,
                max_chars=self.max_chars(),
                deadline_s=self.deadline_s,
            )
        except TemplateRefused as exc:  # the template refuses the conversation
            message = f"the chat template refused these messages: {_clip(str(exc))}"
            raise ValueError(message) from exc
        except RenderLimit as exc:
            raise TemplateFailed(f"the chat template failed: {exc}") from exc
        except Exception as exc:  # a bug in the template: a type error, a recursion, ...
            reason = f"{type(exc).__name__}: {_clip(str(exc))}"
            raise TemplateFailed(f"the chat template failed: {reason}") from exc

    def max_chars(self) -> int:
        """The most characters one render may produce (see the module's docstring)."""
        if self._max_chars is None:
            try:
                context = self.adapter.context_length()
            except AttributeError:  # a tokenizer without its model (a tool, a test)
                context = 0
            self._max_chars = max(MIN_OUTPUT_CHARS, OUTPUT_CHARS_PER_TOKEN * context)
        return self._max_chars

    def token_names(self) -> dict[str, Any]:
        """What transformers passes a template besides the messages: the tokenizer's special
        tokens by name (`bos_token`, `eos_token`, ...), as text."""
        if self._tokens is None:
            named = getattr(self.adapter.tokenizer, "special_tokens_map", None) or {}
            self._tokens = {
                str(key): [str(t) for t in value] if isinstance(value, list | tuple) else str(value)
                for key, value in named.items()
            }
        return self._tokens

    def literal_prompt(self, messages: Sequence[Message]) -> Prompt:
        """The prompt with every message's content tokenized as literal text."""
        slots = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        pieces = _SLOT.split(self.render(slots))
        if len(pieces) // 2 < sum(1 for m in messages if m["content"]):
            raise ValueError(
                "this model's chat template rewrites message content, so content that "
                "spells a special token cannot be kept as text; remove the special token"
            )
        encode = self.adapter.encode
        ids: list[int] = []
        text, pending = "", ""
        for index, piece in enumerate(pieces):
            if index % 2:  # a slot: the content, all text
                content = messages[int(piece)]["content"]
                pending += content
                text += content
                continue
            text += piece
            for place, part in enumerate(self.special_tokens().split(piece)):
                if place % 2:  # the template's own special token, placed by id
                    ids += [*encode(pending, literal=True), self.token_id(part)]
                    pending = ""
                else:
                    pending += part
        ids += encode(pending, literal=True)
        return Prompt(ids, text)

    def special_tokens(self) -> re.Pattern[str]:
        """A pattern matching any special token of the tokenizer (longest first), captured."""
        if self._specials is None:
            tokenizer = self.adapter.tokenizer
            tokens = {str(t) for t in tokenizer.all_special_tokens}
            decoder: dict[int, Any] = getattr(tokenizer, "added_tokens_decoder", {})
            tokens |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
            ordered = sorted((t for t in tokens if t), key=len, reverse=True)
            alternatives = "|".join(map(re.escape, ordered)) or "(?!)"  # none: never matches
            self._specials = re.compile(f"({alternatives})")
        return self._specials

    def token_id(self, token: str) -> int:
        return int(self.adapter.tokenizer.convert_tokens_to_ids(token))


class ChatTemplateAdapter(TransformersAdapter):
    name: ClassVar[str] = "chat_template"
    _prompts: TemplatePrompts | None = None

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        return self.prompts.chat_prompt(messages)

    @property
    def prompts(self) -> TemplatePrompts:
        if self._prompts is None:
            self._prompts = TemplatePrompts(self)
        return self._prompts

    def literal_prompt(self, messages: Sequence[Message]) -> Prompt:
        return self.prompts.literal_prompt(messages)

    def token_id(self, token: str) -> int:
        return self.prompts.token_id(token)
