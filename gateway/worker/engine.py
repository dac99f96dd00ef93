"""Dynamic batching: concurrent requests share decoding steps on one generation thread.

Requests are queued as `Row`s. With continuous batching (the default, for models whose
cache can be spliced: see `decoding.py`), the thread decodes a running batch one step at
a time; between steps, rows that arrived are prefilled and join it, and finished or
cancelled rows leave it, so nobody waits for a whole batch and no finished row is
computed as padding. Otherwise rows are gathered into whole `generate` calls with per-row
sampling and stopping (see `sampling.py`): the thread takes the first waiting row, gathers
more for up to `batch_wait_s` (none if rows were already waiting: they waited long
enough), up to `max_batch_size`. Either way each row reports its tokens as they come and
ends on its own; a cancelled row stops within a step. Generation runs off the event loop,
so the worker's HTTP side stays responsive while the model computes.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapters.base import Adapter, TransformersAdapter
from gateway.errors import GatewayError, OutOfMemory
from gateway.worker.rows import Row

if TYPE_CHECKING:
    from gateway.worker.decoding import RunningBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRecord:
    """One batched forward pass: a whole `generate` call, or one continuous decoding step."""

    size: int
    prompt_tokens: int
    new_tokens: int
    seconds: float


class Engine:
    def __init__(
        self,
        adapter: Adapter,
        max_batch_size: int,
        batch_wait_s: float,
        on_batch: Callable[[BatchRecord], None] | None = None,
        continuous: bool = True,
    ) -> None:
        limit = adapter.max_batch_size
        self.adapter = adapter
        self.max_batch_size = min(max_batch_size, limit) if limit else max_batch_size
        self.batch_wait_s = batch_wait_s
        self.continuous = continuous and _can_splice(adapter)
        self.on_batch = on_batch
        self._queue: queue.Queue[Row | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self._stopping = False
        self.busy_rows = 0
        self.last_progress = time.monotonic()  # batch start or latest decoding step

    # -- public, called from the event loop ------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, row: Row) -> None:
        if self._stopping:
            raise GatewayError("the worker is shutting down")
        self._queue.put(row)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def mode(self) -> str:
        return "continuous" if self.continuous else "per-generate"

    def stalled_for(self) -> float:
        """Seconds the running batch has gone without a decoding step (0 when idle)."""
        return time.monotonic() - self.last_progress if self.busy_rows else 0.0

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the generation thread -------------------------------------------------------------

    def _run(self) -> None:
        if self.continuous:
            self._run_continuous()
            return
        while (batch := self._gather()) is not None:
            live = [row for row in batch if not row.finish_if_cancelled()]
            if not live:
                continue
            self.last_progress = time.monotonic()
            self.busy_rows = len(live)
            try:
                self._generate(live)
            except Exception as exc:  # one bad batch must not kill the worker
                self._fail(live, exc)
            finally:
                self.busy_rows = 0

    def _run_continuous(self) -> None:
        running: RunningBatch | None = None
        closing = False
        while True:
            if running is None:
                if closing or (arrived := self._gather()) is None:
                    return
            else:
                arrived, closing = self._take_waiting(self.max_batch_size - len(running), closing)
            try:
                running = self._advance(running, arrived)
            except Exception as exc:  # one bad step fails its rows, not the worker
                held = running.rows if running else []  # arrivals already absorbed, or not
                absorbed = {id(row) for row in held}
                self._fail(held + [row for row in arrived if id(row) not in absorbed], exc)
                running = None
            self.busy_rows = len(running) if running else 0

    def _take_waiting(self, room: int, closing: bool) -> tuple[list[Row], bool]:
        """Rows that arrived during the last step, as many as the batch has room for."""
        taken: list[Row] = []
        while len(taken) < room and not closing:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:  # stop requested: finish the running rows, take no more
                closing = True
            else:
                taken.append(row)
        return taken, closing

    def _advance(self, running: RunningBatch | None, arrived: list[Row]) -> RunningBatch | None:
        """Admit the rows that arrived, then run one decoding step; returns the running
        batch, or None once it has no rows left."""
        import torch

        from gateway.worker.decoding import RunningBatch

        started = time.perf_counter()
        model = self.adapter.model
        live = [row for row in arrived if not row.finish_if_cancelled()]
        involved = (running.rows if running else []) + live
        before = [len(row.output_ids) for row in involved]
        with torch.inference_mode():
            if live:
                self.busy_rows = len(involved)
                pad = self.adapter.pad_token_id()
                joined = RunningBatch.prefill(model, live, pad, _input_device(model))
                if running is None:
                    running = joined
                else:
                    running.absorb(joined)
            if running is None:
                return None
            for row in running.rows:  # before spending a step on rows nobody waits for
                row.finish_if_cancelled()
            running.drop_finished()
            if len(running):
                running.step(model)
        self.last_progress = time.monotonic()
        running.drop_finished()
        grown = [len(row.output_ids) - count for row, count in zip(involved, before, strict=True)]
        if self.on_batch is not None and any(grown):
            self.on_batch(
                BatchRecord(
                    size=sum(1 for tokens in grown if tokens),  # rows this pass advanced
                    prompt_tokens=sum(len(row.prompt_ids) for row in live),
                    new_tokens=sum(grown),
                    seconds=time.perf_counter() - started,
                )
            )
        return running if len(running) else None

    def _fail(self, rows: list[Row], exc: Exception) -> None:
        error = _as_gateway_error(exc)
        if error.status >= 500:
            log.exception("generation failed")
        for row in rows:
            row.fail(error)
        _free_memory()

    def _gather(self) -> list[Row] | None:
        """Wait for a row, then take the rows already waiting (or wait `batch_wait_s` for
        company when none were), up to `max_batch_size`."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        waited = not self._queue.empty()
        deadline = time.monotonic() + (0.0 if waited else self.batch_wait_s)
        while len(batch) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                row = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:  # stop requested: serve what we hold, then exit
                self._queue.put(None)
                break
            batch.append(row)
        return batch

    def _generate(self, rows: list[Row]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from gateway.worker.decoding import left_pad
        from gateway.worker.sampling import RowSampler, RowStopper

        started = time.perf_counter()
        pad = self.adapter.pad_token_id()
        input_ids, attention = left_pad([row.prompt_ids for row in rows], pad)
        device = _input_device(self.adapter.model)
        self.adapter.before_generate()
        with torch.inference_mode():
            self.adapter.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                logits_processor=LogitsProcessorList([RowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList([RowStopper(rows, self._stepped)]),
                max_new_tokens=max(row.params.max_new_tokens for row in rows),
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=None,
                pad_token_id=pad,
                eos_token_id=sorted(rows[0].stop_ids) or None,
                use_cache=True,
            )
        for row in rows:  # generate may end on its own length limit before a row noticed
            row.finish("cancelled" if row.cancelled.is_set() else "length")
        if self.on_batch is not None:
            self.on_batch(
                BatchRecord(
                    size=len(rows),
                    prompt_tokens=sum(len(r.prompt_ids) for r in rows),
                    new_tokens=sum(len(r.output_ids) for r in rows),
                    seconds=time.perf_counter() - started,
                )
            )

    def _stepped(self) -> None:
        self.last_progress = time.monotonic()


def _can_splice(adapter: Adapter) -> bool:
    from gateway.worker.decoding import supports_continuous

    # The decoding loop makes no `generate` call, so a `before_generate` hook would never run.
    hook = getattr(type(adapter), "before_generate", None)
    if hook is not None and hook is not TransformersAdapter.before_generate:
        return False
    return supports_continuous(adapter.model)


def _input_device(model: Any) -> Any:
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else model.device


def _as_gateway_error(exc: Exception) -> GatewayError:
    import torch

    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return OutOfMemory(f"out of memory while generating: {exc}".strip()[:500])
    return GatewayError(f"generation failed: {type(exc).__name__}: {exc}"[:500])


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
