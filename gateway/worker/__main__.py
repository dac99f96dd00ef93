"""Entry point of a worker process: `python -m gateway.worker` with LLMGW_WORKER_SPEC set.

Resolves the weights, loads the model through its adapter, starts the batching engine,
serves the OpenAI-compatible API on a unix socket, and reports progress, readiness or
the reason it failed on the control channel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.worker.control import Control, exit_with_gateway
from gateway.worker.sizing import apply_threads, batch_size, thread_count
from gateway.worker.spec import SPEC_ENV, WorkerSpec

if TYPE_CHECKING:
    from gateway.worker.engine import Engine
    from gateway.worker.memory import Baseline

log = logging.getLogger("gateway.worker")


class LoadFailure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def main() -> int:
    control = Control()
    exit_with_gateway()
    logging.basicConfig(
        level=os.environ.get("LLMGW_LOG_LEVEL", "WARNING"),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    spec = WorkerSpec.model_validate_json(os.environ[SPEC_ENV])
    try:
        apply_threads()
        state = load(spec, control)
    except LoadFailure as exc:
        control.send("failed", kind=exc.kind, message=str(exc))
        return 2
    except Exception as exc:  # the loader's own words are the most useful reason
        control.send("failed", kind=_failure_kind(exc), message=f"{type(exc).__name__}: {exc}")
        log.exception("loading %s failed", spec.name)
        return 2
    asyncio.run(serve(spec, state, control))
    return 0


def load(spec: WorkerSpec, control: Control) -> Any:
    from adapters import adapter_class
    from adapters.base import LoadSpec
    from gateway.registry import hub

    started = time.perf_counter()
    entry = spec.entry
    control.progress("resolve", f"locating {entry.hub} weights {spec.weights}")
    path = hub.locate(entry, spec.weights, Path(spec.cache_dir))
    if path is None and entry.hub != "local" and entry.auto_pull:
        path = _pull(spec, control)
    if path is None:
        raise LoadFailure("not_downloaded", hub.missing_message(spec.name, entry, spec.weights))
    load_spec = LoadSpec(
        path=path,
        dtype=entry.dtype,
        gpus=spec.gpus,
        max_memory=_max_memory(spec.max_memory),
        attention=entry.attention,
        trust_remote_code=entry.trust_remote_code,
        revision=entry.revision if entry.hub == "huggingface" else None,
        context_length=entry.limits.context_length,
    )
    adapter = adapter_class(entry.adapter)(load_spec)
    for key, value in adapter.environment().items():
        os.environ.setdefault(key, value)
    start = _check_devices(spec)
    control.progress("load", f"loading {path} with adapter {entry.adapter}")
    _load_on_devices(spec, adapter)
    return _build_state(spec, adapter, start, time.perf_counter() - started)


def _load_on_devices(spec: WorkerSpec, adapter: Any) -> None:
    """Load, and refuse a model placed (or landed) anywhere but the entry's devices."""
    from gateway.worker.placing import PlacementError, allowed_devices, refuse_outside

    try:
        adapter.load()
        placed = getattr(adapter.model, "hf_device_map", None)
        device = getattr(adapter.model, "device", "cpu")
        allowed = allowed_devices(spec.max_memory or {}, spec.gpus)
        refuse_outside(placed or {"": device}, allowed)
    except PlacementError as exc:
        raise LoadFailure(
            "does_not_fit", f"model {spec.name!r} does not fit devices {spec.entry.devices}: {exc}"
        ) from exc


def _pull(spec: WorkerSpec, control: Control) -> Path:
    """First use of a model not downloaded yet: fetch it, reporting progress as it comes."""
    from gateway.registry.hub import WeightsMissing
    from gateway.worker.pull import download, progress_text

    started = time.monotonic()
    tenths = {-1}

    def report(done: int, total: int | None) -> None:
        text = progress_text(done, total, time.monotonic() - started)
        control.progress("download", text, done / total if total else None)
        tenth = int(10 * done / total) if total else -1
        if tenth not in tenths:  # the gateway's log gets a line per 10%
            tenths.add(tenth)
            print(f"download {spec.entry.hub}:{spec.weights}: {text}", file=sys.stderr)

    control.progress("download", f"downloading {spec.entry.hub}:{spec.weights}")
    try:
        return download(spec.entry, spec.weights, Path(spec.cache_dir), report)
    except WeightsMissing as exc:
        raise LoadFailure("download_failed", f"model {spec.name!r}: {exc}") from exc


