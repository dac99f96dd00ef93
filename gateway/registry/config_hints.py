"""Fix hints for registry mistakes: the accepted forms of a key, what the file says and the
default, and "did you mean" for names and keys (found in the schema, `registry/config.py`)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway.registry.config import Registry


def hint_for(loc: tuple[str | int, ...]) -> str:
    hints = {
        "devices": "write `devices: cpu` or a list of GPU indices such as `devices: [0, 1]`",
        "dtype": "one of float32, bfloat16, float16, auto (float32 on CPU, bfloat16 on GPU)",
        "hub": "one of local, modelscope, huggingface",
        "max_memory": "map devices to sizes, e.g. `max_memory: {0: 22GiB, 1: 22GiB, cpu: 64GiB}`",
        "memory_budget": "map devices to sizes, e.g. `memory_budget: {0: 22GiB, cpu: 16GiB}`",
    }
    for part in reversed(loc):
        if isinstance(part, str) and part in hints:
            return hints[part]
    return ""


def value_hint(loc: tuple[str | int, ...], value: object) -> str:
    """For a bad scalar: what the file says, and the default that leaving the key out gives."""
    if not isinstance(value, (str, int, float, bool)):
        return ""
    given = f"the file says {json.dumps(value, ensure_ascii=False)}"
    default = getattr(field_at(loc), "default", None)
    if isinstance(default, (str, int, float, bool)):
        return f"{given}; leave the key out to get the default, {json.dumps(default)}"
    return given


def field_at(loc: tuple[str | int, ...]) -> FieldInfo | None:
    """The schema field a YAML path points at (keys of mappings such as `models:` skipped)."""
    model: type[BaseModel] | None = Registry
    field = None
    skip_key = False
    for part in loc:
        if skip_key:
            skip_key = False
            continue
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return None
        skip_key = getattr(field.annotation, "__origin__", None) is dict
        model = model_of(field.annotation)
    return field


def suggest_key(key: str, parent: tuple[str | int, ...]) -> str:
    known = known_keys(parent)
    if difflib.get_close_matches(key, known, n=1, cutoff=0.6):
        return suggest(key, known)
    nested = [f"{k}.{sub}" for k in known for sub in known_keys((*parent, k))]
    close = difflib.get_close_matches(key, [n.split(".")[-1] for n in nested], n=1, cutoff=0.75)
    if close:
        return f"did you mean {next(n for n in nested if n.endswith('.' + close[0]))!r}?"
    return suggest(key, known)


def known_keys(loc: tuple[str | int, ...]) -> list[str]:
    model: type[BaseModel] | None = Registry
    skip_key = False
    for part in loc:
        if skip_key:  # a key of a mapping such as `models:`; its value has the model type
            skip_key = False
            continue
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return []
        skip_key = getattr(field.annotation, "__origin__", None) is dict
        model = model_of(field.annotation)
    return sorted(model.model_fields) if model and not skip_key else []


def model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_of(arg)
        if found is not None:
            return found
    return None


def suggest(word: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"choose one of: {', '.join(choices)}" if choices else ""
