"""Run every benchmark, one after another, and write docs/BENCHMARKS.md and the plot.

    python -m bench.run [--quick] [--only overhead concurrency ...]

The document is written from one run of every benchmark, never from saved results of
earlier runs: its header names the commit it ran. `--only` runs some benchmarks and prints
(and saves, in .cache/bench/results/) their results without touching the document; each
benchmark also runs alone (`python -m bench.<name>`).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import (
    cancel,
    cluster,
    coldstart,
    concurrency,
    defaults,
    engines,
    health,
    overhead,
    ttft,
)
from bench.common import MODEL_SHAPE, ROOT, machine_notes, peer_threads
from bench.report import Section, finish

DOCS = ROOT / "docs"
PLOT = DOCS / "bench-concurrency.png"
# Everything below this line in docs/BENCHMARKS.md is written by hand and kept on rewrites.
ANALYSIS = "<!-- analysis: written by hand, kept when bench.run rewrites the figures above -->"
ORDER = [
    "overhead",
    "overhead-large",
    "concurrency",
    "defaults",
    "ttft",
    "health",
    "coldstart",
    "cancel",
    "engines",
    "cluster",
]


def benchmarks(quick: bool) -> dict[str, Callable[[], list[Section]]]:
    """Each benchmark's run; one may write several sections (engines writes two)."""
    scale = 0.5 if quick else 1.0
    return {
        "overhead": lambda: [overhead.run(rounds=int(40 * scale))],
        "overhead-large": lambda: [overhead.run(rounds=int(20 * scale), large=True)],
        "concurrency": lambda: [concurrency.run(seconds=9.0 * scale)],
        "defaults": lambda: [defaults.run(seconds=9.0 * scale)],
        "ttft": lambda: [ttft.run(rounds=int(40 * scale))],
        "health": lambda: [health.run(seconds=8.0 * scale)],
        "coldstart": lambda: [coldstart.run(repeats=3)],
        "cancel": lambda: [cancel.run(cancels=int(20 * scale))],
        "engines": lambda: engines.run(seconds=6.0 * scale, rounds=int(30 * scale)),
        "cluster": lambda: cluster.run(seconds=6.0 * scale, rounds=int(30 * scale), colds=2),
    }


def plot(section: Section, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for name, by_level in section.data["servers"].items():
        levels = sorted(int(level) for level in by_level)
        rates = [by_level[str(level)]["tokens_per_s"] for level in levels]
        axes.plot(levels, rates, marker="o", label=name)
    ceiling = section.data["ceiling"]
    levels = sorted(int(level) for level in ceiling)
    axes.plot(
        levels,
        [ceiling[str(level)] for level in levels],
        linestyle="--",
        color="grey",
        label="ceiling: in-process generate of N rows",
    )
    axes.set_xscale("log", base=2)
    axes.set_xticks([1, 4, 16, 32], labels=["1", "4", "16", "32"])
    axes.set_xlabel("concurrent clients")
    axes.set_ylabel("total tokens/s (32 new tokens per request)")
    axes.set_title("Throughput vs concurrency, same tiny model, same machine, one run")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def code_version() -> str:
    """The commit that runs, read as the run starts (a commit made meanwhile is not it)."""
    commit = _git("rev-parse", "--short", "HEAD").strip()
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "gateway", "bench")
    tree = "with uncommitted changes to gateway/ or bench/" if dirty.strip() else "clean"
    return f"{commit} ({tree})"


def document(sections: list[Section], notes: dict[str, str], minutes: float) -> str:
    shape = MODEL_SHAPE
    threads = peer_threads()
    by_key = {s.key: s for s in sections}
    chosen = by_key["defaults"].data["runtime"][defaults.DEFAULTS] if "defaults" in by_key else {}
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench.run`) at commit {notes['code']}, every "
        f"section from the same run ({minutes:.1f} min); each section names the command that "
        "produced its figures, and every benchmark also runs alone. Every server serves the "
        "same model on the same machine, side by side (interleaved or in rotating order), "
        "so read the ratios: absolute times on a shared machine move from minute to minute.",
        "",
        "## Set-up",
        "",
        f"- Model: a random-weight Llama built by `python -m gateway.worker.tiny --hidden "
        f"{shape['hidden']} --layers {shape['layers']} --init-std {shape['init_std']} "
        f"--seed {shape['seed']}` (2.5 M parameters, float32, byte-level BPE vocabulary "
        "of 600), the test fixture's architecture made 4x wider and 2x deeper so that "
        "compute outweighs HTTP a little more.",
        "- The gateway runs on its defaults: `llm-gateway serve` with a models.yaml that gives "
        "the model's `source` and nothing else. Its worker chose "
        f"`max_batch_size` {chosen.get('max_batch_size', '?')} (`auto`) and "
        f"{chosen.get('threads', '?')} intra-op thread(s) (its share of the cores, one left "
        "to the gateway); continuous batching, no gather window. The one other gateway "
        "row, `batching: {continuous: false}`, calls `generate` as the in-process baseline "
        "does: the serving cost over `generate`, like for like.",
        "- The peers, each with its best documented settings for the workload and the "
        f"same {threads} intra-op thread(s) (`OMP_NUM_THREADS`): `bench/seed_server.py`, the "
        "seed scripts' pattern (FastAPI, blocking `generate` in an `async def` handler, "
        "which has no settings); `transformers serve --device cpu` on its default (one "
        "request at a time, its best for one client) and, for concurrent clients, with "
        "`--continuous-batching`, its documented option for serving many requests; the "
        f"in-process baseline calls `generate` with `torch.set_num_threads({threads})`.",
        "- Hubs offline; greedy decoding; clients on loopback.",
        f"- Machine: {notes['cpu']}, no GPU; Python {notes['python']}; load average "
        f"{notes['load average (1, 5, 15 min)']} when the run started.",
        "",
        f"![tokens/s vs concurrency]({PLOT.name})",
        "",
    ]
    lines += [section.markdown() for section in sections]
    return "\n".join(lines)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the rounds and seconds")
    parser.add_argument(
        "--only", nargs="*", choices=ORDER, help="run these alone; the document is not written"
    )
    args = parser.parse_args()
    notes = {**machine_notes(), "code": code_version()}
    started = time.perf_counter()
    runs = benchmarks(args.quick)
    sections = []
    for key in args.only or ORDER:
        print(f"== {key}", flush=True)
        sections += [finish(section) for section in runs[key]()]
    minutes = (time.perf_counter() - started) / 60
    print(f"ran in {minutes:.1f} min")
    if args.only:
        print("ran a part: docs/BENCHMARKS.md is written only by a run of every benchmark")
        return
    by_key = {s.key: s for s in sections}
    plot(by_key["concurrency"], PLOT)
    target = DOCS / "BENCHMARKS.md"
    old = target.read_text() if target.exists() else ""
    kept = old[old.index(ANALYSIS) :] if ANALYSIS in old else ANALYSIS + "\n"
    target.write_text(document(sections, notes, minutes) + "\n" + kept)
    print(f"wrote {target} and {PLOT}")


if __name__ == "__main__":
    main()
