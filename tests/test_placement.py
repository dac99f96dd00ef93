"""`llm-gateway plan`: DeepSeek-MoE-16B's real architecture over GPUs, with no GPU here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.lifecycle.placement import PlanError, budget_for, planning_source, render, summarize
from gateway.registry.config import ModelEntry
from gateway.registry.load import ConfigError, parse_registry
from tests.support import ROOT, write_config

GIB = 2**30


def plan(config: Path, name: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "plan", name, "--config", str(config), *flags],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    """The plan of the shipped `deepseek-moe` entry: two GPUs of 22 GiB, nothing downloaded."""
    result = plan(ROOT / "models.yaml", "deepseek-moe", "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_deepseek_moe_16b_uses_both_gpus_and_totals_30_5_gib(shipped: dict[str, Any]) -> None:
    assert shipped["model"] == "deepseek-moe"
    assert shipped["parameters"] == 16_375_728_128
    assert shipped["total_bytes"] == 2 * 16_375_728_128  # bf16
    assert round(shipped["total_bytes"] / GIB, 2) == 30.50
    assert set(shipped["devices"]) == {"0", "1"}
    assert all(size > 5 * GIB for size in shipped["devices"].values())
    assert sum(shipped["devices"].values()) == shipped["total_bytes"]
    assert shipped["fits"] and shipped["shortfall_bytes"] == 0


def test_whole_decoder_layers_split_18_and_19(shipped: dict[str, Any]) -> None:
    device_map = shipped["device_map"]
    assert device_map["model.embed_tokens"] == "0"
    assert {device_map[f"model.layers.{i}"] for i in range(19)} == {"0"}
    assert {device_map[f"model.layers.{i}"] for i in range(19, 28)} == {"1"}
    assert device_map["lm_head"] == "1"
    assert not any(".mlp" in module for module in device_map)  # layers are never split


def test_the_table_for_people(shipped: dict[str, Any]) -> None:
    text = render(shipped)
    assert "16,375,728,128 parameters, 30.50 GiB in bfloat16" in text
    assert "GPU 0      22.00 GiB   20.26 GiB  model.embed_tokens, model.layers.0-18" in text
    assert "GPU 1      22.00 GiB   10.25 GiB  model.layers.19-27, model.norm, lm_head" in text
    assert "fits; 13.50 GiB of the budget left" in text


def test_a_budget_too_small_says_so_with_the_shortfall(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"""
        models:
          small:
            source: deepseek-ai/deepseek-moe-16b-chat
            hub: modelscope
            dtype: bfloat16
            devices: [2, 3]
            max_memory: {{2: 10GiB, 3: 10GiB}}
            trust_remote_code: true
            planning_config: {ROOT / "configs" / "deepseek-moe-16b-chat"}
        """,
    )
    answer = plan(config, "small", "--json")
    assert answer.returncode == 1
    small = json.loads(answer.stdout)
    assert not small["fits"]
    assert set(small["budget"]) == {"2", "3"}  # physical GPU indices, as in the registry
    assert {"2", "3"} <= set(small["devices"])
    assert small["shortfall_bytes"] > small["total_bytes"] - 20 * GIB  # whole layers only
    assert small["device_map"]["lm_head"] not in ("2", "3")
    text = render(small)
    assert f"does not fit: {small['shortfall_bytes'] / GIB:.2f} GiB short" in text
    assert "lm_head left over" in text


def test_a_downloaded_model_on_the_cpu_plans_from_its_snapshot(
    deepseek_tiny: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"models:\n  tiny:\n    source: {deepseek_tiny}\n    trust_remote_code: true\n",
    )
    answer = json.loads(plan(config, "tiny", "--json").stdout)
    assert answer["device_map"] == {"": "cpu"}
    assert answer["dtype"] == "float32"  # `dtype: auto` on the CPU
    assert answer["devices"] == {"cpu": answer["total_bytes"]}


def test_planning_keys_budgets_as_the_worker_sees_its_gpus() -> None:
    spread = ModelEntry(source="x", devices=[4, 6], max_memory={"4": 1, "6": 2, "cpu": 3})
    assert budget_for("m", spread) == {"0": 1, "1": 2, "cpu": 3}
    with pytest.raises(PlanError, match="no budget for its GPUs"):
        budget_for("m", ModelEntry(source="x", devices=[0, 1]))


@pytest.mark.parametrize(
    ("devices", "max_memory", "message"),
    [
        ("[0, 1]", "{0: 22GiB}", "no budget for GPU 1"),
        ("[0]", "{cpu: 64GiB}", "no budget for GPU 0"),
        ("[0]", "{0: 22GiB, disk: 100GiB}", "disk offload is not supported"),
        ("[0]", "{0: 22GiB, 1: 22GiB}", "device '1' is not in `devices`"),
        ("cpu", "{0: 22GiB}", "device '0' is not in `devices`"),
    ],
)
def test_a_budget_the_planner_cannot_place_is_a_config_error_at_its_yaml_path(
    devices: str, max_memory: str, message: str
) -> None:
    text = f"models:\n  m:\n    source: ./m\n    devices: {devices}\n    max_memory: {max_memory}\n"
    with pytest.raises(ConfigError) as caught:
        parse_registry(text)
    [issue] = caught.value.issues
    assert issue.path == "models.m.max_memory"
    assert message in issue.message
    assert issue.line == 5


def test_a_budget_for_every_gpu_and_the_cpu_is_accepted() -> None:
    text = "models:\n  m:\n    source: ./m\n    devices: [2, 3]\n"
    registry = parse_registry(text + "    max_memory: {2: 1GiB, 3: 1GiB, cpu: 8GiB}\n")
    assert registry.models["m"].max_memory == {"2": GIB, "3": GIB, "cpu": 8 * GIB}


def test_nothing_to_plan_from_says_how_to_get_it(tmp_path: Path) -> None:
    entry = ModelEntry(source="org/model", hub="huggingface")
    with pytest.raises(PlanError, match=r"llm-gateway pull m"):
        planning_source("m", entry, tmp_path)


def test_layer_runs_are_summarized() -> None:
    modules = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(3)), "lm_head"]
    assert summarize(modules) == "model.embed_tokens, model.layers.0-2, lm_head"
    assert summarize(["a.1", "a.3", "a.4"]) == "a.1, a.3-4"


def test_check_names_the_yaml_path_of_a_budget_that_leaves_a_gpu_out(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "models:\n  m:\n    source: ./m\n    devices: [0, 1]\n    max_memory: {0: 22GiB}\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "models.m.max_memory" in result.stdout + result.stderr
    assert "no budget for GPU 1" in result.stdout + result.stderr
