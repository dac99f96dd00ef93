"""Results: tables printed to the terminal, saved as JSON, and rendered into Markdown."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import WORK

RESULTS = WORK / "results"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank: a value that was really observed."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@dataclass
class Goal:
    text: str  # the target, e.g. "at most 1.15x direct"
    measured: str
    met: bool


@dataclass
class Section:
    key: str
    title: str
    command: str
    columns: list[str]
    rows: list[list[str]]
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        widths = [
            max(len(str(c)) for c in col) for col in zip(self.columns, *self.rows, strict=True)
        ]
        lines = [self.title, ""]
        for row in [self.columns, *self.rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        for goal in self.goals:
            verdict = "MET" if goal.met else "MISSED"
            lines.append(f"target {goal.text}: {goal.measured} -> {verdict}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"`{self.command}`", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        lines.append("")
        for goal in self.goals:
            verdict = "**met**" if goal.met else "**missed**"
            lines.append(f"- Target {goal.text}: {goal.measured}, {verdict}.")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def save(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.key}.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def load(key: str) -> Section | None:
    path = RESULTS / f"{key}.json"
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    raw["goals"] = [Goal(**g) for g in raw.get("goals", [])]
    return Section(**raw)


def finish(section: Section) -> Section:
    print(section.text(), flush=True)
    section.save()
    return section
