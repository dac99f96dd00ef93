"""Benchmark 6, cancellation: tokens generated after a client disconnects, through the
gateway, while other requests keep generating. `python -m bench.cancel`

Three background clients stream 300-token replies throughout. Meanwhile clients that ask
for 300 tokens hang up early, one at a time: streamed ones after their 5th chunk of text,
non-streamed ones after 300 ms. Each hang-up's wall-clock time is noted here; the worker
records, for every row it cancels, when it noticed, how many tokens the row had then and
at the end, and the times of its last events (read from the worker's /stats). From those:
- tokens after the client left: the row's final count minus its count at the hang-up (the
  count of its last event before the hang-up, a lower bound, so this errs high);
- tokens after the worker noticed: the same from the worker's notice;
- the lag from hang-up to notice, and from notice to the row's end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench import clients
from bench.common import MODEL_NAME, gateway_server, model_path, serving, worker_socket
from bench.report import Goal, Section, finish, median
from gateway.worker.stats import TIMELINE

LONG = 300
TARGET = 2


@dataclass
class Hangup:
    kind: str  # streamed | non-streamed
    at: float  # wall clock, as the worker's records


def chat(max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": clients.PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def background(http: httpx.AsyncClient, url: str, stop: asyncio.Event) -> list[int]:
    """Stream 300-token replies until told to stop; the completion tokens of each."""
    done: list[int] = []
    while not stop.is_set():
        usage = 0
        async with http.stream("POST", url, json=chat(LONG, True)) as reply:
            async for line in reply.aiter_lines():
                if '"usage":{' in line.replace(" ", ""):
                    usage = int(json.loads(line[5:])["usage"]["completion_tokens"])
        done.append(usage)
    return done


async def hang_up_streamed(http: httpx.AsyncClient, url: str) -> Hangup:
    chunks = 0
    async with http.stream("POST", url, json=chat(LONG, True)) as reply:
        async for line in reply.aiter_lines():
            chunks += clients.has_content(line)
            if chunks == 5:
                break
        at = time.time()
    return Hangup("streamed", at)  # leaving the block closed the connection


async def hang_up_whole(http: httpx.AsyncClient, url: str) -> Hangup:
    request = asyncio.create_task(http.post(url, json=chat(LONG, False)))
    await asyncio.sleep(0.3)
    if request.done():
        raise RuntimeError("a 300-token reply came back within 300 ms; raise LONG")
    at = time.time()  # cancelling closes the connection right after this
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    return Hangup("non-streamed", at)


async def scenario(url: str, cancels: int) -> tuple[list[Hangup], list[int]]:
    async with clients.client(connections=16) as http:
        await http.post(url, json=chat(4, False))  # load the model
        stop = asyncio.Event()
        runners = [asyncio.create_task(background(http, url, stop)) for _ in range(3)]
        await asyncio.sleep(1.0)
        hangups: list[Hangup] = []
        for index in range(cancels):
            hang_up = hang_up_streamed if index % 2 == 0 else hang_up_whole
            hangups.append(await hang_up(http, url))
            await asyncio.sleep(0.4)  # one cancellation at a time, so records pair up
        stop.set()
        finished = [n for runner in runners for n in await runner]
    return hangups, finished


def pair(hangups: list[Hangup], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each hang-up with the first cancelled row the worker noticed after it."""
    pending = sorted(records, key=lambda r: r["noticed_at"])
    paired = []
    for hangup in sorted(hangups, key=lambda h: h.at):
        record = next(r for r in pending if r["noticed_at"] >= hangup.at - 0.001)
        pending.remove(record)
        before = [n for t, n in record["timeline"] if t <= hangup.at]
        whole_life = len(record["timeline"]) < TIMELINE  # nothing was forgotten
        if before or whole_life:
            after_client: int | None = record["tokens"] - max(before, default=0)
        else:  # every remembered event came after the hang-up: no lower bound to use
            after_client = None
        paired.append(
            {
                "kind": hangup.kind,
                "after_client": after_client,
                "after_notice": record["tokens_after_cancel"],
                "notice_lag_s": record["noticed_at"] - hangup.at,
                "stop_lag_s": record["finished_at"] - record["noticed_at"],
            }
        )
    return paired


def run(cancels: int = 20) -> Section:
    with serving(gateway_server(model_path())) as gateway:
        url = gateway.url + "/v1/chat/completions"
        hangups, background_tokens = asyncio.run(scenario(url, cancels))
        time.sleep(0.5)
        transport = httpx.HTTPTransport(uds=worker_socket(gateway.url, MODEL_NAME))
        with httpx.Client(transport=transport, timeout=10) as worker:
            stats = worker.get("http://worker/stats").json()
    paired = pair(hangups, stats["recent_cancels"])
    rows = []
    worst = 0
    for kind in ("streamed", "non-streamed"):
        mine = [p for p in paired if p["kind"] == kind]
        known = [p["after_client"] for p in mine if p["after_client"] is not None]
        unknown = len(mine) - len(known)
        worst = max([worst, *known, 10**9 if unknown else 0])
        rows.append(
            [
                kind,
                str(len(mine)),
                f"{sum(known) / max(1, len(known)):.2f} (max {max(known, default=0)})"
                + (f", {unknown} beyond the timeline" if unknown else ""),
                f"{sum(p['after_notice'] for p in mine) / len(mine):.2f} "
                f"(max {max(p['after_notice'] for p in mine)})",
                f"{median([p['notice_lag_s'] for p in mine]) * 1000:.1f} ms",
                f"{median([p['stop_lag_s'] for p in mine]) * 1000:.1f} ms",
            ]
        )
    lengths = sorted(set(background_tokens))
    return Section(
        key="cancel",
        title="6. Cancellation: tokens generated after the client disconnects",
        command=f"python -m bench.cancel --cancels {cancels}",
        columns=[
            "request",
            "cancelled",
            "tokens after the client left: mean (max)",
            "after the worker noticed: mean (max)",
            "hang-up to notice (median)",
            "notice to row's end (median)",
        ],
        rows=rows,
        goals=[
            Goal(f"at most {TARGET} tokens per cancelled request", f"max {worst}", worst <= TARGET)
        ],
        notes=[
            f"The other rows continued: {len(background_tokens)} background replies finished "
            f"normally meanwhile, with {lengths} tokens (greedy: the same reply each time, "
            "ending at the model's end-of-text token before 300).",
            "The worker's own counters, as /metrics shows them: "
            f"{stats['counters']['cancelled_requests']:.0f} cancelled requests, "
            f"{stats['counters']['tokens_after_cancel']:.0f} tokens after the worker noticed.",
        ],
        data={"cancels": paired, "background_tokens": background_tokens},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cancels", type=int, default=20)
    finish(run(parser.parse_args().cancels))


if __name__ == "__main__":
    main()
