"""A DeepSeek-MoE v1 checkpoint served by vLLM CPU through the gateway (`engine: vllm`, its
remote code's `auto_map`, float32), and the same checkpoint on the gateway's own
transformers worker in an environment pinned to transformers 4.47.1: both engines render
the same prompt ids, pick the same greedy tokens with the same log-probabilities.

The checkpoint is tiny and random (tests/fixtures/remote_models.py, `VLLM_DEEPSEEK`: hidden
64 over 2 heads, the smallest head vLLM's CPU attention runs), with Hugging Face weight
names, routed and shared experts, a dense first layer and `norm_topk_prob` false, as the
real model. vLLM runs its own `DeepseekForCausalLM`; the transformers side runs the
checkpoint's remote code, whose log-probabilities come from tests/fixtures/logprob_probe.py
in the pinned environment (the gateway's worker returns no log-probabilities; its greedy
text is checked against the probe's tokens).

TransNormerLLM has no vLLM implementation: it is served by the transformers engine only
(tests/test_seed_models_e2e.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.remote_models import VLLM_DEEPSEEK, build_deepseek
from tests.fixtures.seed_fixtures import PINNED
from tests.fixtures.vllm_env import START_S, VLLM_PYTHON, vllm_marks
from tests.support import ROOT, Gateway, running, write_config

pytestmark = vllm_marks()

SYSTEM = "Answer briefly."  # the registry's system prompt, on both engines
TOKENS = 24
TOP = 3
TOL = 1e-4  # float32 engines agree within about 1e-5 here
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "2+2?"},
    ],
    [{"role": "user", "content": "The quick brown fox"}],
    [{"role": "user", "content": "Explain mixture-of-experts routing in one sentence."}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deepseek(tmp_path_factory.mktemp("moe") / "deepseek-moe", **VLLM_DEEPSEEK)


def entry_yaml(checkpoint: Path) -> str:
    """What both entries share: the checkpoint, its adapter and remote code, float32."""
    return f"""\
            source: {checkpoint}
            adapter: deepseek_moe
            dtype: float32
            trust_remote_code: true
            system_prompt: {SYSTEM!r}
            generation: {{max_new_tokens: 12, temperature: 0}}
            limits: {{context_length: 256, max_new_tokens: 64}}"""


@pytest.fixture(scope="module")
def registry(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`moe-vllm` on vLLM, `moe-tf` on the transformers worker in its pinned environment."""
    directory = tmp_path_factory.mktemp("moe-gw")
    config = write_config(
        directory,
        f"""\
        gateway:
          envs_dir: {directory / "envs"}
          probe_interval_s: 2
          load_timeout_s: 300
        models:
          moe-vllm:
{entry_yaml(checkpoint)}
            engine: vllm
            python_env: {{python: {VLLM_PYTHON}}}
            env: {{VLLM_CPU_KVCACHE_SPACE: "1"}}
            engine_args: {{enforce-eager: true}}
          moe-tf:
{entry_yaml(checkpoint)}
            python_env:
              requirements: {json.dumps(PINNED)}
        """,
    )
    build = subprocess.run(
        [sys.executable, "-m", "gateway", "env", "build", "moe-tf", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=900, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    return config


@pytest.fixture(scope="module")
def gateway(registry: Path) -> Iterator[Gateway]:
    with running(registry) as gw:
        gw.client.timeout = httpx.Timeout(START_S)
        yield gw


def pinned_python(registry: Path) -> Path:
    return next((registry.parent / "envs").glob("moe-tf-*")) / "bin" / "python"


def engine_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation as the engines get it: the registry's system prompt when it has none."""
    if any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": SYSTEM}, *messages]


def probe(registry: Path, model: Path, workdir: Path) -> list[dict[str, Any]]:
    """The remote code's prompt ids, greedy tokens and log-probabilities, in the pinned env."""
    cases = workdir / f"cases-{model.name}.json"
    conversations = [engine_messages(m) for m in CONVERSATIONS]
    cases.write_text(json.dumps({"conversations": conversations, "max_tokens": TOKENS, "top": TOP}))
    script = ROOT / "tests" / "fixtures" / "logprob_probe.py"
    run = subprocess.run(
        [str(pinned_python(registry)), str(script), str(model), str(cases)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results: list[dict[str, Any]] = json.loads(run.stdout.splitlines()[-1])
    return results


@pytest.fixture(scope="module")
def reference(
    registry: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    return probe(registry, checkpoint, tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def vllm_answers(gateway: Gateway) -> list[dict[str, Any]]:
    """vLLM's greedy replies through the gateway, with token ids and log-probabilities."""
    answers = []
    for messages in CONVERSATIONS:
        reply = gateway.post(
            "/v1/chat/completions",
            {
                "model": "moe-vllm",
                "messages": messages,
                "max_tokens": TOKENS,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": TOP,
                "return_tokens_as_token_ids": True,
                "return_token_ids": True,
            },
        )
        assert reply.status_code == 200, reply.text
        answers.append(reply.json())
    return answers


def token_id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.removeprefix("token_id:"))


def deviation(answer: dict[str, Any], expected: dict[str, Any]) -> float:
    """The largest log-probability difference, chosen and top tokens; inf if tokens differ."""
    choice = answer["choices"][0]
    if choice["token_ids"] != expected["tokens"]:
        return math.inf
    worst = 0.0
    for item, logprob, top in zip(
        choice["logprobs"]["content"], expected["logprobs"], expected["top"], strict=True
    ):
        assert token_id(item["token"]) in (choice["token_ids"])
        worst = max(worst, abs(item["logprob"] - logprob))
        theirs = {str(token_id(t["token"])): t["logprob"] for t in item["top_logprobs"]}
        if theirs.keys() != top.keys():
            return math.inf
        worst = max(worst, *(abs(theirs[k] - v) for k, v in top.items()))
    return worst


def test_vllm_serves_the_moe_checkpoint_on_chat_and_the_seed_route(gateway: Gateway) -> None:
    seed = gateway.post("/moe-vllm", {"prompt": "hello", "max_length": 6})
    assert seed.status_code == 200, seed.text
    assert seed.json()["status"] == 200 and 0 < seed.json()["usage"]["completion_tokens"] <= 6
    card = gateway.models()["moe-vllm"]
    assert card["state"] == "ready" and card["engine"] == "vllm"
    argv = card["runtime"]["argv"]
    assert "--trust-remote-code" in argv and argv[argv.index("--dtype") + 1] == "float32"
    # The registry's defaults: 12 new tokens, greedy (the same reply twice), its system prompt.
    body = {"model": "moe-vllm", "messages": [{"role": "user", "content": "hi"}]}
    first = gateway.post("/v1/chat/completions", {**body, "ignore_eos": True})
    again = gateway.post("/v1/chat/completions", {**body, "ignore_eos": True})
    assert first.json()["usage"]["completion_tokens"] == 12, first.text
    assert first.json()["choices"][0]["message"] == again.json()["choices"][0]["message"]
    ids = gateway.post("/v1/chat/completions", {**body, "return_token_ids": True}).json()
    head = [256, *SYSTEM.encode(), 10, 10]  # BOS, the system prompt, a blank line
    assert ids["prompt_token_ids"][: len(head)] == head
    own = {"role": "system", "content": "Be terse."}
    mine = gateway.post(
        "/v1/chat/completions",
        {**body, "messages": [own, *body["messages"]], "return_token_ids": True},
    ).json()
    head = [256, *b"Be terse.", 10, 10]
    assert mine["prompt_token_ids"][: len(head)] == head


def test_vllm_entry_limits_apply(gateway: Gateway) -> None:
    body = {"model": "moe-vllm", "messages": [{"role": "user", "content": "hi"}]}
    over = gateway.post("/v1/chat/completions", {**body, "max_tokens": 65})
    assert over.status_code == 400 and over.json()["error"]["code"] == "max_tokens_exceeded"
    seed = gateway.post("/moe-vllm", {"prompt": "hi", "max_length": 65})
    assert seed.status_code == 400 and seed.json()["error"]["param"] == "max_length"
    # The context length is vLLM's --max-model-len: a longer prompt is its 400, relayed.
    long = gateway.post(
        "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "x" * 300}]}
    )
    assert long.status_code == 400, long.text
    assert "maximum context length is 256" in long.json()["error"]["message"]


def test_vllm_renders_the_prompt_the_deepseek_adapter_renders(
    vllm_answers: list[dict[str, Any]], reference: list[dict[str, Any]]
) -> None:
    """vLLM renders DeepSeek's own chat template (tokenizer_config.json); the transformers
    worker renders the `deepseek_moe` adapter's prompt: the same ids, BOS, system text,
    history and the EOS closing an assistant turn included. (Content that spells a special
    token is where they part: the adapter keeps it text, vLLM's template makes it the token.)"""
    for answer, expected in zip(vllm_answers, reference, strict=True):
        assert answer["prompt_token_ids"] == expected["prompt_ids"]


def test_transformers_and_vllm_give_the_same_greedy_tokens_and_logprobs(
    gateway: Gateway, vllm_answers: list[dict[str, Any]], reference: list[dict[str, Any]]
) -> None:
    worst = 0.0
    for messages, answer, expected in zip(CONVERSATIONS, vllm_answers, reference, strict=True):
        assert answer["choices"][0]["token_ids"] == expected["tokens"]
        worst = max(worst, deviation(answer, expected))
        # The gateway's own worker, greedy, on the same checkpoint: the probe's tokens.
        reply = gateway.post(
            "/v1/chat/completions",
            {"model": "moe-tf", "messages": messages, "max_tokens": TOKENS, "temperature": 0},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected["text"]
        usage = reply.json()["usage"]
        assert usage["prompt_tokens"] == len(expected["prompt_ids"])
        assert usage["completion_tokens"] == len(expected["tokens"])
    assert gateway.models()["moe-tf"]["runtime"]["transformers"] == "4.47.1"
    assert len({t for e in reference for t in e["tokens"]}) > 20  # not one token over and over
    print(f"largest log-probability difference, transformers vs vLLM: {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize(
    ("setting", "value", "subtle"),
    [("norm_topk_prob", True, False), ("rms_norm_eps", 1e-5, True)],
)
def test_a_checkpoint_read_with_a_wrong_setting_fails_the_comparison(
    registry: Path,
    checkpoint: Path,
    vllm_answers: list[dict[str, Any]],
    tmp_path: Path,
    setting: str,
    value: object,
    subtle: bool,
) -> None:
    """The comparison has teeth: the same weights with one setting changed differ beyond the
    tolerance on every conversation; a subtle one (rms_norm_eps, Llama's default) keeps some
    conversations' greedy tokens all the same, which only the log-probabilities catch."""
    wrong = shutil.copytree(checkpoint, tmp_path / f"wrong-{setting}")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, setting: value}))
    results = probe(registry, wrong, tmp_path)
    deviations = [deviation(a, r) for a, r in zip(vllm_answers, results, strict=True)]
    assert min(deviations) > 10 * TOL, deviations
    same_tokens = [d for d in deviations if math.isfinite(d)]
    print(f"{setting}={value}: {len(same_tokens)} of {len(deviations)} with the same tokens")
    if subtle:
        assert same_tokens, "every conversation's tokens changed: the setting is not subtle"


def test_vllm_streams_the_moe_checkpoint_on_completions(gateway: Gateway) -> None:
    """The greedy completion streamed is the greedy completion returned whole."""
    body = {"model": "moe-vllm", "prompt": "hello", "max_tokens": 8, "temperature": 0}
    whole = gateway.post("/v1/completions", body)
    assert whole.status_code == 200, whole.text
    with gateway.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in map(json.loads, data[:-1]) if c["choices"])
    assert text == whole.json()["choices"][0]["text"]
