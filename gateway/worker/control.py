"""The worker's side of its link to the gateway: a JSON-lines control channel on the
original stdout, and a watch on the gateway so that a worker never outlives it.

Model code may print or reconfigure logging onto stdout (TransNormer's remote code does),
so the control channel keeps a private duplicate of fd 1 and fd 1 itself is pointed at
stderr before any model code runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from typing import Any, TextIO

PR_SET_PDEATHSIG = 1


class Control:
    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def send(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, ensure_ascii=False)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def progress(self, stage: str, message: str, fraction: float | None = None) -> None:
        self.send("progress", stage=stage, message=message, fraction=fraction)


def exit_with_gateway() -> None:
    """End this process when the gateway ends, however it ends (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    expected = os.environ.get("LLMGW_PARENT_PID")
    if expected and os.getppid() != int(expected):  # the gateway died before prctl took hold
        os._exit(1)

    def watch_stdin() -> None:
        # The gateway holds our stdin open; EOF means it is gone.
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Timer(10.0, lambda: os._exit(1)).start()

    threading.Thread(target=watch_stdin, name="gateway-watch", daemon=True).start()
