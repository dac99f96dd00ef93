"""Load `models.yaml` into a `Registry`, or fail with every mistake, its YAML path and a hint."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from adapters import ADAPTERS
from gateway.registry import chat_templates, yaml_reader
from gateway.registry import config_hints as hints
from gateway.registry.config import (
    MODEL_NAME,
    RESERVED_NAMES,
    Registry,
    cluster_only_settings,
    key_sources,
)
from gateway.registry.yaml_reader import clip

MAX_MESSAGE = 500  # characters of one message or hint
MAX_ISSUES = 50  # issues rendered; a file that is wrong everywhere needs no longer report


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str
    hint: str = ""
    line: int | None = None

    def __post_init__(self) -> None:
        # A value quoted back can be anything the file holds: keep every message short.
        object.__setattr__(self, "message", clip(self.message, MAX_MESSAGE))
        object.__setattr__(self, "hint", clip(self.hint, MAX_MESSAGE))

    def render(self, filename: str) -> str:
        where = f"{filename}:{self.line}" if self.line else filename
        text = f"{where}: {self.path or '<root>'}: {self.message}"
        return f"{text}\n    hint: {self.hint}" if self.hint else text


class ConfigError(Exception):
    """The file is not a valid registry; `issues` lists every mistake found."""

    def __init__(self, filename: str, issues: Sequence[ConfigIssue]) -> None:
        self.filename = filename
        self.issues = list(issues)
        super().__init__(self.render())

    def render(self) -> str:
        count = f"{len(self.issues)} error{'s' if len(self.issues) != 1 else ''}"
        lines = [f"{self.filename}: {count}"]
        lines += [issue.render(self.filename) for issue in self.issues[:MAX_ISSUES]]
        if len(self.issues) > MAX_ISSUES:
            lines.append(f"... and {len(self.issues) - MAX_ISSUES} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class LoadedRegistry:
    """A validated registry plus where it came from (relative paths resolve against base_dir)."""

    registry: Registry
    path: Path
    digest: str
    text: str = ""  # what was parsed, for finding the line of a path later

    def line(self, loc: tuple[str | int, ...]) -> int | None:
        """The line of the YAML path `loc` in the file as it was read."""
        return _text_line(self.text, loc)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_registry(path: str | Path) -> LoadedRegistry:
    """Read, parse and validate the file; every failure is a ConfigError (blocking I/O)."""
    path = Path(path)
    try:
        data = yaml_reader.read_bytes(path)
        text = yaml_reader.decode(data)
    except yaml_reader.YamlProblem as exc:
        raise ConfigError(str(path), [ConfigIssue("", exc.message, line=exc.line)]) from None
    try:
        registry = _absolutize(parse_registry(text, str(path)), _resolved(path).parent)
    except _PathProblem as exc:
        issue = ConfigIssue("", f"cannot expand the path {exc.value!r}", "no such user's home")
        raise ConfigError(str(path), [issue]) from None
    registry = _with_templates(registry, _resolved(path).parent, text, str(path))
    # The templates read from their own files count too: a reload applies an edit of one.
    digest = hashlib.sha256(data)
    for entry in registry.models.values():
        digest.update((entry.chat_template or "").encode() + b"\0")
    return LoadedRegistry(registry, _resolved(path), digest.hexdigest(), text)


class _PathProblem(Exception):
    def __init__(self, value: str) -> None:
        super().__init__(value)
        self.value = value


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop that appeared after the read
        return path.absolute()


def _absolutize(registry: Registry, base: Path) -> Registry:
    """Make every relative path in the file relative to the file's own directory."""

    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # `~user` for a user this machine does not have
            raise _PathProblem(value) from None
        return str(path if path.is_absolute() else _resolved(base / path))

    models = {}
    for name, entry in registry.models.items():
        update: dict[str, Any] = {
            "cache_dir": resolve(entry.cache_dir),
            "planning_config": resolve(entry.planning_config),
        }
        if entry.hub == "local" and entry.source is not None:
            update["source"] = resolve(entry.source)
        if entry.python_env is not None and entry.python_env.python:
            python = entry.python_env.python
            if "/" in python:  # a bare name such as python3.10 is looked up on PATH
                update["python_env"] = entry.python_env.model_copy(
                    update={"python": resolve(python)}
                )
        models[name] = entry.model_copy(update=update)
    auth = registry.gateway.auth
    key_files = {
        "api_keys_file": resolve(auth.api_keys_file),
        "admin_keys_file": resolve(auth.admin_keys_file),
    }
    settings = registry.gateway.model_copy(
        update={
            "cache_dir": resolve(registry.gateway.cache_dir),
            "envs_dir": resolve(registry.gateway.envs_dir),
            "auth": auth.model_copy(update=key_files),
        }
    )
    return registry.model_copy(update={"gateway": settings, "models": models})


