"""Session-wide test set-up: hubs offline, tiny models built locally once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.seed_fixtures"]

_HOME = Path(tempfile.mkdtemp(prefix="llmgw-test-home-"))
# Set before anything imports a hub client; worker subprocesses inherit them.
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(_HOME / "hf"),
        "MODELSCOPE_CACHE": str(_HOME / "modelscope"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny Llama chat model whose replies are varied (and often odd bytes)."""
    from gateway.worker.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny", seed=0, init_std=0.2)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different tiny model (another seed)."""
    from gateway.worker.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny-b", seed=1, init_std=0.2)


@pytest.fixture(scope="session")
def faulty_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with remote code that fails on demand (see tests/fixtures/faulty.py)."""
    from tests.fixtures.faulty import build_faulty

    return build_faulty(tiny_model, tmp_path_factory.mktemp("models") / "faulty")
