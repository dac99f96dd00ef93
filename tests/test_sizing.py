"""The default batch size: the rows whose KV cache fits the memory the model has left."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.backends.meminfo import meminfo_bytes
from gateway.registry.config import ModelEntry
from gateway.worker import sizing
from gateway.worker.spec import WorkerSpec
from tests.support import Gateway, write_config

MiB = 2**20


def llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    shape = {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 256}
    return LlamaConfig(**{**shape, **overrides})


def fake_model(config: Any, dtype_bytes: int = 4, weights: int = 0) -> Any:
    import torch

    dtype = {2: torch.float16, 4: torch.float32}[dtype_bytes]
    parameter = torch.zeros(weights // dtype_bytes, dtype=dtype)
    return SimpleNamespace(config=config, dtype=dtype, parameters=lambda: iter([parameter]))


def spec(gpus: int = 0, max_memory: dict[str, int] | None = None, **entry: Any) -> WorkerSpec:
    return WorkerSpec(
        name="m",
        entry=ModelEntry.model_validate({"source": "/m", **entry}),
        weights="/m",
        socket="/tmp/m.sock",
        cache_dir="/tmp",
        gpus=gpus,
        max_memory=max_memory,
    )


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer() -> None:
    assert sizing.kv_bytes_per_token(llama(), 4) == 2 * 4 * 8 * 32 * 4
    grouped = llama(num_key_value_heads=2, head_dim=64)  # grouped-query attention
    assert sizing.kv_bytes_per_token(grouped, 2) == 2 * 4 * 2 * 64 * 2
    assert sizing.kv_bytes_per_token(SimpleNamespace(d_model=8), 4) is None
    # A remote-code config: plain attributes, no get_text_config, no num_key_value_heads.
    plain = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    assert sizing.kv_bytes_per_token(plain, 2) == 2 * 2 * 4 * 16 * 2


def test_rows_that_fit_are_bounded_by_memory_and_the_cap() -> None:
    assert sizing.rows_that_fit(MiB, 10 * MiB, 64) == 8  # 80% of 10 MiB
    assert sizing.rows_that_fit(MiB, 1000 * MiB, 32) == 32
    assert sizing.rows_that_fit(MiB, 0, 32) == 1  # never none: one row is tried
    assert sizing.rows_that_fit(None, 1000 * MiB, 32) == sizing.UNKNOWN_SHAPE_ROWS


def test_the_default_batch_is_not_a_fixed_eight() -> None:
    assert ModelEntry(source="/m").batching.max_batch_size == "auto"
    assert ModelEntry.model_validate({"source": "/m", "batching": {"max_batch_size": 3}})


def test_auto_on_cpu_fits_the_budget_left_over_the_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    per_row = 2 * 4 * 8 * 32 * 4 * 1000  # 1000 tokens of context
    monkeypatch.setattr(sizing, "mem_available", lambda: 100 * per_row)
    model = fake_model(llama(), weights=4 * MiB)
    assert sizing.batch_size(spec(), model, 1000) == 32  # capped by max_concurrency
    assert sizing.batch_size(spec(limits={"max_concurrency": 100}), model, 1000) == 64
    budget = {"cpu": 4 * MiB + 10 * per_row}
    assert sizing.batch_size(spec(max_memory=budget), model, 1000) == 8
    assert sizing.batch_size(spec(), model, 100_000) == 1  # one row at a long context
    explicit = spec(batching={"max_batch_size": 3}, max_memory=budget)
    assert sizing.batch_size(explicit, model, 100_000) == 3


def test_auto_on_gpus_sums_what_each_device_has_left(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    per_row = 2 * 4 * 8 * 32 * 2 * 1000
    free = {0: 10 * per_row, 1: 5 * per_row}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 2 * per_row)
    model = fake_model(llama(), dtype_bytes=2)
    assert sizing.batch_size(spec(gpus=2, devices=[0, 1]), model, 1000) == 12  # 80% of 15
    # A budget on GPU 0 leaves it 3 rows over what torch already reserved there.
    budget = {"0": 5 * per_row}
    assert sizing.batch_size(spec(gpus=2, devices=[0, 1], max_memory=budget), model, 1000) == 6


def test_meminfo_reads_the_field_asked_for(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 50 kB\n")
    assert meminfo_bytes("MemAvailable", str(meminfo)) == 50 * 1024
    assert meminfo_bytes("MemTotal", str(meminfo)) == 100 * 1024
    assert meminfo_bytes("Mem", str(meminfo)) is None  # a prefix of a field is not the field
    assert meminfo_bytes("MemTotal", str(tmp_path / "absent")) is None
    meminfo.write_text("MemTotal: lots kB\n")
    assert meminfo_bytes("MemTotal", str(meminfo)) is None
    assert sizing.mem_available() == meminfo_bytes("MemAvailable")


def test_models_shows_the_batch_size_the_worker_chose(tiny_model: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"""
        models:
          auto:
            source: {tiny_model}
            limits: {{max_concurrency: 24}}
          fixed:
            source: {tiny_model}
            batching: {{max_batch_size: 3}}
        """,
    )
    with Gateway(config) as gateway:
        for name in ("auto", "fixed"):
            assert gateway.post(f"/{name}", {"prompt": "hi", "max_length": 2}).status_code == 200
        cards = gateway.models()
        # The tiny model's cache at full context is a few MiB a row: the cap binds.
        assert cards["auto"]["runtime"]["max_batch_size"] == 24
        assert cards["fixed"]["runtime"]["max_batch_size"] == 3


def test_the_batch_size_and_the_memory_report_count_the_kv_cache_alike() -> None:
    import torch

    from gateway.worker.memory import kv_cache_bound

    gpt2 = SimpleNamespace(n_layer=2, n_head=4, n_embd=64)  # GPT-2's names for the shape
    assert sizing.kv_bytes_per_token(gpt2, 4) == 2 * 2 * 4 * 16 * 4
    assert kv_cache_bound(gpt2, torch.float32, 8, 100) == 2 * 2 * 4 * 16 * 4 * 8 * 100
