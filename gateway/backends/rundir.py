"""The gateway's run directory: worker sockets, the package shim and the chat template files
given to engines, one per gateway.

It lives in the temporary directory as `llmgw-XXXXXXXX` and holds an `owner` file with the
gateway's pid, that process's start time and its pid namespace. A gateway removes its own
directory when it stops; one that was killed cannot, so every gateway, as it starts,
removes the directories whose owner is no longer running (a pid alone is not enough: pids
are reused, and the start time tells a new process from the old owner). A directory
without an owner record, or owned by a live process, another user or another pid
namespace (a container sharing /tmp), is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "llmgw-"
OWNER = "owner"
# sockaddr_un.sun_path holds 108 bytes with the terminating NUL on Linux (104 on macOS).
SUN_PATH_MAX = 104 if os.uname().sysname == "Darwin" else 108
# The longest socket name the launcher makes: "w", up to ten digits, ".sock".
SOCKET_NAME_MAX = 16


class RunDirTooLong(Exception):
    """The temporary directory's path leaves no room for a unix socket name."""


def create(parent: Path | None = None) -> Path:
    """Make this gateway's run directory, after clearing those of dead gateways."""
    base = Path(parent or tempfile.gettempdir())
    clear_stale(base)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
    longest = len(os.fsencode(path)) + len("/") + SOCKET_NAME_MAX + len("\0")
    if longest > SUN_PATH_MAX:
        shutil.rmtree(path, ignore_errors=True)
        raise RunDirTooLong(
            f"the run directory {path} is too long for a unix socket path "
            f"({SUN_PATH_MAX - 1} bytes at most); set TMPDIR to a shorter directory"
        )
    _write_atomically(path / OWNER, _owner_record())
    return path


def socket_path(run_dir: Path, sequence: int) -> str:
    """The socket of the `sequence`-th worker: every worker instance has its own."""
    name = f"w{sequence}.sock"
    assert len(name) <= SOCKET_NAME_MAX
    return str(run_dir / name)


def chat_template_path(run_dir: Path, sequence: int, text: str) -> Path:
    """A file holding the chat template of the `sequence`-th engine (vLLM reads a file)."""
    path = run_dir / f"t{sequence}.jinja"
    _write_atomically(path, text)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def clear_stale(base: Path) -> list[Path]:
    """Remove the run directories under `base` whose owning gateway has died."""
    removed = []
    for path in base.glob(f"{PREFIX}*"):
        with contextlib.suppress(OSError, ValueError):
            if path.is_dir() and not path.is_symlink() and _owner_is_dead(path):
                shutil.rmtree(path)
                removed.append(path)
    if removed:
        log.info("removed %d run directories of gateways no longer running", len(removed))
    return removed


def _owner_is_dead(path: Path) -> bool:
    if path.stat().st_uid != os.getuid():
        return False
    # OSError (no owner file) or ValueError (not a record): leave the directory alone.
    pid_text, started, namespace = (path / OWNER).read_text().split()
    if namespace != _pid_namespace():
        return False  # a gateway in another pid namespace: its pid means nothing here
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, and someone else's
    now = _start_time(pid)
    return started != "-" and now is not None and now != started  # the pid was reused


def _owner_record() -> str:
    """`pid start-time pid-namespace`; `-` for what this system does not tell."""
    pid = os.getpid()
    return f"{pid} {_start_time(pid) or '-'} {_pid_namespace()}"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the name


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"


def _write_atomically(path: Path, text: str) -> None:
    """Another gateway clearing stale directories never reads half a record."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
