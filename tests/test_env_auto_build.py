"""Per-model environments built without a separate step: `env build --all`, and the
gateway building a missing one on the model's first load (unless the registry says not to).

The requirement is one the base environment already satisfies (pyyaml), so pip resolves
it through the base's site-packages and downloads nothing: the build is real and quick.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.backends.envs import MARKER
from gateway.cli import main
from tests.support import Gateway, write_config

pytestmark = pytest.mark.slow  # each test creates a virtual environment or two


def registry(tmp_path: Path, tiny_model: Path, auto: bool | None = None) -> Path:
    switch = "" if auto is None else f"  auto_build_envs: {str(auto).lower()}\n"
    return write_config(
        tmp_path,
        f"gateway:\n  envs_dir: {tmp_path / 'envs'}\n{switch}"
        "models:\n"
        f"  a: {{source: {tiny_model}, python_env: {{requirements: [pyyaml]}}}}\n"
        f"  b: {{source: {tiny_model}, python_env: {{requirements: ['pyyaml>=5']}}}}\n"
        f"  plain: {{source: {tiny_model}}}\n",
    )


def built(tmp_path: Path) -> set[str]:
    return {p.parent.name.split("-")[0] for p in (tmp_path / "envs").glob(f"*/{MARKER}")}


def test_env_build_all_builds_every_model_that_lists_requirements(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = registry(tmp_path, tiny_model)
    assert main(["env", "build", "--all", "--config", str(config)]) == 0
    assert built(tmp_path) == {"a", "b"}
    assert main(["env", "build", "--all", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("already built") == 2


def test_env_build_without_names_or_all_is_a_usage_error(tiny_model: Path, tmp_path: Path) -> None:
    assert main(["env", "build", "--config", str(registry(tmp_path, tiny_model))]) == 2
    assert built(tmp_path) == set()


def test_a_missing_environment_is_built_on_the_first_request(
    tiny_model: Path, tmp_path: Path
) -> None:
    with Gateway(registry(tmp_path, tiny_model)) as gateway:
        reply = gateway.post("/a", {"prompt": "hi", "max_length": 2})
        assert reply.status_code == 200, reply.text
    assert built(tmp_path) == {"a"}
    assert "[a] env build: built in" in gateway.log.read_text()


def test_with_auto_build_off_the_503_names_the_build_command(
    tiny_model: Path, tmp_path: Path
) -> None:
    with Gateway(registry(tmp_path, tiny_model, auto=False)) as gateway:
        reply = gateway.post("/a", {"prompt": "hi", "max_length": 2})
    assert reply.status_code == 503, reply.text
    assert "llm-gateway env build a" in reply.text
    assert "auto_build_envs is off" in reply.text
    assert built(tmp_path) == set()
