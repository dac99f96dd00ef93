"""Which interpreter runs a model's worker (building environments: test_seed_models_e2e.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.config import ModelEntry
from gateway.envs import MARKER, EnvironmentMissing, env_dir, python_for


def entry(**python_env: object) -> ModelEntry:
    return ModelEntry.model_validate({"source": "/m", "python_env": python_env or None})


def test_without_python_env_the_gateways_interpreter_runs_it(tmp_path: Path) -> None:
    assert python_for("m", ModelEntry(source="/m"), tmp_path) == sys.executable


def test_an_unbuilt_environment_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentMissing, match=r"run `llm-gateway env build m`"):
        python_for("m", entry(requirements=["transformers==4.47.1"]), tmp_path)


def test_a_half_built_environment_is_not_used(tmp_path: Path) -> None:
    pinned = entry(requirements=["transformers==4.47.1"])
    python = env_dir("m", pinned, tmp_path) / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()  # the venv exists, but the build never wrote its marker
    with pytest.raises(EnvironmentMissing):
        python_for("m", pinned, tmp_path)
    (python.parent.parent / MARKER).write_text("{}")
    assert python_for("m", pinned, tmp_path) == str(python)


def test_the_environment_is_named_after_the_model_and_its_requirements(tmp_path: Path) -> None:
    old = env_dir("m", entry(requirements=["transformers==4.47.1"]), tmp_path)
    new = env_dir("m", entry(requirements=["transformers==4.48.3"]), tmp_path)
    assert old != new and old.name.startswith("m-") and old.parent == tmp_path


def test_an_interpreter_path_or_name(tmp_path: Path) -> None:
    assert python_for("m", entry(python=sys.executable), tmp_path) == sys.executable
    assert python_for("m", entry(python="python3"), tmp_path).endswith("python3")
    with pytest.raises(EnvironmentMissing, match="does not exist"):
        python_for("m", entry(python=str(tmp_path / "nope" / "python")), tmp_path)


def test_the_gateway_side_of_envs_plans_and_pulls_imports_no_torch() -> None:
    import subprocess

    code = (
        "import sys, gateway.cli, gateway.envs, gateway.hub, gateway.placement\n"
        "heavy = {'torch', 'transformers', 'modelscope', 'huggingface_hub'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
