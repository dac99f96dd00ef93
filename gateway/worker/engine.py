"""Dynamic batching: concurrent requests become batched `generate` calls on one thread.

Requests are queued as `Row`s. The generation thread takes the first waiting row, gathers
more for up to `batch_wait_s` (none if rows were already waiting: they waited long enough),
up to `max_batch_size`, left-pads them into one batch and runs `generate` with per-row
sampling and stopping (see `sampling.py`). Each row reports its tokens as they come and
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
from typing import Any

from adapters.base import Adapter
from gateway.errors import GatewayError, OutOfMemory
from gateway.worker.rows import Row

log = logging.getLogger(__name__)
REFILL_GAP_S = 0.010  # while refilling, a pause this long between arrivals ends the wait


@dataclass(frozen=True)
class BatchRecord:
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
        refill_wait_s: float = 0.0,
    ) -> None:
        limit = adapter.max_batch_size
        self.adapter = adapter
        self.max_batch_size = min(max_batch_size, limit) if limit else max_batch_size
        self.batch_wait_s = batch_wait_s
        self.refill_wait_s = refill_wait_s
        self._last_size = 0  # rows in the latest batch, and when it ended
        self._last_end = 0.0
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

    def stalled_for(self) -> float:
        """Seconds the running batch has gone without a decoding step (0 when idle)."""
        return time.monotonic() - self.last_progress if self.busy_rows else 0.0

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the generation thread -------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._gather()) is not None:
            live = [row for row in batch if not self._drop_cancelled(row)]
            if not live:
                continue
            self.last_progress = time.monotonic()
            self.busy_rows = len(live)
            try:
                self._generate(live)
            except Exception as exc:  # one bad batch must not kill the worker
                error = _as_gateway_error(exc)
                if error.status >= 500:
                    log.exception("generation failed")
                for row in live:
                    row.fail(error)
                _free_memory()
            finally:
                self.busy_rows = 0
                self._last_size, self._last_end = len(live), time.monotonic()

    def _gather(self) -> list[Row] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        target, deadline, gap = self._gather_goal()
        while len(batch) < target:
            timeout = min(deadline - time.monotonic(), gap)
            try:
                row = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:  # stop requested: serve what we hold, then exit
                self._queue.put(None)
                break
            batch.append(row)
        return batch

    def _gather_goal(self) -> tuple[int, float, float]:
        """How many rows to wait for, until when, and how long for each next one.

        Right after a batch of n rows ends, its clients tend to come back at once (each
        sends its next request when its reply arrives); starting with the first to return
        would make the others wait a whole batch behind it. So wait for n, for at most
        `refill_wait_s` after that batch, and only while they keep arriving (a pause of
        REFILL_GAP_S ends the wait). Otherwise rows already queued have waited long
        enough: take them and go; or wait `batch_wait_s` (0 by default) for company.
        """
        now = time.monotonic()
        if now - self._last_end < self.refill_wait_s:
            expected = max(self._last_size, self._queue.qsize() + 1)
            deadline = self._last_end + self.refill_wait_s
            return min(expected, self.max_batch_size), deadline, REFILL_GAP_S
        if not self._queue.empty():
            return self.max_batch_size, now, 0.0
        return self.max_batch_size, now + self.batch_wait_s, self.batch_wait_s

    @staticmethod
    def _drop_cancelled(row: Row) -> bool:
        if row.cancelled.is_set():
            row.finish("cancelled")
            return True
        return False

    def _generate(self, rows: list[Row]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from gateway.worker.sampling import RowSampler, RowStopper

        started = time.perf_counter()
        pad = self.adapter.pad_token_id()
        input_ids, attention = _left_pad([row.prompt_ids for row in rows], pad)
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


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for index, prompt in enumerate(prompts):
        input_ids[index, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention[index, width - len(prompt) :] = 1
    return input_ids, attention


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
