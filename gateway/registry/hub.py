"""Where a model's weights live: a local path, or a snapshot in a hub's cache.

`cache_dir` in a registry entry is what you would pass as `cache_dir=` to that hub's own
`snapshot_download`; without it, `<gateway.cache_dir>/modelscope` or
`<gateway.cache_dir>/huggingface/hub`. The layouts looked for, in that directory:

- huggingface: `models--<org>--<name>/snapshots/<commit>/`, where a branch or tag revision
  (default `main`) is turned into its commit by `refs/<revision>`;
- modelscope >= 1.38: `models/<org>--<name>/snapshots/<revision, default master>/`;
- modelscope <= 1.37: `models/<org>/<name>/`, `hub/models/<org>/<name>/`, or `<org>/<name>/`
  (the last is what `snapshot_download(id, cache_dir=...)` made, as in the seed scripts;
  dots in names were written as `___`).

A snapshot counts as present once it holds a config.json. Downloading is `gateway.worker.pull`
(run by `llm-gateway pull` and by a worker on first use); this module never imports a hub
library.
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.registry.config import ModelEntry

COMMIT = re.compile(r"^[0-9a-f]{40}$")


class WeightsMissing(Exception):
    """The weights are not on disk and may not, or could not, be fetched."""


def hub_cache(entry: ModelEntry, default_cache: Path) -> Path:
    """The directory the hub library takes as `cache_dir`."""
    if entry.cache_dir:
        return Path(entry.cache_dir).expanduser()
    if entry.hub == "modelscope":
        return default_cache / "modelscope"
    return default_cache / "huggingface" / "hub"


def candidates(entry: ModelEntry, repo_id: str, default_cache: Path) -> list[Path]:
    """Every directory the snapshot of `repo_id` may occupy, preferred first."""
    root = hub_cache(entry, default_cache)
    owner, _, name = repo_id.partition("/")
    if entry.hub == "modelscope":
        legacy = name.replace(".", "___")
        return [
            root / "models" / f"{owner}--{name}" / "snapshots" / (entry.revision or "master"),
            root / "models" / owner / legacy,
            root / "hub" / "models" / owner / legacy,
            root / owner / legacy,
        ]
    repo = root / f"models--{owner}--{name}"
    commit = hf_commit(repo, entry.revision or "main")
    return [repo / "snapshots" / commit] if commit else []


def hf_commit(repo: Path, revision: str) -> str | None:
    if COMMIT.match(revision):
        return revision
    ref = repo / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def locate(entry: ModelEntry, weights: str, default_cache: Path) -> Path | None:
    """The local directory holding the model, or None when it is not downloaded."""
    if entry.hub == "local":
        path = Path(weights)
        return path if path.exists() else None
    return next(
        (p for p in candidates(entry, weights, default_cache) if (p / "config.json").exists()),
        None,
    )


def local_source_problems(entry: ModelEntry) -> list[tuple[str, str]]:
    """(message, hint) for each reason a `hub: local` source cannot load, found on disk now."""
    if entry.hub != "local" or entry.source is None:
        return []
    path = Path(entry.source)
    if not path.exists():
        hint = "fix the path (a relative one starts at the registry file's folder), or set `hub:`"
        return [(f"the folder {path} does not exist", hint + " for a hub id")]
    if not path.is_dir():
        return [(f"{path} is not a folder", "point `source` at the checkpoint's folder")]
    if entry.trust_remote_code and "." in path.name:
        # transformers before 4.57, which remote-code checkpoints often pin, imports the code
        # as `transformers_modules.<folder>`, and a dot splits that module name ("No module
        # named 'transformers_modules.<prefix>'"); the entry's environment may be either.
        renamed = path.name.replace(".", "_")
        return [
            (
                f"the folder name {path.name!r} contains a dot, so transformers cannot import "
                "its remote code",
                f"rename the folder, e.g. to {renamed!r}, and `source` with it",
            )
        ]
    return []


def missing_message(name: str, entry: ModelEntry, weights: str) -> str:
    if entry.hub == "local":
        return f"model {name!r}: the path {weights} does not exist"
    why = " and `auto_pull` is off" if not entry.auto_pull else ""
    return (
        f"model {name!r} ({entry.hub}:{weights}) is not downloaded{why}; "
        f"run `llm-gateway pull {name}`"
    )


def moving_revision(entry: ModelEntry) -> bool:
    """Remote code fetched by a branch or tag name can change under the same name."""
    if not entry.trust_remote_code or entry.hub == "local":
        return False
    return not COMMIT.match(entry.revision or "")


def remote_code_warnings(models: dict[str, ModelEntry]) -> list[str]:
    """One warning per entry that would run hub code fetched by a moving revision."""
    return [
        f"models.{name}: trust_remote_code runs code from {entry.hub}:{entry.source} at "
        f"{_revision(entry)}, which can change under that "
        "name; pin `revision` to a commit hash you have read"
        for name, entry in models.items()
        if moving_revision(entry)
    ]


def _revision(entry: ModelEntry) -> str:
    return f"revision {entry.revision!r}" if entry.revision else "its default branch"
