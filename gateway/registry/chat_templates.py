"""A model's `chat_template:` in the registry: inline Jinja text, or a file beside models.yaml.

Text with Jinja markup (`{%` or `{{`) is the template itself; anything else is a path,
relative to the registry file, read when the registry loads. `check` renders each template
once on a sample conversation the way transformers does (a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`), but with undefined names as errors, so a typo shows there
rather than as a silently empty piece of every prompt.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

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


class TemplateProblem(Exception):
    """The template cannot be read or rendered (a message for the user)."""


def is_inline(value: str) -> bool:
    return "{%" in value or "{{" in value


def read(value: str, base: Path) -> str:
    """The template text of a `chat_template:` value (a path resolves against `base`)."""
    if is_inline(value):
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateProblem(f"the chat template file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateProblem(f"cannot read the chat template file {path}: {exc}") from None


def render_sample(template: str) -> str:
    """The template rendered on SAMPLE_CONVERSATION, or TemplateProblem saying what broke."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.loopcontrols"],
    )
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        compiled = environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    messages = [dict(m) for m in SAMPLE_CONVERSATION]
    try:
        return compiled.render(messages=messages, **_SAMPLE_CONTEXT)
    except jinja2.UndefinedError as exc:
        raise TemplateProblem(f"undefined in the template: {exc.message}") from None
    except Exception as exc:  # the template's own raise_exception, or a type error in it
        raise TemplateProblem(f"rendering failed: {type(exc).__name__}: {exc}") from None
