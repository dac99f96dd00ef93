"""Benchmark 3, time to first token: a streamed request through each server vs `generate`
with a streamer in this process, one request at a time. `python -m bench.ttft`

The servers' figure is the time to the first chunk carrying generated text; the direct
figure is the time to `generate` handing its streamer the first new token, the earliest any
server could send it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import httpx

from bench import clients
from bench.common import (
    MODEL_NAME,
    gateway_server,
    hf_server,
    model_path,
    serving,
    worker_socket,
)
from bench.direct import Direct
from bench.report import Section, finish, median, ms, percentile

TOKENS = 16
DIRECT = "direct generate (streamer)"
Contender = Callable[[], Awaitable[float]]


def run(rounds: int = 40) -> Section:
    model = model_path()
    direct = Direct(model)
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(serving(gateway_server(model)))
        hf = stack.enter_context(serving(hf_server()))
        targets = {
            "gateway (/v1/chat/completions, stream)": clients.Target(
                "gateway", gateway.url, "openai", MODEL_NAME
            ),
            "transformers serve (stream)": clients.Target("hf", hf.url, "openai", str(model)),
        }

        async def main() -> dict[str, list[float]]:
            path, body = targets["gateway (/v1/chat/completions, stream)"].request(TOKENS)
            await asyncio.to_thread(httpx.post, gateway.url + path, json=body, timeout=120)
            uds = httpx.AsyncHTTPTransport(uds=worker_socket(gateway.url, MODEL_NAME))
            async with clients.client() as http, httpx.AsyncClient(transport=uds) as worker:

                async def run_direct() -> float:
                    return direct.first_token(TOKENS)

                contenders: dict[str, Contender] = {DIRECT: run_direct}
                for label, target in targets.items():
                    contenders[label] = _bind(http, target)
                contenders["worker alone (its socket, stream)"] = _bind(
                    worker, clients.Target("worker", "http://worker", "openai", MODEL_NAME)
                )
                return await _measure(contenders, rounds)

        times = asyncio.run(main())
    base = median(times[DIRECT])
    rows = [
        [name, ms(median(v)), ms(percentile(v, 90)), f"{median(v) / base:.2f}x"]
        for name, v in times.items()
    ]
    first = direct.tokenizer.decode(direct.first_new_token())
    whole = (
        "so no server has to hold it back"
        if "\ufffd" not in first
        else ("HALF A CHARACTER: servers hold it back, so their figure includes a second token")
    )
    return Section(
        key="ttft",
        title="3. Time to first token of a streamed request (idle server)",
        command=f"python -m bench.ttft --rounds {rounds}",
        columns=["path", "median", "p90", "vs direct"],
        rows=rows,
        notes=[
            f"{rounds} interleaved rounds after 3 warm-up requests each; the first generated "
            f"token decodes to {first!r}, {whole}.",
        ],
        data={"times": times},
    )


async def _measure(contenders: dict[str, Contender], rounds: int) -> dict[str, list[float]]:
    names = list(contenders)
    for name in names:
        for _ in range(3):
            await contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            times[name].append(await contenders[name]())
    return times


def _bind(http: httpx.AsyncClient, target: clients.Target) -> Contender:
    async def call() -> float:
        return await clients.first_content(http, target, TOKENS)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    finish(run(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
