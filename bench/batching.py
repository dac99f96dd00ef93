"""What continuous batching buys: the gateway batching per decoding step vs per `generate`
call, side by side. `python -m bench.batching [--seconds 6] [--levels 1 4 16 32]`

Closed-loop clients come back one by one as their replies arrive. Batching whole
`generate` calls, a request that arrives while a batch runs waits for all of it, and a
row that finished is computed as padding until the longest one ends; with continuous
batching it joins at the next step and finished rows leave at once.
"""

from __future__ import annotations

import argparse
import asyncio

from bench import clients
from bench.common import MODEL_NAME, gateway_server, model_path, serving
from bench.concurrency import Slice, measure, merge

SETTINGS = {"per generate call": False, "continuous (default)": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 4, 16, 32])
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    model = model_path()
    slices: dict[tuple[str, int], list[Slice]] = {}
    with (
        serving(gateway_server(model, continuous=False)) as static,
        serving(gateway_server(model, continuous=True)) as continuous,
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
    print("clients  " + "  ".join(f"{n:>24}" for n in SETTINGS) + "  ratio")
    for level in args.levels:
        rates = [merge(slices[(name, level)]).tokens_per_s for name in SETTINGS]
        cells = "  ".join(f"{rate:>18.0f} tok/s" for rate in rates)
        print(f"{level:>7}  {cells}  {rates[1] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
