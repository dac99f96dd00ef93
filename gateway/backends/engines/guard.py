"""The guard of a started engine: it owns the engine's whole process tree.

    python -m gateway.backends.engines.guard GRACE_S -- ARGV...

The gateway starts the guard in a session of its own, with stdin a pipe it holds. The
guard starts ARGV and becomes a child subreaper, so every process of the tree that is
orphaned (vLLM's engine core, a double-forked helper, one that left the session) becomes
its child rather than init's. The tree is taken down, SIGTERM then SIGKILL after
GRACE_S, when:

- the guard gets SIGTERM or SIGINT (the gateway stops the engine),
- its stdin reaches EOF (the gateway died, even by SIGKILL),
- the engine's main process exits (what it left behind goes with it).

The guard exits with the engine's exit code (128 + N for a signal N). Linux only: the
subreaper is a prctl; elsewhere the process group is all that is cleaned up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.1


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Every live process below `root`, read from /proc (children before grandchildren)."""
    parents: dict[int, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    text = stat.read().decode(errors="replace")
            except OSError:
                continue
            # The name may hold spaces and parentheses: fields start after the last ')'.
            fields = text[text.rfind(")") + 2 :].split()
            if len(fields) > 1 and fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


class Tree:
    """The engine's main process and, through the subreaper, everything below the guard.
    One `waitpid(-1)` loop reaps them all and keeps the engine's own status."""

    def __init__(self, argv: list[str]) -> None:
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        self.engine = os.posix_spawnp(argv[0], argv, dict(os.environ), file_actions=actions)
        self.status: int | None = None

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.engine:
                self.status = os.waitstatus_to_exitcode(status)

    @property
    def engine_alive(self) -> bool:
        self.reap()
        return self.status is None

    def signal_engine(self, sig: int) -> None:
        if self.engine_alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.engine, sig)

    def signal_rest(self, sig: int) -> None:
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def empty(self) -> bool:
        self.reap()
        return not descendants(os.getpid())

    def take_down(self, grace_s: float) -> None:
        """SIGTERM to the engine first (it may stop its own children in order), then to
        the rest of the tree once it is gone; SIGKILL what is left after the grace."""
        self.signal_engine(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not self.engine_alive:
                self.signal_rest(signal.SIGTERM)
            if self.empty():
                return
            time.sleep(POLL_S)
        self.signal_rest(signal.SIGKILL)
        end = time.monotonic() + 5.0
        while not self.empty() and time.monotonic() < end:
            time.sleep(POLL_S)


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m gateway.backends.engines.guard GRACE_S -- ARGV...", file=sys.stderr)
        return 2
    grace_s = float(args[0])
    stop = threading.Event()
    become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        tree = Tree(args[2:])
    except OSError as exc:
        print(f"cannot start {args[2]!r}: {exc}", file=sys.stderr)
        return 127

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):
                pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while tree.engine_alive and not stop.wait(POLL_S):
        pass
    tree.take_down(grace_s)
    code = tree.status if tree.status is not None else -signal.SIGKILL
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