def _build_state(spec: WorkerSpec, adapter: Any, start: Baseline, load_seconds: float) -> Any:
    from gateway.worker.engine import Engine
    from gateway.worker.memory import memory_report
    from gateway.worker.server import WorkerState
    from gateway.worker.stats import WorkerStats

    batching = spec.entry.batching
    stats = WorkerStats()
    context = adapter.context_length()
    engine = Engine(
        adapter,
        batch_size(spec, adapter.model, context),
        batching.batch_wait_ms / 1000,
        on_batch=stats.on_batch,
        continuous=batching.continuous,
    )
    runtime = {**_runtime(adapter, load_seconds, context, engine), "threads": thread_count()}
    return WorkerState(
        name=spec.name,
        adapter=adapter,
        engine=engine,
        defaults=adapter.sampling_defaults(),
        stop_ids=frozenset(adapter.stop_token_ids()),
        context_length=context,
        info=lambda: {
            **runtime,
            "memory": memory_report(adapter.model, start, engine.max_batch_size, context),
        },
        stall_timeout_s=spec.entry.limits.request_timeout_s,
        default_max_tokens=spec.entry.generation.max_new_tokens,
        stats=stats,
        chat_prompt=_chat_prompt(spec, adapter),
    )


def _chat_prompt(spec: WorkerSpec, adapter: Any) -> Any:
    """The registry's chat template over the adapter's prompt format, if it gives one."""
    if spec.entry.chat_template is None:
        return None
    from adapters.chat_template import TemplatePrompts

    return TemplatePrompts(adapter, spec.entry.chat_template).chat_prompt


async def serve(spec: WorkerSpec, state: Any, control: Control) -> None:
    import uvicorn

    from gateway.worker.server import create_worker_app

    state.engine.start()
    config = uvicorn.Config(
        create_worker_app(state),
        uds=spec.socket,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=300,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no event)
        await asyncio.sleep(0.01)
    if server.started:
        control.send("ready", runtime=state.info())
    await serving
    state.engine.stop()


def _check_devices(spec: WorkerSpec) -> Baseline:
    """Fail early without the GPUs the entry names; else what they hold before the load."""
    from gateway.worker.memory import baseline

    if spec.gpus == 0:
        return baseline(0)
    import torch

    if not torch.cuda.is_available():
        raise LoadFailure(
            "no_gpu",
            f"model {spec.name!r} is placed on GPUs {spec.entry.devices}, but CUDA is "
            "not available on this machine; set `devices: cpu` to run it on the CPU",
        )
    if torch.cuda.device_count() < spec.gpus:
        raise LoadFailure(
            "no_gpu",
            f"model {spec.name!r} needs GPUs {spec.entry.devices}; "
            f"only {torch.cuda.device_count()} are visible",
        )
    return baseline(spec.gpus)


def _max_memory(raw: dict[str, int] | None) -> dict[int | str, int] | None:
    if not raw:
        return None
    return {int(k) if k.isdigit() else k: v for k, v in raw.items()}


def _runtime(adapter: Any, load_seconds: float, context: int, engine: Engine) -> dict[str, Any]:
    import torch
    import transformers

    model = adapter.model
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "adapter": adapter.name,
        "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None),
        "device": str(getattr(model, "device", "cpu")),
        "device_map": getattr(model, "hf_device_map", None),
        # GPU numbering of `devices`: PCI_BUS_ID matches nvidia-smi; CUDA's own default
        # (FASTEST_FIRST) may not on a machine with mixed GPUs.
        "device_order": os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST"),
        "context_length": context,
        "max_batch_size": engine.max_batch_size,
        "batching": engine.mode,
        "load_seconds": round(load_seconds, 3),
        "pid": os.getpid(),
    }


def _failure_kind(exc: BaseException) -> str:
    from gateway.worker.faults import is_out_of_memory

    return "out_of_memory" if is_out_of_memory(exc) else "load_error"


if __name__ == "__main__":
    sys.exit(main())
