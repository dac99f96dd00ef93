"""Which Python interpreter runs a model's worker.

Without `python_env` a worker runs on the gateway's own interpreter. With
`python_env.python` it runs on that interpreter. With `python_env.requirements` it runs in
a virtual environment under `envs_dir`, named after the model and a digest of its
requirements, built by `llm-gateway env build NAME`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from gateway.config import ModelEntry


class EnvironmentMissing(Exception):
    """The model's Python environment does not exist yet."""


def env_dir(name: str, entry: ModelEntry, envs_dir: Path) -> Path:
    assert entry.python_env is not None
    digest = hashlib.sha256("\n".join(entry.python_env.requirements).encode()).hexdigest()[:10]
    return envs_dir / f"{name}-{digest}"


def python_for(name: str, entry: ModelEntry, envs_dir: Path) -> str:
    if entry.python_env is None:
        return sys.executable
    if entry.python_env.python:
        python = Path(entry.python_env.python).expanduser()
        if not python.exists():
            raise EnvironmentMissing(f"model {name!r}: python_env.python {python} does not exist")
        return str(python)
    python = env_dir(name, entry, envs_dir) / "bin" / "python"
    if not python.exists():
        raise EnvironmentMissing(
            f"model {name!r} runs in its own Python environment, which is not built yet; "
            f"run `llm-gateway env build {name}`"
        )
    return str(python)
