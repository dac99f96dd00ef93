"""What the engine's refill wait buys: the gateway with and without it, side by side.

    python -m bench.refill [--seconds 6] [--levels 4 16 32]

Closed-loop clients come back one by one as their replies arrive. Without a refill wait
the first to return starts a batch alone and the others queue behind a whole batch; with
it, the engine waits (at most `refill_wait_ms` after a batch of n ends) for n rows.
"""

from __future__ import annotations

import argparse
import asyncio

from bench import clients
from bench.common import MODEL_NAME, gateway_server, model_path, serving
from bench.concurrency import Slice, measure, merge

SETTINGS = {"refill 0 ms (default)": 0.0, "refill 30 ms": 30.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--levels", type=int, nargs="*", default=[4, 16, 32])
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    model = model_path()
    slices: dict[tuple[str, int], list[Slice]] = {}
    with (
        serving(gateway_server(model, refill_wait_ms=0.0)) as without,
        serving(gateway_server(model, refill_wait_ms=30.0)) as with_refill,
    ):
        servers = dict(zip(SETTINGS, (without, with_refill), strict=True))
        for window in range(args.windows):
            for level in args.levels:
                order = list(servers.items())
                order = order[window % 2 :] + order[: window % 2]  # alternate who goes first
                for name, server in order:
                    target = clients.Target("gateway", server.url, "openai", MODEL_NAME)
                    piece = asyncio.run(measure(target, level, args.seconds / args.windows))
                    slices.setdefault((name, level), []).append(piece)
    print("clients  " + "  ".join(f"{n:>24}" for n in SETTINGS) + "  ratio")
    for level in args.levels:
        rates = [merge(slices[(name, level)]).tokens_per_s for name in SETTINGS]
        cells = "  ".join(f"{rate:>18.0f} tok/s" for rate in rates)
        print(f"{level:>7}  {cells}  {rates[1] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
