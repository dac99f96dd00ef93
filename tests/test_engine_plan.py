"""`llm-gateway plan` for `engine: vllm`: DeepSeek-MoE-16B sharded over two GPUs, what vLLM
reserves on each and the KV cache that leaves, computed with no GPU here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.engines.memory import ACTIVATION_ALLOWANCE
from gateway.backends.engines.plan import VllmPlanError, kv_per_token, render, vllm_plan
from gateway.registry.config import ModelEntry
from tests.support import ROOT

GIB = 2**30
CONFIG_DIR = ROOT / "configs" / "deepseek-moe-16b-chat"
CONFIG: dict[str, Any] = json.loads((CONFIG_DIR / "config.json").read_text())
# The planner's answer for that config in bfloat16 (the subprocess test checks the real one).
WEIGHTS: dict[str, Any] = {
    "architecture": "DeepseekForCausalLM",
    "parameters": 16_375_728_128,
    "dtype": "bfloat16",
    "total_bytes": 2 * 16_375_728_128,
}


def deepseek(**fields: Any) -> ModelEntry:
    return ModelEntry.model_validate(
        {
            "source": "deepseek-ai/deepseek-moe-16b-chat",
            "engine": "vllm",
            "dtype": "bfloat16",
            "devices": [0, 1],
            "max_memory": {0: "22GiB", 1: "22GiB"},
            "limits": {"context_length": 4096},
            **fields,
        }
    )


def by_hand_kv_per_token_per_gpu(tp: int) -> int:
    head_dim: int = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    kv_heads: int = CONFIG["num_key_value_heads"] // tp
    layers: int = CONFIG["num_hidden_layers"]
    return 2 * layers * kv_heads * head_dim * 2  # K and V, bf16


def test_deepseek_moe_over_two_24gib_gpus_shards_its_weights_and_counts_kv_tokens() -> None:
    plan = vllm_plan("ds", deepseek(), WEIGHTS, CONFIG, gpu_memory=24 * GIB)
    assert plan["tensor_parallel_size"] == 2
    assert plan["gpu_memory_utilization"] == round(22 / 24, 4)  # max_memory over the GPU
    per_token = by_hand_kv_per_token_per_gpu(2)
    assert per_token == 2 * 28 * 8 * 128 * 2 == plan["kv_bytes_per_token"]
    reserved = int(round(22 / 24, 4) * 24 * GIB)
    for device in ("0", "1"):
        row = plan["devices"][device]
        assert row["weights_bytes"] == WEIGHTS["total_bytes"] // 2  # half the weights each
        assert row["reserved_bytes"] == reserved
        room = reserved - WEIGHTS["total_bytes"] // 2 - ACTIVATION_ALLOWANCE
        assert row["kv_cache_bytes"] == room
        assert row["kv_tokens"] == room // per_token
    assert plan["kv_tokens"] == 44_468
    assert plan["sequences"] == 44_468 // 4096 == 10
    assert plan["fits"] and plan["warnings"] == [] and plan["notes"] == []


def test_one_gpu_holds_every_kv_head_and_so_half_the_tokens_per_byte() -> None:
    plan = vllm_plan("ds", deepseek(devices=[0], max_memory=None), WEIGHTS, CONFIG, 80 * GIB)
    assert plan["kv_bytes_per_token"] == by_hand_kv_per_token_per_gpu(1)
    assert plan["devices"]["0"]["weights_bytes"] == WEIGHTS["total_bytes"]
    assert plan["gpu_memory_utilization"] == 0.92  # vLLM's own default


def test_a_fraction_that_leaves_no_kv_room_is_clamped_at_zero_with_a_warning() -> None:
    entry = deepseek(engine_args={"gpu-memory-utilization": 0.5})
    plan = vllm_plan("ds", entry, WEIGHTS, CONFIG, gpu_memory=24 * GIB)
    assert plan["devices"]["0"]["kv_cache_bytes"] == 0 == plan["kv_tokens"]
    assert not plan["fits"]
    [first, second] = plan["warnings"]
    assert first.startswith("GPU 0: gpu_memory_utilization 0.5000 reserves 12.00 GiB")
    assert "5.25 GiB short" in first and "vLLM would refuse to start" in first
    text = render(plan)
    assert "warning: GPU 1: gpu_memory_utilization 0.5000" in text and second.startswith("GPU 1")
    assert text.endswith("does not fit")


def test_room_for_less_than_one_sequence_is_a_warning_too() -> None:
    entry = deepseek(limits={"context_length": 4096}, engine_args={"max-model-len": "64k"})
    plan = vllm_plan("ds", entry, WEIGHTS, CONFIG, gpu_memory=24 * GIB)
    assert plan["max_model_len"] == 64_000 and plan["sequences"] == 0
    assert "less than one sequence of max_model_len 64,000" in plan["warnings"][0]


def test_latent_attention_and_odd_configs_say_unknown_rather_than_guess() -> None:
    mla = {**CONFIG, "kv_lora_rank": 512, "q_lora_rank": 1536}
    assert kv_per_token(mla, 2, 2) == (None, kv_per_token(mla, 2, 2)[1])
    assert "MLA" in kv_per_token(mla, 2, 2)[1]
    odd = {k: v for k, v in CONFIG.items() if k != "num_hidden_layers"}
    assert kv_per_token(odd, 2, 2)[0] is None
    plan = vllm_plan("ds", deepseek(), WEIGHTS, mla, gpu_memory=24 * GIB)
    assert plan["kv_tokens"] is None and plan["sequences"] is None and plan["fits"]
    assert "KV cache per token: unknown (multi-head latent attention" in render(plan)
    # Fewer KV heads than GPUs: vLLM replicates one head on each.
    assert kv_per_token({**CONFIG, "num_key_value_heads": 1}, 2, 2)[0] == 2 * 28 * 1 * 128 * 2


def test_without_gpu_sizes_max_memory_stands_in_and_without_it_the_user_is_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    plan = vllm_plan("ds", deepseek(), WEIGHTS, CONFIG)
    assert plan["gpu_sizes_from"] == "max_memory" and plan["gpu_memory_utilization"] is None
    assert plan["devices"]["0"]["reserved_bytes"] == 22 * GIB
    assert plan["devices"]["0"]["total_bytes"] is None
    assert "no nvidia-smi and no --gpu-memory" in plan["notes"][0]
    with pytest.raises(VllmPlanError, match=r"pass each GPU's memory, e\.g\. `--gpu-memory 24GiB`"):
        vllm_plan("ds", deepseek(max_memory=None), WEIGHTS, CONFIG)


def registry(tmp_path: Path, **fields: Any) -> Path:
    entry = {"source": "deepseek-ai/deepseek-moe-16b-chat", "hub": "modelscope",
             "engine": "vllm", "dtype": "bfloat16", "devices": [0, 1],
             "max_memory": {0: "22GiB", 1: "22GiB"}, "trust_remote_code": True,
             "planning_config": str(CONFIG_DIR), "limits": {"context_length": 4096},
             **fields}  # fmt: skip
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps({"gateway": {"cache_dir": str(tmp_path / "cache")},
                                "models": {"ds": entry}}))  # fmt: skip
    return path


def plan_cli(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "plan", "ds", "--config", str(config), *flags],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip


def test_the_cli_plans_the_real_architecture_as_json_and_as_a_table(tmp_path: Path) -> None:
    config = registry(tmp_path)
    result = plan_cli(config, "--gpu-memory", "24GiB", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["engine"] == "vllm" and plan["parameters"] == WEIGHTS["parameters"]
    assert plan["total_bytes"] == WEIGHTS["total_bytes"]  # the planner's, in bfloat16
    assert set(plan["devices"]) == {"0", "1"}
    assert set(plan["devices"]["0"]) == {
        "total_bytes", "reserved_bytes", "weights_bytes", "activation_bytes",
        "kv_cache_bytes", "kv_tokens",
    }  # fmt: skip
    assert plan["devices"]["1"]["total_bytes"] == 24 * GIB
    assert (plan["kv_tokens"], plan["sequences"]) == (44_468, 10)
    assert plan == vllm_plan("ds", deepseek(), WEIGHTS, CONFIG, gpu_memory=24 * GIB) | {
        "model": "ds"
    }
    text = plan_cli(config, "--gpu-memory", "24GiB").stdout
    assert "tensor parallel size 2: 15.25 GiB of weights per GPU" in text
    assert (
        "GPU 0      24.00 GiB   22.00 GiB   15.25 GiB     2.00 GiB    4.75 GiB     44,468" in text
    )
    assert "room for 44,468 tokens: 10 sequences of max_model_len 4,096" in text


def test_the_cli_fails_when_vllm_would_have_no_kv_room_and_refuses_a_bad_size(
    tmp_path: Path,
) -> None:
    config = registry(tmp_path, engine_args={"gpu-memory-utilization": 0.5})
    result = plan_cli(config, "--gpu-memory", "24GiB")
    assert result.returncode == 1
    assert "warning: GPU 0: gpu_memory_utilization 0.5000 reserves 12.00 GiB" in result.stdout
    assert result.stdout.rstrip().endswith("does not fit")
    bad = plan_cli(config, "--gpu-memory", "lots")
    assert bad.returncode == 2 and "expected a size such as 22GiB" in bad.stderr
