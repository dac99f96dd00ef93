"""Run every benchmark, one after another, and write docs/BENCHMARKS.md and the plot.

    python -m bench.run [--quick] [--only overhead concurrency ...]

Each benchmark also runs alone (`python -m bench.<name>`); this saves each one's result in
.cache/bench/results/, so the document is written from whatever results exist.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import cancel, coldstart, concurrency, health, overhead, ttft
from bench.common import MODEL_SHAPE, ROOT, machine_notes
from bench.report import Section, finish, load

DOCS = ROOT / "docs"
PLOT = DOCS / "bench-concurrency.png"
# Everything below this line in docs/BENCHMARKS.md is written by hand and kept on rewrites.
ANALYSIS = "<!-- analysis: written by hand, kept when bench.run rewrites the figures above -->"
ORDER = ["overhead", "overhead-large", "concurrency", "ttft", "health", "coldstart", "cancel"]


def benchmarks(quick: bool) -> dict[str, Callable[[], Section]]:
    scale = 0.5 if quick else 1.0
    return {
        "overhead": lambda: overhead.run(rounds=int(40 * scale)),
        "overhead-large": lambda: overhead.run(rounds=int(20 * scale), large=True),
        "concurrency": lambda: concurrency.run(seconds=9.0 * scale),
        "ttft": lambda: ttft.run(rounds=int(40 * scale)),
        "health": lambda: health.run(seconds=8.0 * scale),
        "coldstart": lambda: coldstart.run(repeats=3),
        "cancel": lambda: cancel.run(cancels=int(20 * scale)),
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


def document(sections: list[Section], notes: dict[str, str]) -> str:
    shape = MODEL_SHAPE
    commit = _git("rev-parse", "--short", "HEAD").strip()
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "gateway", "bench")
    tree = "with uncommitted changes to gateway/ or bench/" if dirty.strip() else "clean"
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench.run`); each section names the command that "
        "produced its figures, and every benchmark also runs alone. All figures come from one "
        "run, on one machine, with the same model for every server, and compare servers "
        "side by side (interleaved or in rotating order), so read the ratios: absolute times "
        "on this shared machine move from minute to minute.",
        "",
        "## Set-up",
        "",
        f"- Model: a random-weight Llama built by `python -m gateway.worker.tiny --hidden "
        f"{shape['hidden']} --layers {shape['layers']} --init-std {shape['init_std']} "
        f"--seed {shape['seed']}` (2.5 M parameters, float32, byte-level BPE vocabulary "
        "of 600), the test fixture's architecture made 4x wider and 2x deeper so that "
        "compute outweighs HTTP a little more.",
        "- Servers: the gateway (`llm-gateway serve`, one worker for the model, "
        "`batching: {max_batch_size: 32}` and the default gather window of 0 ms); "
        "`bench/seed_server.py`, the seed scripts' pattern (FastAPI, blocking `generate` "
        "in an `async def` handler); `transformers serve --device cpu` (its defaults: "
        "no continuous batching).",
        "- Every server and the in-process baseline run with one intra-op thread "
        "(`OMP_NUM_THREADS=1`), hubs offline; greedy decoding; clients on loopback.",
        f"- Machine: {notes['cpu']}, no GPU; Python {notes['python']}; load average "
        f"{notes['load average (1, 5, 15 min)']} when this document was written (other "
        f"jobs share the machine). Code: commit {commit}, {tree}.",
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
    parser.add_argument("--only", nargs="*", choices=ORDER, help="run these; reuse the rest")
    args = parser.parse_args()
    notes = machine_notes()
    started = time.perf_counter()
    runs = benchmarks(args.quick)
    for key in args.only or ORDER:
        print(f"== {key}", flush=True)
        finish(runs[key]())
    sections = [s for key in ORDER if (s := load(key)) is not None]
    by_key = {s.key: s for s in sections}
    if "concurrency" in by_key:
        plot(by_key["concurrency"], PLOT)
    text = document(sections, notes)
    print(f"ran in {(time.perf_counter() - started) / 60:.1f} min")
    target = DOCS / "BENCHMARKS.md"
    old = target.read_text() if target.exists() else ""
    kept = old[old.index(ANALYSIS) :] if ANALYSIS in old else ANALYSIS + "\n"
    target.write_text(text + "\n" + kept)
    print(f"wrote {DOCS / 'BENCHMARKS.md'} and {PLOT}")


if __name__ == "__main__":
    main()
