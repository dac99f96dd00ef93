"""The seed models' path for real, on tiny stand-ins: per-model environments pinned to
transformers 4.47.1 (built by `llm-gateway env build`), remote code through `auto_map`,
served by the real gateway, which itself runs transformers 5."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.backends.envs import MARKER, PTH_NAME, base_site_dirs
from tests.fixtures.seed_fixtures import PinnedRegistry
from tests.support import ROOT, Gateway, scrape, value

pytestmark = pytest.mark.slow  # builds two environments (about 20 s with a warm pip cache)


@pytest.fixture(scope="module")
def remote_code_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote-log") / "imports.txt"


@pytest.fixture(scope="module")
def gateway(pinned_registry: PinnedRegistry, remote_code_log: Path) -> Iterator[Gateway]:
    with Gateway(
        pinned_registry.config, env={"LLMGW_TEST_REMOTE_CODE_LOG": str(remote_code_log)}
    ) as gw:
        yield gw


def env_of(pinned: PinnedRegistry, name: str) -> Path:
    return next(pinned.envs_dir.glob(f"{name}-*"))


def pip_list(python: Path) -> dict[str, str]:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "list", "--format", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {row["name"].lower(): row["version"] for row in json.loads(listing.stdout)}


def test_env_build_pins_transformers_and_reuses_the_base_torch(
    pinned_registry: PinnedRegistry,
) -> None:
    env = env_of(pinned_registry, "tiny-deepseek")
    packages = pip_list(env / "bin" / "python")
    assert packages["transformers"] == "4.47.1"
    assert packages["torch"] == importlib.metadata.version("torch")
    assert importlib.metadata.version("transformers").startswith("5.")  # the gateway's own
    own_site = next(env.glob("lib/python*/site-packages"))
    assert (own_site / "transformers").is_dir()
    assert not (own_site / "torch").exists()  # no second torch: the base's is seen through
    assert (own_site / PTH_NAME).read_text().split() == base_site_dirs()
    marker = json.loads((env / MARKER).read_text())
    assert marker["torch"]["location"] in base_site_dirs()
    assert "transformers 4.47.1, torch" in pinned_registry.build_output
    assert "built in" in pinned_registry.build_output
    assert "Can't uninstall" not in pinned_registry.build_output  # the base keeps its copy
    assert "ERROR" not in pinned_registry.build_output


def test_a_second_build_finds_the_environment_built(pinned_registry: PinnedRegistry) -> None:
    again = subprocess.run(
        [sys.executable, "-m", "gateway", "env", "build", "tiny-deepseek",
         "--config", str(pinned_registry.config)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert "tiny-deepseek: already built: python" in again.stdout
    assert "building" not in again.stdout


def test_deepseek_shaped_model_serves_from_its_pinned_environment(gateway: Gateway) -> None:
    reply = gateway.post("/tiny-deepseek", {"prompt": "你好", "max_length": 40, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == 200 and body["response"]
    # generation_config.json would stop at 20 tokens: the request's 40 were passed explicitly.
    assert body["usage"]["completion_tokens"] == 40
    runtime = gateway.models()["tiny-deepseek"]["runtime"]
    assert runtime["transformers"] == "4.47.1"
    assert runtime["torch"] == importlib.metadata.version("torch")
    assert "tiny-deepseek-" in runtime["executable"]
    assert runtime["context_length"] == 4096
    assert runtime["batching"] == "per-generate"  # remote code keeps its own cache


def test_deepseek_chat_with_history_and_system_prompt(gateway: Gateway) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    reply = gateway.post(
        "/v1/chat/completions",
        {"model": "tiny-deepseek", "messages": messages, "max_tokens": 4, "temperature": 0},
    ).json()
    # BOS + the bytes of the DeepSeek-format prompt + EOS after the assistant turn.
    text = "Be brief.\n\nUser: hi\n\nAssistant: Hello!User: 2+2?\n\nAssistant:"
    assert reply["usage"]["prompt_tokens"] == len(text.encode()) + 2


def test_transnormer_greedy_answers_repeat_exactly(gateway: Gateway) -> None:
    body = {"prompt": "你好", "max_length": 12, "temperature": 0}
    first = gateway.post("/tiny-transnormer", body)
    assert first.status_code == 200, first.text
    second = gateway.post("/tiny-transnormer", body)
    assert first.json()["response"] == second.json()["response"]
    assert gateway.models()["tiny-transnormer"]["runtime"]["transformers"] == "4.47.1"


# Different lengths, so that batched rows are left-padded (as in tests/fixtures/offset_probe.py).
PROMPTS = ["你好", "hello, who are you?", "1+1"]


def test_transnormer_concurrent_requests_are_batched_and_answer_as_alone(
    gateway: Gateway,
) -> None:
    def ask(prompt: str) -> httpx.Response:
        body = {"prompt": prompt, "max_length": 10, "temperature": 0}
        return gateway.post("/tiny-transnormer", body)

    alone = [ask(p).json()["response"] for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS)  # else equal replies would prove nothing
    before = scrape(gateway)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(ask, PROMPTS * 2))
    after = scrape(gateway)
    # The model raises on overlapping forwards and drifts if its offset is not reset.
    assert [r.status_code for r in replies] == [200] * 6
    assert [r.json()["response"] for r in replies] == alone * 2

    def delta(name: str) -> float:
        return value(after, name, model="tiny-transnormer") - value(
            before, name, model="tiny-transnormer"
        )

    assert delta("llmgw_batch_size_sum") == 6  # rows, one per request
    assert delta("llmgw_batch_size_count") < 6  # generate calls: some held several rows
    assert gateway.models()["tiny-transnormer"]["runtime"]["max_batch_size"] > 1


@pytest.fixture(scope="module")
def probe(pinned_registry: PinnedRegistry, transnormer_tiny: Path) -> dict[str, Any]:
    """What tests/fixtures/offset_probe.py reports, run in the model's pinned environment."""
    python = env_of(pinned_registry, "tiny-transnormer") / "bin" / "python"
    done = subprocess.run(
        [str(python), str(ROOT / "tests" / "fixtures" / "offset_probe.py"), str(transnormer_tiny)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_with_the_offset_reset_the_same_prompt_repeats(probe: dict[str, Any]) -> None:
    first, again = probe["with_reset"]
    assert first and first == again


def test_without_the_offset_reset_a_second_generate_gives_different_text(
    probe: dict[str, Any],
) -> None:
    before, drifted = probe["without"]
    assert before == probe["with_reset"][0]
    assert drifted != before


def test_left_padded_batch_rows_give_each_row_s_solo_text(probe: dict[str, Any]) -> None:
    assert len(set(probe["prompt_lengths"])) == 3  # two rows padded, by different amounts
    assert len(set(probe["solo"])) == 3
    assert probe["batched"] == probe["solo"]


def test_a_stale_offset_changes_a_batch_too(probe: dict[str, Any]) -> None:
    assert probe["stale_batched"] != probe["solo"]


def test_remote_code_runs_only_in_the_worker(gateway: Gateway, remote_code_log: Path) -> None:
    assert gateway.post("/tiny-transnormer", {"prompt": "hi", "max_length": 2}).status_code == 200
    importers = {int(line) for line in remote_code_log.read_text().split()}
    assert importers == {gateway.models()["tiny-transnormer"]["pid"]}
    assert gateway.process.pid not in importers
