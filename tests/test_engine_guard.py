"""The guard of a started engine takes its whole process tree down, however it ends
(gateway/backends/engines/guard.py): real processes, a tree that tries to escape."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, alive, wait_until

STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _close_pipes() -> Iterator[None]:
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


# A tree that escapes in every way a server's helpers do: a child that leaves the session,
# a double-forked orphan, a child that ignores SIGTERM. It prints their pids, then waits.
TREE = """\
import os, signal, subprocess, sys, time
pids = [subprocess.Popen(["sleep", "600"], start_new_session=True).pid]
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(600)
    os._exit(0)
stubborn = subprocess.Popen(
    [sys.executable, "-c", "import signal as s, time; s.signal(15, s.SIG_IGN); time.sleep(600)"]
)
pids.append(stubborn.pid)
time.sleep(0.5)
print(" ".join(map(str, pids)), flush=True)
code = int(sys.argv[1]) if len(sys.argv) > 1 else None
if code is not None:
    sys.exit(code)
time.sleep(600)
"""


def start(tmp_path: Path, *args: str, grace: str = "1") -> subprocess.Popen[str]:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    return track(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.backends.engines.guard",
                grace,
                "--",
                sys.executable,
                str(script),
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    )


def track(process: subprocess.Popen[str]) -> subprocess.Popen[str]:
    STARTED.append(process)
    return process


def tree_of(guard: int) -> set[int]:
    from gateway.backends.engines.guard import descendants

    return set(descendants(guard))


def settled_tree(guard: subprocess.Popen[str]) -> set[int]:
    assert guard.stdout is not None
    named = {int(p) for p in guard.stdout.readline().split()}
    assert wait_until(lambda: len(tree_of(guard.pid)) >= 4, timeout=10)
    tree = tree_of(guard.pid)
    assert named <= tree  # the session leaver and the stubborn one are still below the guard
    return tree


def test_eof_on_stdin_takes_down_the_whole_tree_even_what_left_the_session(
    tmp_path: Path,
) -> None:
    guard = start(tmp_path)
    tree = settled_tree(guard)
    assert guard.stdin is not None
    guard.stdin.close()  # what the gateway's death looks like to the guard
    assert guard.wait(20) == 128 + signal.SIGTERM
    assert not alive(tree)


def test_sigterm_stops_the_tree_and_kills_what_ignores_it_after_the_grace(
    tmp_path: Path,
) -> None:
    guard = start(tmp_path, grace="1")
    tree = settled_tree(guard)
    began = time.monotonic()
    guard.send_signal(signal.SIGTERM)
    guard.wait(20)
    assert not alive(tree)
    assert time.monotonic() - began >= 1.0  # the stubborn child had its grace


def test_an_engine_that_exits_takes_its_leftovers_with_it_and_its_code_is_kept(
    tmp_path: Path,
) -> None:
    guard = start(tmp_path, "3")
    assert guard.stdout is not None
    named = {int(p) for p in guard.stdout.readline().split()}
    assert guard.wait(20) == 3
    assert not alive(named)


def test_a_guard_whose_parent_is_sigkilled_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    parent = track(
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import subprocess, sys, time\n"
                "g = subprocess.Popen([sys.executable, '-m', 'gateway.backends.engines.guard', "
                "'1', '--',"
                f" sys.executable, {str(script)!r}], stdin=subprocess.PIPE,"
                " start_new_session=True)\n"
                "print(g.pid, flush=True)\n"
                "time.sleep(600)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
    )
    assert parent.stdout is not None
    guard = int(parent.stdout.readline())
    assert wait_until(lambda: len(tree_of(guard)) >= 4, timeout=10)
    tree = tree_of(guard) | {guard}
    parent.kill()
    parent.wait()
    assert wait_until(lambda: not alive(tree), timeout=20), alive(tree)


def test_a_command_that_cannot_start_is_reported() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.backends.engines.guard", "1", "--", "/no/such/engine"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 127
    assert "cannot start '/no/such/engine'" in done.stderr


# An engine and its helper in the guard's process group, as vLLM's processes are.
GROUPED = """\
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(helper.pid, flush=True)
time.sleep(600)
"""


async def test_a_killed_guard_takes_its_process_group_with_it(tmp_path: Path) -> None:
    from gateway.backends.engines.process import EngineProcess
    from gateway.backends.upstream import Upstream

    script = tmp_path / "grouped.py"
    script.write_text(GROUPED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    upstream = Upstream("http://127.0.0.1:9", label="nothing")
    engine = await EngineProcess.start(
        "m", "command", [sys.executable, str(script)], env, upstream, "/health", grace_s=1
    )
    guard = engine.process.pid
    assert wait_until(lambda: len(tree_of(guard)) >= 2, timeout=10)
    tree = tree_of(guard)
    os.kill(guard, signal.SIGKILL)  # the guard cannot take anything down itself
    assert await engine.exited == -signal.SIGKILL
    assert wait_until(lambda: not alive(tree), timeout=10), alive(tree)
    await engine.stop(1.0)
