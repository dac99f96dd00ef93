"""What vLLM takes of each device (gateway/backends/engines/memory.py), and the budgets that count
it: a vLLM model holds its `gpu_memory_utilization` of every GPU, whatever its weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.engines.argv import vllm_argv
from gateway.backends.engines.memory import (
    ACTIVATION_ALLOWANCE,
    DEFAULT_UTILIZATION,
    EngineConfigError,
    flag_value,
    human_int,
    reservation,
    tensor_parallel_size,
    utilization,
)
from gateway.lifecycle import budget
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.config import ModelEntry
from gateway.registry.load import parse_registry
from tests.fakes import FakeLauncher

GIB = 2**30
MIB = 2**20


def vllm(**fields: Any) -> ModelEntry:
    return ModelEntry.model_validate({"source": "/models/m", "engine": "vllm", **fields})


@pytest.fixture
def nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two 24 GiB GPUs, as nvidia-smi lists them (the program on PATH is the seam)."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\nprintf "0, 24576\\n1, 24576\\n"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    return smi


def test_on_gpus_vllm_holds_its_fraction_of_every_gpu_whatever_its_weights(
    nvidia_smi: Path,
) -> None:
    two = vllm(devices=[0, 1], max_memory={0: "22GiB", 1: "22GiB"})
    held = reservation(two, 1 * GIB, {}, None)
    assert set(held) == {"0", "1"}
    assert held["0"] == held["1"] == int(round(22 / 24, 4) * 24 * GIB)
    # The same fraction the launch passes to vLLM.
    argv = vllm_argv("m", two, "/models/m", "127.0.0.1", 1)
    assert int(float(argv[argv.index("--gpu-memory-utilization") + 1]) * 24 * GIB) == held["0"]
    unset = reservation(vllm(devices=[1]), 1 * GIB, {}, None)
    assert unset == {"1": int(DEFAULT_UTILIZATION * 24 * GIB)}  # vLLM's own default


def test_engine_args_that_size_vllm_are_what_it_is_held_to() -> None:
    totals = {"0": 24 * GIB, "1": 24 * GIB}
    half = vllm(devices=[0, 1], max_memory={0: "22GiB", 1: "22GiB"},
                engine_args={"gpu-memory-utilization": 0.5})  # fmt: skip
    assert reservation(half, GIB, {}, totals) == {"0": 12 * GIB, "1": 12 * GIB}
    argv = vllm_argv("m", half, "/models/m", "127.0.0.1", 1, gpu_totals=totals)
    assert argv.count("--gpu-memory-utilization") == 1  # the entry's, not a derived one
    sized = vllm(devices=[0, 1], engine_args=["--kv-cache-memory-bytes=4G"])
    per_gpu = 5 * GIB + 4 * GIB + ACTIVATION_ALLOWANCE  # half of 10 GiB of weights
    assert reservation(sized, 10 * GIB, {}, totals) == {"0": per_gpu, "1": per_gpu}


def test_vllm_cpu_holds_its_weights_and_the_kv_space_its_environment_names() -> None:
    entry = vllm(env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert reservation(entry, 3 * GIB, {"VLLM_CPU_KVCACHE_SPACE": "9"}, None) == {
        "cpu": 5 * GIB  # the entry's env wins over the gateway's, which the engine inherits
    }
    assert reservation(vllm(), 3 * GIB, {"VLLM_CPU_KVCACHE_SPACE": "1"}, None) == {"cpu": 4 * GIB}
    # Neither set: vLLM's CPU build grows to its fraction of the machine's RAM.
    assert reservation(vllm(), 3 * GIB, {}, None, ram_bytes=100 * GIB) == {
        "cpu": int(DEFAULT_UTILIZATION * 100 * GIB)
    }


def test_engine_args_are_read_in_both_forms_and_the_last_value_wins() -> None:
    listed = vllm(engine_args=["--tensor-parallel-size", "4", "--enforce-eager",
                               "--tensor_parallel_size=2"])  # fmt: skip
    assert flag_value(listed, "tensor-parallel-size") == "2"
    assert flag_value(listed, "enforce-eager") == "true"
    assert flag_value(listed, "max-model-len") is None
    mapped = vllm(engine_args={"enforce-eager": False, "max_model_len": 2048})
    assert flag_value(mapped, "enforce-eager") is None
    assert flag_value(mapped, "max-model-len") == "2048"
    assert tensor_parallel_size(vllm(devices=[0, 1])) == 2
    assert tensor_parallel_size(listed) == 2
    assert utilization(vllm(devices=[0]), {"0": GIB}) == DEFAULT_UTILIZATION
    assert (human_int("4G"), human_int("25.6k"), human_int("4096")) == (4 * GIB, 25600, 4096)
    with pytest.raises(EngineConfigError, match="not a size"):
        human_int("lots")


def test_a_gpu_nvidia_smi_does_not_list_is_an_error(nvidia_smi: Path) -> None:
    with pytest.raises(EngineConfigError, match="GPU 5 of `devices` is not listed"):
        reservation(vllm(devices=[5]), GIB, {}, None)


def test_without_nvidia_smi_the_estimate_takes_each_gpus_max_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    entry = vllm(devices=[0, 1], max_memory={0: "20GiB", 1: "21GiB"}, memory_bytes="8GiB")
    assert budget.estimate(entry, None) == {"0": 20 * GIB, "1": 21 * GIB}
    transformers = entry.model_copy(update={"engine": "transformers"})
    assert budget.estimate(transformers, None) == budget.split(transformers, 8 * GIB)


async def test_a_vllm_model_is_evicted_for_what_vllm_holds_not_for_its_weights(
    nvidia_smi: Path,
) -> None:
    text = """
gateway: {memory_budget: {"0": 24GiB}}
models:
  v: {source: /v, engine: vllm, devices: [0], memory_bytes: 1GiB}
  t: {source: /t, devices: [0], memory_bytes: 4GiB}
"""
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(text), launcher)
    async with supervisor.lease("v"):
        pass
    held = supervisor.status(supervisor.get("v"))["memory"]["held_bytes"]
    assert held == {"0": int(DEFAULT_UTILIZATION * 24 * GIB)}  # not its 1 GiB of weights
    async with supervisor.lease("t"):  # 4 GiB more than the GPU has beside vLLM: v goes
        pass
    assert launcher.alive() == ["t"]
    await supervisor.shutdown()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {
                "engine_args": {"tensor-parallel-size": "two", "kv-cache-memory-bytes": "1G"},
                "devices": [0],
            },
            "not a positive",
        ),
        ({"engine_args": {"gpu-memory-utilization": "most"}, "devices": [0]}, "not a number"),
        ({"env": {"VLLM_CPU_KVCACHE_SPACE": "1.5"}}, "not a whole number of GiB"),
    ],
)
def test_a_size_vllm_would_refuse_is_a_clear_error(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(EngineConfigError, match=message):
        reservation(vllm(**fields), GIB, {}, {"0": 24 * GIB})