def _with_templates(registry: Registry, base: Path, text: str, filename: str) -> Registry:
    """Every `chat_template:` as its text: a file is read now, so a missing one fails the load,
    and every template is compiled now, so a Jinja syntax error does too (not each request)."""
    issues: list[ConfigIssue] = []
    models = dict(registry.models)
    for name, entry in registry.models.items():
        if entry.chat_template is None:
            continue
        loc = ("models", name, "chat_template")
        try:
            template = chat_templates.read(entry.chat_template, base)
        except chat_templates.TemplateProblem as exc:
            hint = "give a path relative to the registry file, or the template inline"
            issues.append(ConfigIssue(_dotted(loc), str(exc), hint, _text_line(text, loc)))
            continue
        try:
            chat_templates.compile_check(template)
        except chat_templates.TemplateProblem as exc:
            hint = "fix the template's Jinja; `llm-gateway check` also renders it on a sample"
            issues.append(ConfigIssue(_dotted(loc), str(exc), hint, _text_line(text, loc)))
            continue
        models[name] = entry.model_copy(update={"chat_template": template})
    if issues:
        raise ConfigError(filename, issues)
    return registry.model_copy(update={"models": models})


def _text_line(text: str, loc: tuple[str | int, ...]) -> int | None:
    try:
        return _line(yaml_reader.parse(text).root, loc)
    except yaml_reader.YamlProblem:
        return None


def parse_registry(text: str, filename: str = "models.yaml") -> Registry:
    try:
        parsed = yaml_reader.parse(text)
    except yaml_reader.YamlProblem as exc:
        raise ConfigError(filename, [ConfigIssue("", exc.message, line=exc.line)]) from None
    root_node, data = parsed.root, parsed.data
    if not isinstance(data, dict):
        raise ConfigError(filename, [ConfigIssue("", "expected a mapping with a `models:` key")])
    issues = list(_semantic_issues(data, root_node))
    try:
        registry = Registry.model_validate(data)
    except ValidationError as exc:
        issues = _pydantic_issues(exc.errors(), root_node) + issues
        raise ConfigError(filename, sorted(issues, key=lambda i: i.line or 0)) from None
    issues += _key_source_issues(registry, root_node)
    if issues:
        raise ConfigError(filename, issues)
    return registry


def _key_source_issues(registry: Registry, root: yaml.Node | None) -> list[ConfigIssue]:
    """A model's `env:` may not set a key source: workers never see a key (workerenv.py)."""
    secrets = key_sources(registry)
    return [
        ConfigIssue(
            _dotted(("models", name, "env", key)),
            f"{key!r} holds API keys (a key source of the registry); workers never get it",
            "remove it from `env:`",
            _line(root, ("models", name, "env", key)),
        )
        for name, entry in registry.models.items()
        for key in entry.env
        if key in secrets
    ]


