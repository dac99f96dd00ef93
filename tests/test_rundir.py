"""The run directory: made short enough for sockets, owned, cleared when its owner is dead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.backends import rundir


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def stale(base: Path, name: str, owner: str | None) -> Path:
    path = base / f"llmgw-{name}"
    path.mkdir()
    (path / "w1.sock").touch()
    if owner is not None:
        (path / "owner").write_text(owner)
    return path


def test_a_new_run_directory_records_its_owner_and_fits_every_socket(tmp_path: Path) -> None:
    path = rundir.create(tmp_path)
    assert path.parent == tmp_path and path.name.startswith("llmgw-")
    pid, start, namespace = (path / "owner").read_text().split()
    assert int(pid) == os.getpid() and start.isdigit() and namespace.startswith("pid:")
    assert [p.name for p in path.iterdir()] == ["owner"]
    longest = rundir.socket_path(path, 10**10 - 1)
    assert len(os.fsencode(longest)) < rundir.SUN_PATH_MAX


def test_each_worker_instance_gets_its_own_socket(tmp_path: Path) -> None:
    paths = {rundir.socket_path(tmp_path, n) for n in range(1, 100)}
    assert len(paths) == 99


def test_the_directories_of_dead_gateways_are_removed_and_no_other(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ours = (rundir.create(elsewhere) / "owner").read_text()
    namespace = ours.split()[2]
    dead = stale(tmp_path, "dead", f"{dead_pid()} 1 {namespace}")
    alive = stale(tmp_path, "alive", ours)
    # The pid was reused: a live process, but not the one that made the directory.
    reused = stale(tmp_path, "reused", f"{os.getpid()} 1 {namespace}")
    # A dead pid of another pid namespace (a container sharing /tmp) tells nothing.
    elsewhere_ns = stale(tmp_path, "namespace", f"{dead_pid()} 1 pid:[1]")
    unowned = stale(tmp_path, "unowned", None)
    other = tmp_path / "something-else"
    other.mkdir()
    (other / "owner").write_text(str(dead_pid()))

    removed = rundir.clear_stale(tmp_path)

    assert sorted(removed) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert alive.exists() and elsewhere_ns.exists() and unowned.exists() and other.exists()


def test_a_garbled_owner_file_leaves_the_directory_alone(tmp_path: Path) -> None:
    garbled = stale(tmp_path, "garbled", "not a pid")
    stale(tmp_path, "half", "12")  # never written (atomic), yet refused all the same
    assert rundir.clear_stale(tmp_path) == []
    assert garbled.exists() and (tmp_path / "llmgw-half").exists()


def test_a_directory_too_long_for_a_socket_path_is_refused_and_not_left_behind(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * (rundir.SUN_PATH_MAX - len(str(tmp_path)) - 20))
    deep.mkdir()
    with pytest.raises(rundir.RunDirTooLong, match="TMPDIR"):
        rundir.create(deep)
    assert list(deep.iterdir()) == []
