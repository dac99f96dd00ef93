"""The dtype `auto` means and the attention kernel, per GPU and per model (`torch.cuda` faked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters import loading
from adapters.base import LoadSpec, TransformersAdapter
from adapters.loading import attention, torch_dtype


def fake_gpus(monkeypatch: pytest.MonkeyPatch, *capabilities: tuple[int, int]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ([(8, 0)], "bfloat16"),  # A100
        ([(9, 0), (8, 6)], "bfloat16"),
        ([(7, 5)], "float16"),  # T4: no bfloat16
        ([(8, 6), (7, 0)], "float16"),  # one old GPU in the set decides
    ],
)
def test_auto_dtype_is_bfloat16_only_where_every_gpu_supports_it(
    monkeypatch: pytest.MonkeyPatch, capabilities: list[tuple[int, int]], expected: str
) -> None:
    import torch

    fake_gpus(monkeypatch, *capabilities)
    assert torch_dtype("auto", on_gpu=True) == getattr(torch, expected)
    assert torch_dtype("auto", on_gpu=False) == torch.float32
    assert torch_dtype("bfloat16", on_gpu=True) == torch.bfloat16  # asked for: given


class Native:
    _supports_sdpa = True
    _supports_flash_attn = True


class OldNative:  # transformers 4.x spells it with a 2
    _supports_sdpa = True
    _supports_flash_attn_2 = True


class RemoteCode:  # declares nothing: its own attention only
    pass


def test_flash_attention_where_installed_supported_and_half_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    fake_gpus(monkeypatch, (8, 0))
    monkeypatch.setattr(loading, "flash_attn_installed", lambda: True)
    for model in (Native, OldNative):
        assert attention("auto", model, torch.bfloat16, on_gpu=True) == "flash_attention_2"
    assert attention("auto", Native, torch.float32, on_gpu=True) == "sdpa"
    assert attention("auto", Native, torch.bfloat16, on_gpu=False) == "sdpa"
    assert attention("auto", RemoteCode, torch.bfloat16, on_gpu=True) is None
    fake_gpus(monkeypatch, (7, 5))
    assert attention("auto", Native, torch.float16, on_gpu=True) == "sdpa"
    monkeypatch.setattr(loading, "flash_attn_installed", lambda: False)
    fake_gpus(monkeypatch, (9, 0))
    assert attention("auto", Native, torch.bfloat16, on_gpu=True) == "sdpa"


def test_the_entry_overrides_the_attention_choice() -> None:
    import torch

    assert attention("eager", Native, torch.bfloat16, on_gpu=True) == "eager"
    assert attention("sdpa", RemoteCode, torch.float32, on_gpu=False) == "sdpa"


def loader_kwargs(path: Path, **spec: Any) -> dict[str, Any]:
    return TransformersAdapter(LoadSpec(path, **spec)).model_kwargs()


def test_the_loader_asks_for_the_attention_it_chose(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    fake_gpus(monkeypatch, (8, 0))
    monkeypatch.setattr(loading, "flash_attn_installed", lambda: True)
    on_gpu = loader_kwargs(tiny_model, dtype="auto", gpus=1)
    assert on_gpu["attn_implementation"] == "flash_attention_2"
    assert on_gpu["dtype"] == torch.bfloat16 and on_gpu["device_map"] == {"": 0}
    fake_gpus(monkeypatch, (7, 0))
    old = loader_kwargs(tiny_model, dtype="auto", gpus=1)
    assert (old["attn_implementation"], old["dtype"]) == ("sdpa", torch.float16)
    assert loader_kwargs(tiny_model, attention="eager")["attn_implementation"] == "eager"


def test_models_show_the_attention_dtype_and_gpu_numbering_the_worker_runs_with(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from gateway.worker.__main__ import _runtime

    adapter = TransformersAdapter(LoadSpec(tiny_model, dtype="float32", attention="eager"))
    adapter.load()
    engine: Any = SimpleNamespace(max_batch_size=8, mode="continuous")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    runtime = _runtime(adapter, 0.1, 1024, engine)
    assert (runtime["attention"], runtime["dtype"]) == ("eager", "float32")
    assert runtime["device_order"] == "PCI_BUS_ID"
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    assert _runtime(adapter, 0.1, 1024, engine)["device_order"] == "FASTEST_FIRST"


def test_a_cpu_model_larger_than_its_cpu_budget_is_refused_as_plan_says(
    tiny_model: Path,
) -> None:
    from gateway.worker.placing import PlacementError
    from gateway.worker.plan import plan

    request = {"config": str(tiny_model), "dtype": "float32"}
    assert plan({**request, "budget": {"cpu": 10_000}})["device_map"] != {"": "cpu"}
    with pytest.raises(PlacementError, match="land on disk"):
        loader_kwargs(tiny_model, dtype="float32", max_memory={"cpu": 10_000})
    roomy = loader_kwargs(tiny_model, dtype="float32", max_memory={"cpu": 2**30})
    assert roomy["device_map"] == {"": "cpu"}
