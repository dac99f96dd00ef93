"""A model's `chat_template:` in the registry: inline Jinja text, or a file beside models.yaml.

Text with Jinja markup (`{%` or `{{`) is the template itself; anything else is a path,
relative to the registry file, read when the registry loads (a regular file of at most
`MAX_TEMPLATE_BYTES`) and compiled then, so a Jinja syntax error fails the load like any other
mistake in the file. `check` also renders each template once on a sample conversation, in
the sandbox the worker renders in (`adapters.chat_template`: transformers' environment,
bounded in time and size), but with undefined names as errors, so a typo shows there rather
than as a silently empty piece of every prompt.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "What is 2+2?"},
)
# What transformers passes a template besides the messages; the tokens are stand-ins here,
# since `check` knows no tokenizer.
_SAMPLE_CONTEXT: dict[str, object] = {
    "add_generation_prompt": True,
    "tools": None,
    "documents": None,
    **{f"{kind}_token": f"<{kind}>" for kind in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")},
}
# The largest templates on the Hub (tool use, reasoning) are tens of KiB; like models.yaml.
MAX_TEMPLATE_BYTES = 256 << 10


class TemplateProblem(Exception):
    """The template cannot be read, compiled or rendered (a message for the user)."""


def is_inline(value: str) -> bool:
    return "{%" in value or "{{" in value


def read(value: str, base: Path) -> str:
    """The template text of a `chat_template:` value (a path resolves against `base`)."""
    if is_inline(value):
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever. The open
        # follows symlinks, and fstat describes what it opened.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TemplateProblem(f"the chat template file {path} does not exist") from None
    except OSError as exc:
        raise _unreadable(path, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise TemplateProblem(
                f"the chat template file {path} is {_kind(mode)}, not a regular file"
            )
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise _unreadable(path, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_TEMPLATE_BYTES:
        raise TemplateProblem(
            f"the chat template file {path} is larger than {MAX_TEMPLATE_BYTES} bytes"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable(path, str(exc)) from None


def _unreadable(path: Path, reason: str) -> TemplateProblem:
    return TemplateProblem(f"cannot read the chat template file {path}: {reason}")


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def compile_check(template: str) -> None:
    """Compile the template as the worker will; TemplateProblem if it is not valid Jinja."""
    _compiled(template, strict=False)


def _compiled(template: str, strict: bool) -> jinja2.Template:
    import jinja2

    from adapters.chat_template import compile_template

    try:
        return compile_template(template, strict)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # e.g. nesting too deep for Python to compile
        raise TemplateProblem(f"cannot compile the template: {type(exc).__name__}: {exc}") from None


def render_sample(template: str) -> str:
    """The template rendered on SAMPLE_CONVERSATION, or TemplateProblem saying what broke."""
    import jinja2

    from adapters.chat_template import RenderLimit, TemplateRefused, render_bounded

    compiled = _compiled(template, strict=True)
    messages = [dict(m) for m in SAMPLE_CONVERSATION]
    try:
        return render_bounded(compiled, {**_SAMPLE_CONTEXT, "messages": messages})
    except jinja2.UndefinedError as exc:
        raise TemplateProblem(f"undefined in the template: {exc.message}") from None
    except TemplateRefused as exc:
        raise TemplateProblem(f"the template refused the sample conversation: {exc}") from None
    except RenderLimit as exc:
        raise TemplateProblem(f"rendering failed: {exc}") from None
    except Exception as exc:  # a type error in the template, a recursion, ...
        raise TemplateProblem(f"rendering failed: {type(exc).__name__}: {exc}") from None
