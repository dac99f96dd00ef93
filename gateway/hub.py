"""Where a model's weights live: a local path, or a snapshot in a hub's cache.

Cache layouts (under the gateway's cache directory, or the entry's own `cache_dir`):
- modelscope:  <cache>/modelscope/models/<org>--<name>/snapshots/<revision or master>/
- huggingface: <cache>/huggingface/hub/models--<org>--<name>/snapshots/<revision>/
A snapshot counts as present once it holds a config.json.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import ModelEntry


class WeightsMissing(Exception):
    """The weights are not on disk and may not, or could not, be fetched."""


def cache_root(entry: ModelEntry, default_cache: Path) -> Path:
    return Path(entry.cache_dir).expanduser() if entry.cache_dir else default_cache


def snapshot_dir(entry: ModelEntry, repo_id: str, default_cache: Path) -> Path:
    """The directory a hub snapshot of `repo_id` occupies (present or not)."""
    root = cache_root(entry, default_cache)
    org_name = repo_id.replace("/", "--")
    if entry.hub == "modelscope":
        return (
            root / "modelscope" / "models" / org_name / "snapshots" / (entry.revision or "master")
        )
    return (
        root
        / "huggingface"
        / "hub"
        / f"models--{org_name}"
        / "snapshots"
        / (entry.revision or "main")
    )


def locate(entry: ModelEntry, weights: str, default_cache: Path) -> Path | None:
    """The local directory holding the model, or None when it is not downloaded."""
    if entry.hub == "local":
        path = Path(weights)
        return path if path.exists() else None
    path = snapshot_dir(entry, weights, default_cache)
    return path if (path / "config.json").exists() else None


def missing_message(name: str, entry: ModelEntry, weights: str) -> str:
    if entry.hub == "local":
        return f"model {name!r}: the path {weights} does not exist"
    return (
        f"model {name!r} ({entry.hub}:{weights}) is not downloaded; run `llm-gateway pull {name}`"
    )
