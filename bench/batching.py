"""What continuous batching buys: the gateway batching per decoding step vs per `generate`
call, side by side. `python -m bench.batching [--seconds 6] [--levels 1 4 16 32]`

Closed-loop clients come back one by one as their replies arrive. Batching whole
`generate` calls, a request that arrives while a batch runs waits for all of it, and a
row that finished is computed as padding until the longest one ends; with continuous
batching it joins at the next step and finished rows leave at once. Two measurements:
total tokens/s of closed-loop clients (as benchmark 2), and the time to first token of a
streamed request sent while other clients keep long replies running.
"""

from __future__ import annotations

import argparse
import asyncio

from bench import clients
from bench.common import MODEL_NAME, PER_GENERATE, gateway_server, model_path, serving
from bench.concurrency import Slice, measure, merge
from bench.report import median, ms, percentile

SETTINGS = {"per generate call": False, "continuous (default)": True}
LONG = 200  # tokens each background reply asks for


async def first_token_under_load(
    target: clients.Target, background: int, probes: int
) -> list[float]:
    """Seconds to the first streamed text of `probes` requests, one after another, while
    `background` clients keep LONG-token replies running."""
    async with clients.client() as http:
        stopping = asyncio.Event()

        async def keep_busy() -> None:
            while not stopping.is_set():
                await clients.complete(http, target, LONG)

        busy = [asyncio.create_task(keep_busy()) for _ in range(background)]
        await asyncio.sleep(1.0)  # let the background batch form
        waits = []
        for _ in range(probes):
            waits.append(await clients.first_content(http, target, 4))
            await asyncio.sleep(0.05)
        stopping.set()
        await asyncio.gather(*busy)
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 4, 16, 32])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--background", type=int, default=4)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    model = model_path()
    slices: dict[tuple[str, int], list[Slice]] = {}
    with (
        serving(gateway_server(model, PER_GENERATE)) as static,
        serving(gateway_server(model)) as continuous,
    ):
        servers = dict(zip(SETTINGS, (static, continuous), strict=True))
        for window in range(args.windows):
            for level in args.levels:
                order = list(servers.items())
                order = order[window % 2 :] + order[: window % 2]  # alternate who goes first
                for name, server in order:
                    target = clients.Target("gateway", server.url, "openai", MODEL_NAME)
                    piece = asyncio.run(measure(target, level, args.seconds / args.windows))
                    slices.setdefault((name, level), []).append(piece)
        waits = {
            name: asyncio.run(
                first_token_under_load(
                    clients.Target("gateway", server.url, "openai", MODEL_NAME),
                    args.background,
                    args.probes,
                )
            )
            for name, server in servers.items()
        }
    print("clients  " + "  ".join(f"{n:>24}" for n in SETTINGS) + "  ratio")
    for level in args.levels:
        rates = [merge(slices[(name, level)]).tokens_per_s for name in SETTINGS]
        cells = "  ".join(f"{rate:>18.0f} tok/s" for rate in rates)
        print(f"{level:>7}  {cells}  {rates[1] / rates[0]:.2f}x")
    print(
        f"\ntime to first token while {args.background} clients keep {LONG}-token replies "
        f"running ({args.probes} streamed requests, one at a time)"
    )
    for name, values in waits.items():
        print(f"  {name:>24}: median {ms(median(values))}, p90 {ms(percentile(values, 90))}")


if __name__ == "__main__":
    main()
