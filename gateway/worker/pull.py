"""Download a model's snapshot from its hub into the cache `gateway.registry.hub` looks in.

    python -m gateway.worker.pull < {"name": ..., "entry": {...}, "cache": dir}

`llm-gateway pull NAME` runs this module (a progress bar on stderr); a worker calls
`download` itself when its weights are missing and `auto_pull` is on (progress on its
control channel). The hub libraries are imported here only, lazily: modelscope imports
torch, which the gateway process never does.

Before anything else the hub's host is probed (DNS, then a TCP connect, a few seconds at
most), so an unreachable hub fails at once with a clear message instead of after the
libraries' own retries (modelscope takes about 22 s).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.registry.config import ModelEntry
from gateway.registry.hub import WeightsMissing, hub_cache

Report = Callable[[int, int | None], None]  # bytes on disk so far, expected total (or None)
PROBE_TIMEOUT_S = 3.0


def endpoint(hub: str) -> str:
    if hub == "huggingface":
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    return os.environ.get("MODELSCOPE_ENDPOINT", f"https://{domain}")


def probe(hub: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise WeightsMissing at once if the hub cannot be reached from here."""
    if hub == "huggingface" and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true"):
        raise WeightsMissing("HF_HUB_OFFLINE is set, so nothing can be downloaded")
    url = urlsplit(endpoint(hub))
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WeightsMissing(
            f"cannot reach the {hub} hub at {host}:{port} ({reason}); check the network or a "
            "proxy, or put the snapshot in the cache yourself (see docs/SEED_MODELS.md)"
        ) from None


def download(entry: ModelEntry, repo: str, cache: Path, report: Report) -> Path:
    """Fetch the snapshot of `repo`; `report` hears the bytes on disk about twice a second."""
    probe(entry.hub)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # ours is enough
    root = hub_cache(entry, cache)
    root.mkdir(parents=True, exist_ok=True)
    total = _expected_bytes(entry, repo)
    watched = _watched_dir(entry, repo, root)
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(watched, total, report, done), name="pull-progress", daemon=True
    )
    watcher.start()
    try:
        path = Path(_snapshot(entry, repo, root))
    except Exception as exc:
        raise WeightsMissing(f"downloading {entry.hub}:{repo} failed: {exc}") from exc
    finally:
        done.set()
        watcher.join()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())  # links followed
    report(size, size)
    return path


def _snapshot(entry: ModelEntry, repo: str, root: Path) -> str:
    if entry.hub == "huggingface":
        from huggingface_hub import snapshot_download

        return str(snapshot_download(repo, revision=entry.revision, cache_dir=str(root)))
    from modelscope.hub.snapshot_download import snapshot_download as ms_download

    return str(ms_download(repo, revision=entry.revision, cache_dir=str(root)))


def _expected_bytes(entry: ModelEntry, repo: str) -> int | None:
    """The snapshot's size from the hub's file listing; None if the listing says nothing."""
    try:
        if entry.hub == "huggingface":
            from huggingface_hub import HfApi

            info = HfApi().model_info(repo, revision=entry.revision, files_metadata=True)
            return sum(f.size or 0 for f in info.siblings or []) or None
        from modelscope.hub.api import HubApi

        files = HubApi().get_model_files(repo, revision=entry.revision or "master", recursive=True)
        return sum(int(f.get("Size") or 0) for f in files) or None
    except Exception:  # progress without a total is still progress
        return None


def _watched_dir(entry: ModelEntry, repo: str, root: Path) -> Path:
    if entry.hub == "huggingface":
        return root / f"models--{repo.replace('/', '--')}"
    return root / "models" / repo.replace("/", "--")


def _watch(path: Path, total: int | None, report: Report, done: threading.Event) -> None:
    while not done.wait(0.5):
        report(_bytes_under(path), total)


def _bytes_under(path: Path) -> int:
    size = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = Path(dirpath) / name
            if not full.is_symlink():  # HF snapshots link to blobs: count each file once
                try:
                    size += full.stat().st_size
                except OSError:
                    continue
    return size


class Bar:
    """A terminal progress bar on stderr (one line per 10% when stderr is not a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1

    def __call__(self, done: int, total: int | None) -> None:
        line = progress_text(done, total, time.monotonic() - self.started)
        tenth = int(10 * done / total) if total else -1
        if self.tty:
            sys.stderr.write(f"\r{self.label}: {line}\033[K")
        elif tenth > self.last_tenth:
            sys.stderr.write(f"{self.label}: {line}\n")
        self.last_tenth = max(tenth, self.last_tenth)
        sys.stderr.flush()


def progress_text(done: int, total: int | None, seconds: float) -> str:
    mib = 2**20
    rate = f"{done / mib / seconds:.1f} MiB/s" if seconds > 0 else ""
    if not total:
        return f"{done / mib:.1f} MiB  {rate}"
    filled = int(30 * min(done, total) / total)
    bar = "#" * filled + "." * (30 - filled)
    return f"[{bar}] {100 * done / total:5.1f}%  {done / mib:.1f}/{total / mib:.1f} MiB  {rate}"


def main() -> int:
    request: dict[str, Any] = json.loads(sys.stdin.read())
    name, entry = request["name"], ModelEntry.model_validate(request["entry"])
    assert entry.source is not None
    bar = Bar(name)
    try:
        path = download(entry, entry.source, Path(request["cache"]), bar)
    except WeightsMissing as exc:
        print(f"\n{name}: {exc}" if bar.tty else f"{name}: {exc}", file=sys.stderr)
        return 1
    print(("\n" if bar.tty else "") + f"{name}: downloaded to {path}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
