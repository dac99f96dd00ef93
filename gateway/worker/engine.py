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

A failure (out of memory, a model error) fails the rows it reached and no others: a failed
prefill only the rows arriving, a failed step the running batch. Memory is emptied once
the failed batch and the exception, with the frames holding its activations, are released.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapters.base import Adapter, TransformersAdapter
from gateway.errors import GatewayError, OutOfMemory
from gateway.worker.faults import is_out_of_memory
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
        self._broken: GatewayError | None = None  # why the generation thread ended early
        self._running: RunningBatch | None = None  # continuous batching: the rows decoding
        self._taken: list[Row] = []  # rows off the queue and not yet done or in `_running`
        self.busy_rows = 0
        self.last_progress = time.monotonic()  # batch start or latest decoding step

    # -- public, called from the event loop ------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, row: Row) -> None:
        if self._broken is not None:
            raise GatewayError(self._broken.message)
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
        try:
            if self.continuous:
                self._run_continuous()
            else:
                self._run_per_generate()
        except BaseException as exc:  # a bug here: say so, and leave nobody waiting
            log.critical("the generation thread stopped: %s", _traceback_text(exc))
            self._abandon(GatewayError(f"the generation thread stopped: {type(exc).__name__}"))

    def _run_per_generate(self) -> None:
        while (batch := self._gather()) is not None:
            live = [row for row in batch if not row.finish_if_cancelled()]
            if not live:
                continue
            self.last_progress = time.monotonic()
            self.busy_rows = len(live)
            self._taken = live
            self._generate_or_fail(live)
            self._taken = []
            self.busy_rows = 0

    def _generate_or_fail(self, rows: list[Row]) -> None:
        try:
            self._generate(rows)
            return
        except Exception as exc:  # one bad batch must not kill the worker
            failure = _describe(exc)
        # Outside the handler: the exception, and the frames holding the batch's
        # activations, are gone before memory is emptied.
        self._fail(rows, failure)

    def _run_continuous(self) -> None:
        closing = False
        while True:
            if self._running is None:
                if closing or (arrived := self._gather()) is None:
                    return
            else:
                room = self.max_batch_size - len(self._running)
                arrived, closing = self._take_waiting(room, closing)
            self._taken = arrived
            self._advance(arrived)
            self._taken = []
            self.busy_rows = len(self._running) if self._running else 0

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

    def _advance(self, arrived: list[Row]) -> None:
        """Admit the rows that arrived, then run one decoding step of the running batch."""
        started = time.perf_counter()
        live = [row for row in arrived if not row.finish_if_cancelled()]
        involved = (self._running.rows if self._running else []) + live
        before = [len(row.output_ids) for row in involved]
        if live:
            self.busy_rows = len(involved)
        self._decode(self._prefill(live))
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

    def _prefill(self, live: list[Row]) -> RunningBatch | None:
        """The arrivals prefilled on their own. The running batch's cache is not touched
        yet, so a failure here fails only the arrivals."""
        if not live:
            return None
        import torch

        from gateway.worker.decoding import RunningBatch

        model = self.adapter.model
        try:
            with torch.inference_mode():
                return RunningBatch.prefill(
                    model, live, self.adapter.pad_token_id(), _input_device(model)
                )
        except Exception as exc:
            failure = _describe(exc)
        self._fail(live, failure)  # after the handler, so its frames are released
        return None

    def _decode(self, joined: RunningBatch | None) -> None:
        """Splice the arrivals into the running batch and run one step; a failure here
        touched the running cache, so it fails every row of the batch."""
        held = (self._running.rows if self._running else []) + (joined.rows if joined else [])
        try:
            self._splice_and_step(joined)
            return
        except Exception as exc:  # one bad step fails its rows, not the worker
            failure = _describe(exc)
        # The failed batch's cache and the exception go before memory is emptied.
        self._running = joined = None
        self._fail(held, failure)

    def _splice_and_step(self, joined: RunningBatch | None) -> None:
        import torch

        with torch.inference_mode():
            if joined is not None:
                if self._running is None:
                    self._running = joined
                else:
                    self._running.absorb(joined)
            running = self._running
            if running is None:
                return
            for row in running.rows:  # before spending a step on rows nobody waits for
                row.finish_if_cancelled()
            running.drop_finished()
            if len(running):
                running.step(self.adapter.model)
            self.last_progress = time.monotonic()
            running.drop_finished()
            if not len(running):
                self._running = None

    def _fail(self, rows: list[Row], error: GatewayError) -> None:
        """Tell each row it failed, then return the memory the failure left; never raises,
        since the generation thread must outlive any one failure."""
        for row in rows:
            row.fail(error)  # never raises: a broken reply channel is logged by the row
        try:
            _free_memory()
        except Exception as exc:
            log.error("freeing memory after a failure failed: %s", _traceback_text(exc))

    def _abandon(self, error: GatewayError) -> None:
        """The generation thread is ending on a bug: fail every row it holds or would take."""
        self._stopping = True
        self._broken = error
        rows = (list(self._running.rows) if self._running else []) + self._taken
        self._running, self._taken = None, []
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            if row is not None:
                rows.append(row)
        self._fail(rows, error)
        self.busy_rows = 0

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


def _describe(exc: Exception) -> GatewayError:
    """The error a failed batch's rows get, logged if it is the server's fault; never
    raises (its caller is a failure handler)."""
    try:
        error = _as_gateway_error(exc)
        if error.status >= 500:
            log.error("generation failed: %s", _traceback_text(exc))
        return error
    except Exception:
        return GatewayError("generation failed")


def _as_gateway_error(exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        # Rows keep the error: without its traceback, it keeps no frame of the failed step.
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        return exc
    if is_out_of_memory(exc):
        return OutOfMemory(f"out of memory while generating: {exc}".strip()[:500])
    return GatewayError(f"generation failed: {type(exc).__name__}: {exc}"[:500])


def _traceback_text(exc: BaseException) -> str:
    # Logged as text, not as exc_info: a log handler that keeps its records (a buffer, a
    # test's capture) would otherwise keep the failed step's tensors alive.
    return "".join(traceback.format_exception(exc)).rstrip()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
