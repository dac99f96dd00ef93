"""What a GPU worker reports it holds, with `torch.cuda` faked: no GPU here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.lifecycle.budget import measured
from gateway.registry.config import ModelEntry
from gateway.worker.memory import CUDA_CONTEXT_BYTES, baseline, kv_cache_bound, memory_report
from tests.support import ROOT

GIB = 2**30
MIB = 2**20


@dataclass
class FakeCuda:
    """Two GPUs as the caching allocator and the driver see them."""

    allocated: dict[int, int]
    reserved: dict[int, int]
    used: dict[int, int]  # device-wide, every process's memory
    total: int = 80 * GIB

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch

        for name, value in {
            "is_available": lambda: True,
            "device_count": lambda: len(self.used),
            "memory_allocated": lambda i: self.allocated[i],
            "memory_reserved": lambda i: self.reserved[i],
            "mem_get_info": lambda i: (self.total - self.used[i], self.total),
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)


def split_tiny_model() -> Any:
    """A two-layer model whose map says layer 0 is on GPU 0 and layer 1 on GPU 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.hf_device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "model.rotary_emb": 1,
        "lm_head": 1,
    }
    return model


def test_a_gpu_models_footprint_counts_reserve_context_and_a_full_batchs_kv_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = FakeCuda(
        allocated={0: 3 * GIB, 1: 2 * GIB},
        reserved={0: 0, 1: 0},
        used={0: 10 * GIB, 1: GIB // 2},  # GPU 0 is shared with another process
    )
    cuda.install(monkeypatch)
    start = baseline(2)
    # The load: the allocator reserves more than it hands out; cuBLAS takes 256 MiB on
    # GPU 0 outside the allocator.
    cuda.reserved = {0: 4 * GIB, 1: 5 * GIB // 2}
    cuda.used = {0: 10 * GIB + 4 * GIB + 256 * MIB, 1: GIB // 2 + 5 * GIB // 2}
    report = memory_report(split_tiny_model(), start, max_batch_size=8, context_length=1024)
    kv = 2 * 2 * 2 * 16 * 4 * 8 * 1024  # layers, kv heads, head dim, float32, batch, context
    assert report["kv_cache_bytes"] == kv
    assert report["gpu_kv_cache_bytes"] == {"0": kv // 2, "1": kv // 2}  # a layer each
    assert report["gpu_context_bytes"] == {
        "0": CUDA_CONTEXT_BYTES + 256 * MIB,
        "1": CUDA_CONTEXT_BYTES,
    }
    held = measured(ModelEntry(source="x", devices=[2, 3]), report)
    assert held == {
        "2": 4 * GIB + CUDA_CONTEXT_BYTES + 256 * MIB + kv // 2,
        "3": 5 * GIB // 2 + CUDA_CONTEXT_BYTES + kv // 2,
    }


def test_the_kv_cache_bound_of_deepseek_moe_16b_at_8_rows_of_4096_tokens_is_7_gib() -> None:
    import torch

    config = SimpleNamespace(
        **json.loads((ROOT / "configs/deepseek-moe-16b-chat/config.json").read_text())
    )
    assert kv_cache_bound(config, torch.bfloat16, 8, 4096) == 7 * GIB
    assert kv_cache_bound(SimpleNamespace(), torch.bfloat16, 8, 4096) == 0  # not a KV model


def test_a_cpu_worker_reports_no_gpu_memory() -> None:
    report = memory_report(split_tiny_model(), baseline(0), 1, 16)
    assert "gpu_bytes" not in report and report["weights_bytes"] > 0
