"""Memory planning: LRU eviction, busy and pinned models, refusals with both numbers."""

from __future__ import annotations

from pathlib import Path

from gateway.lifecycle.budget import Resident, estimate, measured, plan, split
from gateway.registry.config import ModelEntry

GiB = 2**30


def resident(
    name: str,
    gib: float,
    last_used: float,
    busy: bool = False,
    pinned: bool = False,
    device: str = "0",
) -> Resident:
    return Resident(name, {device: int(gib * GiB)}, busy, pinned, last_used)


def test_a_model_that_fits_evicts_nothing() -> None:
    result = plan({"0": 10 * GiB}, {"0": 22 * GiB}, [resident("a", 8, 1.0)])
    assert (result.evict, result.blocked_by, result.too_big) == ([], [], None)


def test_least_recently_used_idle_models_go_first_and_only_as_many_as_needed() -> None:
    residents = [resident("old", 8, 1.0), resident("new", 8, 3.0), resident("mid", 4, 2.0)]
    result = plan({"0": 8 * GiB}, {"0": 22 * GiB}, residents)
    assert result.evict == ["old"]
    assert plan({"0": 14 * GiB}, {"0": 22 * GiB}, residents).evict == ["old", "mid"]


def test_a_busy_model_is_never_evicted_the_load_waits_for_it() -> None:
    result = plan({"0": 10 * GiB}, {"0": 12 * GiB}, [resident("busy", 8, 1.0, busy=True)])
    assert result.evict == [] and result.blocked_by == ["busy"]


def test_pinned_models_stay_and_a_load_that_cannot_fit_beside_them_is_refused() -> None:
    residents = [resident("pinned", 8, 1.0, pinned=True), resident("idle", 4, 2.0)]
    assert plan({"0": 10 * GiB}, {"0": 22 * GiB}, residents).evict == []
    refused = plan({"0": 16 * GiB}, {"0": 22 * GiB}, residents).too_big
    assert refused is not None and refused.pinned == 8 * GiB
    assert "pinned models hold 8.0 GiB" in refused.message("big")


def test_a_model_larger_than_its_budget_is_refused_with_both_numbers() -> None:
    refused = plan({"0": 31 * GiB, "1": 1 * GiB}, {"0": 22 * GiB}, []).too_big
    assert refused is not None
    assert "needs 31.0 GiB on device 0, more than its budget of 22.0 GiB" in refused.message("m")


def test_devices_without_a_budget_are_not_limited() -> None:
    assert plan({"cpu": 100 * GiB}, {"0": GiB}, []).too_big is None


def test_an_estimate_splits_over_gpus_by_their_max_memory(tmp_path: Path) -> None:
    entry = ModelEntry(
        source="x", devices=[0, 1], max_memory={"0": "30GiB", "1": "10GiB"}, memory_bytes="40GiB"
    )
    assert split(entry, 40 * GiB) == {"0": 30 * GiB, "1": 10 * GiB}
    assert estimate(entry, None) == {"0": 30 * GiB, "1": 10 * GiB}


def test_an_estimate_from_weight_files_scales_to_the_dtype_it_loads_in(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"torch_dtype": "float32"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4000)
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * 999)  # not weights
    as_bf16 = estimate(ModelEntry(source=str(tmp_path), devices=[0], dtype="bfloat16"), tmp_path)
    as_f32 = estimate(ModelEntry(source=str(tmp_path), devices="cpu"), tmp_path)
    assert as_bf16 == {"0": 2200}  # half the bytes, plus 10% headroom
    assert as_f32 == {"cpu": 4400}


def test_measured_memory_maps_worker_gpu_ordinals_back_to_physical_indices() -> None:
    entry = ModelEntry(source="x", devices=[2, 3])
    assert measured(entry, {"gpu_bytes": {"0": 5, "1": 7}}) == {"2": 5, "3": 7}
    cpu = ModelEntry(source="x")
    assert measured(cpu, {"weights_bytes": 1234, "rss_bytes": 10**9}) == {"cpu": 1234}
    assert measured(cpu, None) is None


def test_a_gpu_footprint_counts_the_reserve_context_and_kv_cache_not_just_allocated() -> None:
    entry = ModelEntry(source="x", devices=[0, 1])
    report = {
        "gpu_bytes": {"0": 10 * GiB, "1": 5 * GiB},
        "gpu_reserved_bytes": {"0": 11 * GiB, "1": 5 * GiB},
        "gpu_context_bytes": {"0": GiB // 2, "1": GiB // 2},
        "gpu_kv_cache_bytes": {"0": 4 * GiB, "1": 3 * GiB},
        "gpu_weights_bytes": {"0": 10 * GiB, "1": 5 * GiB},
    }
    assert measured(entry, report) == {"0": 31 * GiB // 2, "1": 17 * GiB // 2}


def test_a_measured_gpu_footprint_never_drops_below_the_estimate() -> None:
    report = {"gpu_bytes": {"0": 10 * GiB}, "gpu_weights_bytes": {"0": 10 * GiB}}
    assert measured(ModelEntry(source="x", devices=[0]), report) == {"0": 11 * GiB}  # +10%
    stated = ModelEntry(source="x", devices=[0, 1], memory_bytes="40GiB")
    two = {"gpu_bytes": {"0": 15 * GiB, "1": 5 * GiB}}
    assert measured(stated, two) == {"0": 30 * GiB, "1": 10 * GiB}  # scaled to memory_bytes
