"""Every task the gateway starts ends with it: the app's loops at shutdown, a worker's pipe
relays when the worker is stopped, even if a child it left behind holds its pipes open."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.backends.launcher import Backend, Progress, WorkerProcess
from gateway.registry.config import ModelEntry
from gateway.registry.load import load_registry


class NoLauncher:
    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> Backend:
        raise RuntimeError("no worker is started in this test")


async def test_the_apps_lifespan_leaves_no_task_of_its_own_running(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(json.dumps({"models": {"a": {"source": str(tmp_path)}}}))
    app = create_app(load_registry(config), launcher=NoLauncher())
    before = asyncio.all_tasks()
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.05)  # the reaper, prober and watcher are running now
        assert len(asyncio.all_tasks() - before) >= 3
    assert asyncio.all_tasks() - before == set()


# Says it is ready, then leaves a child in a session of its own holding stdout and stderr:
# stopping the worker's process group does not reach it, so the pipes never see EOF.
WORKER = """
import json, subprocess, sys, time
child = subprocess.Popen(["sleep", "60"], start_new_session=True)
print(json.dumps({"event": "ready", "runtime": {"child": child.pid}}), flush=True)
time.sleep(60)
"""


async def test_a_stopped_worker_leaves_no_relay_task_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    worker = WorkerProcess("w", process, "/nonexistent/w.sock")
    await asyncio.wait_for(worker.wait_ready(lambda message: None), 20)
    child = int(worker.runtime["child"])
    try:
        await asyncio.wait_for(worker.stop(5.0), 20)
        assert all(task.done() for task in worker._tasks)
        assert worker.exited.done()
        assert "ignored SIGTERM" not in caplog.text  # it exited at once; its child holds on
    finally:
        os.kill(child, signal.SIGKILL)
