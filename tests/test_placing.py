"""The loader places a model exactly where `plan` says, and never off the entry's devices.

DeepSeek-MoE-16B's real config and code, built on the meta device: no GPU, no weights.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.base import LoadSpec
from adapters.deepseek_moe import DeepSeekMoEAdapter
from gateway.worker import placing
from gateway.worker.__main__ import LoadFailure, _load_on_devices
from gateway.worker.placing import PlacementError
from gateway.worker.plan import plan
from gateway.worker.spec import WorkerSpec
from tests.support import ROOT

GIB = 2**30
DEEPSEEK = ROOT / "configs" / "deepseek-moe-16b-chat"
# Its config code, written for transformers 4.x, sets a key 5.x renamed.
pytestmark = pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def one_meta_build() -> Iterator[None]:
    """Both sides build the same architecture; building it once keeps the tests quick."""
    with pytest.MonkeyPatch.context() as patch:
        build = functools.cache(placing.meta_model)

        def cached(path: Any, trust: bool, revision: str | None = None) -> Any:
            return build(str(path), trust, revision)

        patch.setattr(placing, "meta_model", cached)
        yield


def loader_map(budget: dict[int | str, int]) -> Any:
    gpus = sum(isinstance(key, int) for key in budget)
    spec = LoadSpec(DEEPSEEK, "bfloat16", gpus=gpus, max_memory=budget, trust_remote_code=True)
    return DeepSeekMoEAdapter(spec).model_kwargs()["device_map"]


def planned(budget: dict[int | str, int]) -> dict[str, Any]:
    request = {"config": str(DEEPSEEK), "dtype": "bfloat16", "trust_remote_code": True}
    return plan({**request, "budget": {str(k): v for k, v in budget.items()}})


@pytest.mark.parametrize("second_gpu", [22, 12])
def test_the_loader_places_every_module_where_plan_shows_it(second_gpu: int) -> None:
    budget: dict[int | str, int] = {0: 22 * GIB, 1: second_gpu * GIB}
    shown = planned(budget)
    assert loader_map(budget) == shown["device_map"]
    assert set(shown["device_map"].values()) == {0, 1}  # it fits: nothing on disk
    assert shown["placed"]["0"] > 20 * GIB  # the first GPU fills first, as `plan` says


def test_a_model_too_big_for_its_gpus_is_refused_before_anything_loads() -> None:
    with pytest.raises(PlacementError, match=r"land on disk, outside the model's devices"):
        loader_map({0: 10 * GIB, 1: 10 * GIB})


def test_cpu_offload_happens_only_when_the_budget_names_the_cpu() -> None:
    placed = loader_map({0: 10 * GIB, 1: 10 * GIB, "cpu": 64 * GIB})
    assert set(placed.values()) == {0, 1, "cpu"}
    assert placed["lm_head"] == "cpu"


class Loaded:
    """An adapter after `load()`: what matters here is where accelerate put the modules."""

    def __init__(self, device_map: dict[str, Any]) -> None:
        self.model = type("Model", (), {"hf_device_map": device_map, "device": "cuda:0"})()

    def load(self) -> None:
        pass


def worker_spec(max_memory: dict[str, int]) -> WorkerSpec:
    entry: dict[str, Any] = {"source": "x", "devices": [2, 3], "max_memory": {}}
    entry["max_memory"] = {{"0": "2", "1": "3"}.get(k, k): v for k, v in max_memory.items()}
    return WorkerSpec.model_validate(
        {"name": "m", "entry": entry, "weights": "x", "socket": "s", "cache_dir": "c"}
        | {"gpus": 2, "max_memory": max_memory}
    )


@pytest.mark.parametrize("off_device", ["disk", "cpu"])
def test_a_worker_whose_modules_landed_off_its_devices_refuses_to_serve(
    off_device: str,
) -> None:
    landed = {"model.embed_tokens": 0, "model.layers.0": 1, "lm_head": off_device}
    spec = worker_spec({"0": GIB, "1": GIB})
    with pytest.raises(LoadFailure, match=rf"does not fit devices \[2, 3\].*land on {off_device}"):
        _load_on_devices(spec, Loaded(landed))


def test_modules_on_the_cpu_are_served_when_the_entry_allows_cpu_offload() -> None:
    landed = {"model.embed_tokens": 0, "model.layers.0": 1, "lm_head": "cpu"}
    _load_on_devices(worker_spec({"0": GIB, "1": GIB, "cpu": 8 * GIB}), Loaded(landed))
    with pytest.raises(LoadFailure):  # disk is never allowed, even then
        _load_on_devices(worker_spec({"0": GIB, "1": GIB, "cpu": GIB}), Loaded({"x": "disk"}))
