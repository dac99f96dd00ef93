"""Which interpreter runs a model's worker (building environments: test_seed_models_e2e.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.backends.envs import MARKER, EnvironmentMissing, env_dir, python_for
from gateway.registry.config import ModelEntry


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
        "import sys, gateway.cli, gateway.backends.envs, gateway.registry.hub\n"
        "import gateway.lifecycle.placement\n"
        "heavy = {'torch', 'transformers', 'modelscope', 'huggingface_hub'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def shadowing_wheel(directory: Path, name: str, version: str) -> Path:
    """A minimal wheel of a package the base environment also has, built by hand (offline)."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, f"{info}/RECORD": "\n".join(record) + "\n"}.items():
            archive.writestr(path, text)
    return wheel


def test_env_build_output_has_no_uninstall_failure_for_the_packages_it_shadows(
    tmp_path: Path,
) -> None:
    import importlib.metadata
    import io

    from gateway.backends.envs import build_env

    base_version = importlib.metadata.version("idna")  # the gateway needs it: always there
    wheel = shadowing_wheel(tmp_path, "idna", "0.0.1")
    out = io.StringIO()
    built = build_env("m", entry(requirements=[str(wheel)]), tmp_path / "envs", out=out)
    text = out.getvalue()
    assert "Can't uninstall" not in text and "No files were found" not in text
    assert "ERROR" not in text
    assert f"idna {base_version} stays in the base environment" in text
    assert "Successfully installed idna-0.0.1" in text
    own = next(built.path.glob("lib/python*/site-packages")) / "idna-0.0.1.dist-info"
    assert own.is_dir()  # the environment really has its own version


def test_pips_messages_about_the_base_packages_are_said_calmly() -> None:
    from gateway.backends.envs import calm_pip_output

    pip = [
        "Installing collected packages: idna\n",
        "  Attempting uninstall: idna\n",
        "    Found existing installation: idna 3.20\n",
        "    Not uninstalling idna at /base/site-packages, outside environment /env\n",
        "    Can't uninstall 'idna'. No files were found to uninstall.\n",
        "  Attempting uninstall: six\n",
        "    Found existing installation: six 1.16.0\n",
        "    Uninstalling six-1.16.0:\n",
        "      Successfully uninstalled six-1.16.0\n",
        "ERROR: pip's dependency resolver does not currently take into account all the "
        "packages that are installed. This behaviour is the source of the following "
        "dependency conflicts.\n",
        "httpx 0.28.1 requires idna>=3.18, but you have idna 3.6 which is incompatible.\n",
        "Successfully installed idna-3.6\n",
    ]
    assert list(calm_pip_output(pip)) == [
        "Installing collected packages: idna\n",
        "  idna 3.20 stays in the base environment; this environment's own version shadows it\n",
        "    Found existing installation: six 1.16.0\n",  # a real uninstall keeps pip's words
        "    Uninstalling six-1.16.0:\n",
        "      Successfully uninstalled six-1.16.0\n",
        "note: base-environment packages that want other versions than this one has:\n",
        "  httpx 0.28.1 wants idna>=3.18; this environment has idna 3.6\n",
        "Successfully installed idna-3.6\n",
    ]
