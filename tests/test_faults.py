"""One out-of-memory detector for the worker, whatever torch version raised the error."""

from __future__ import annotations

import sys
import types

import pytest

from gateway.worker.__main__ import _failure_kind
from gateway.worker.engine import _as_gateway_error
from gateway.worker.faults import is_out_of_memory


class CudaOom(RuntimeError):
    """torch.cuda.OutOfMemoryError as torch 1.13–2.4 define it."""


@pytest.fixture
def old_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch before 2.5: no `torch.OutOfMemoryError`, only `torch.cuda.OutOfMemoryError`."""
    fake = types.ModuleType("torch")
    fake.cuda = types.SimpleNamespace(OutOfMemoryError=CudaOom)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake)


def raised_from(cause: BaseException) -> BaseException:
    try:
        raise RuntimeError("the model's own wrapper failed") from cause
    except RuntimeError as exc:
        return exc


OUT_OF_MEMORY = [
    CudaOom("bland words"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"),
    MemoryError(),
    raised_from(CudaOom("bland words")),
]
OTHER = [RuntimeError("indices should be either on cpu or on the same device"), ValueError("x")]


@pytest.mark.usefixtures("old_torch")
@pytest.mark.parametrize("exc", OUT_OF_MEMORY, ids=repr)
def test_out_of_memory_is_recognised_on_a_torch_without_OutOfMemoryError(
    exc: BaseException,
) -> None:
    assert is_out_of_memory(exc)
    assert _failure_kind(exc) == "out_of_memory"  # a load that ran out of memory


@pytest.mark.usefixtures("old_torch")
@pytest.mark.parametrize("exc", OTHER, ids=repr)
def test_other_failures_are_not_out_of_memory(exc: BaseException) -> None:
    assert not is_out_of_memory(exc)
    assert _failure_kind(exc) == "load_error"


@pytest.mark.usefixtures("old_torch")
def test_a_failed_batch_on_an_old_torch_is_reported_as_out_of_memory() -> None:
    error = _as_gateway_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert error.status == 503 and error.code == "out_of_memory"
    assert _as_gateway_error(RuntimeError("boom")).status == 500


def test_the_current_torch_out_of_memory_error_is_recognised() -> None:
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("bland words"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("bland words"))