def _pydantic_issues(errors: Sequence[Any], root: yaml.Node | None) -> list[ConfigIssue]:
    """One issue per field. A union such as `devices: cpu | [int]` reports a complaint per
    member; keep the most specific (deepest) one, so `devices: [-1]` reads "devices.0 must
    be >= 0" rather than "devices should be 'cpu'"."""
    best: dict[tuple[str | int, ...], tuple[int, ConfigIssue]] = {}
    for err in errors:
        loc = tuple(err["loc"])
        tag = next((i for i, part in enumerate(loc) if _is_union_tag(part)), len(loc))
        kept = best.get(loc[:tag])
        if kept is None or len(loc) > kept[0]:
            best[loc[:tag]] = (len(loc), _issue_from_pydantic(err, root))
    return [issue for _, issue in best.values()]


def _semantic_issues(data: dict[str, Any], root: yaml.Node | None) -> Iterable[ConfigIssue]:
    """Checks that span fields; run on the raw data so they report alongside type errors."""
    models = data.get("models")
    models = models if isinstance(models, dict) else {}
    names = sorted(str(n) for n in models)
    for raw_name, entry in models.items():
        name = str(raw_name)
        loc: tuple[str | int, ...] = ("models", name)
        if name.lower() in RESERVED_NAMES:
            yield ConfigIssue(
                _dotted(loc),
                f"the name {name!r} collides with the gateway route /{name}",
                "rename the model, e.g. " + repr(f"{name}-model"),
                _line(root, loc),
            )
        elif not MODEL_NAME.match(name):
            yield ConfigIssue(
                _dotted(loc),
                f"{name!r} is not a usable model name (it becomes the route /{name})",
                "use letters, digits, '.', '_' or '-', at most 64, starting with a letter or digit",
                _line(root, loc),
            )
        adapter = entry.get("adapter") if isinstance(entry, dict) else None
        if isinstance(adapter, str) and adapter not in ADAPTERS:
            yield ConfigIssue(
                _dotted((*loc, "adapter")),
                f"unknown adapter {adapter!r}",
                hints.suggest(adapter, ADAPTERS),
                _line(root, (*loc, "adapter")),
            )
    settings = data.get("gateway")
    default = settings.get("default_model") if isinstance(settings, dict) else None
    if default is not None and str(default) not in names:
        loc = ("gateway", "default_model")
        yield ConfigIssue(
            _dotted(loc),
            f"{default!r} is not a model in `models`",
            hints.suggest(str(default), names),
            _line(root, loc),
        )


def _issue_from_pydantic(err: Any, root: yaml.Node | None) -> ConfigIssue:
    loc = tuple(p for p in err["loc"] if not _is_union_tag(p)) or tuple(err["loc"])
    line = _line(root, loc)
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        return ConfigIssue(
            _dotted(loc), f"unknown key {key!r}", hints.suggest_key(key, loc[:-1]), line
        )
    if err["type"] == "missing":
        return ConfigIssue(_dotted(loc), "this key is required", f"add `{loc[-1]}:`", line)
    message = str(err["msg"]).removeprefix("Value error, ")
    hint = hints.hint_for(loc) or hints.value_hint(loc, err.get("input"))
    return ConfigIssue(_dotted(loc), message, hint, line)


_UNION_TAG = re.compile(r"[a-z][a-z_-]*\[.*\]|str|int", re.DOTALL)


def _is_union_tag(part: object) -> bool:
    # pydantic adds the union member it tried ("list[...]", "literal['cpu']") to error paths;
    # a key of the file's own ("models:[x") is not one.
    return isinstance(part, str) and _UNION_TAG.fullmatch(part) is not None


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _line(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the YAML node at `loc`, or of its nearest existing ancestor."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if str(kv[0].value) == str(part)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def require_cluster_for(loaded: LoadedRegistry, cluster: bool) -> None:
    """Off a cluster, settings only a cluster applies are refused, never silently unused."""
    if cluster:
        return
    issues = [
        ConfigIssue(
            f"models.{name}.{field}",
            f"`{field}` takes effect only on a Ray cluster",
            "serve with --cluster (or gateway.cluster), or remove it",
            loaded.line(("models", name, field)),
        )
        for name, entry in loaded.registry.models.items()
        for field in cluster_only_settings(entry)
    ]
    if issues:
        raise ConfigError(str(loaded.path), issues)
