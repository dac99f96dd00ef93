"""Which Python interpreter runs a model's worker, and building per-model environments.

Without `python_env` a worker runs on the gateway's own interpreter. With
`python_env.python` it runs on that interpreter. With `python_env.requirements` it runs in
a virtual environment under `envs_dir`, named after the model and a digest of its
requirements, built by `llm-gateway env build NAME` (or `--all`), or by the gateway on the
model's first load when `gateway.auto_build_envs` is on (`ensure_python`):

- `python -m venv --without-pip` from the base interpreter (the one running the gateway);
- a `.pth` file appends the base environment's site-packages *after* the new one's, so the
  model environment sees torch, accelerate, fastapi, uvicorn and pydantic from the base
  (no second multi-GB torch) while its own packages, e.g. `transformers==4.47.1`, shadow
  the base's newer ones;
- the base's pip installs the requirements into it (`pip --python`), with the base's torch
  version as a constraint so that nothing can pull another torch; its notes about the
  base's own copies of the packages it installs (which it cannot and should not uninstall)
  are reworded as what they are (`calm_pip_output`);
- a marker file written last says the build finished; a half-built environment is never
  used and is rebuilt from scratch.

Nothing here imports torch: versions are read with importlib.metadata.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from gateway.registry.config import ModelEntry

log = logging.getLogger(__name__)
MARKER = "llm-gateway-env.json"
PTH_NAME = "_llm_gateway_base.pth"
# Run inside an environment: what it would import, without importing any of it.
PROBE = """
import importlib.metadata as m, json, platform, sys
def dist(name):
    try:
        d = m.distribution(name)
    except m.PackageNotFoundError:
        return None
    return {"version": d.version, "location": str(d.locate_file(""))}
print(json.dumps({"python": platform.python_version(), "executable": sys.executable,
                  "torch": dist("torch"), "transformers": dist("transformers")}))
"""


class Output(Protocol):
    """Where a build's output goes: a terminal, or the gateway's log and progress."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


class EnvironmentMissing(Exception):
    """The model's Python environment does not exist yet."""


class EnvironmentBuildFailed(Exception):
    """Creating the environment or installing its requirements failed."""


@dataclass(frozen=True)
class BuiltEnv:
    path: Path
    python: str
    versions: dict[str, Any]
    seconds: float | None  # None when it was already built


def env_dir(name: str, entry: ModelEntry, envs_dir: Path) -> Path:
    assert entry.python_env is not None
    digest = hashlib.sha256("\n".join(entry.python_env.requirements).encode()).hexdigest()[:10]
    return envs_dir / f"{name}-{digest}"


def python_for(name: str, entry: ModelEntry, envs_dir: Path) -> str:
    if entry.python_env is None:
        return sys.executable
    if entry.python_env.python:
        python = Path(entry.python_env.python).expanduser()
        if "/" not in entry.python_env.python:  # a bare name such as python3.10
            return shutil.which(str(python)) or _missing_interpreter(name, python)
        return str(python) if python.exists() else _missing_interpreter(name, python)
    path = env_dir(name, entry, envs_dir)
    if not (path / MARKER).exists():
        raise EnvironmentMissing(
            f"model {name!r} runs in its own Python environment, which is not built yet; "
            f"run `llm-gateway env build {name}`"
        )
    return str(path / "bin" / "python")


async def ensure_python(
    name: str,
    entry: ModelEntry,
    envs_dir: Path,
    *,
    auto_build: bool,
    on_progress: Callable[[dict[str, Any]], None],
) -> str:
    """`python_for`, building a missing requirements environment first when allowed.

    The build runs in a thread (pip takes minutes); its output goes to the log and, line
    by line, to `on_progress` as the model's `environment` stage, as a download does.
    """
    try:
        return python_for(name, entry, envs_dir)
    except EnvironmentMissing as exc:
        if entry.python_env is None or not entry.python_env.requirements:
            raise
        if not auto_build:
            raise EnvironmentMissing(f"{exc} (gateway.auto_build_envs is off)") from exc
    loop = asyncio.get_running_loop()

    def report(line: str) -> None:
        log.info("[%s] env build: %s", name, line)
        message = {"event": "progress", "stage": "environment", "message": line}
        loop.call_soon_threadsafe(on_progress, message)

    path = env_dir(name, entry, envs_dir)
    report(f"building {path} ({', '.join(entry.python_env.requirements)})")
    built = await asyncio.to_thread(build_env, name, entry, envs_dir, out=_Lines(report))
    report(f"built in {built.seconds or 0:.1f}s: {describe(built.versions)}")
    return built.python


class _Lines(io.TextIOBase):
    """A text stream that hands each complete, non-blank line to a callback."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self._emit(line.strip())
        return len(text)


def _missing_interpreter(name: str, python: Path) -> NoReturn:
    raise EnvironmentMissing(f"model {name!r}: python_env.python {python} does not exist")


def build_env(
    name: str, entry: ModelEntry, envs_dir: Path, *, rebuild: bool = False, out: Output
) -> BuiltEnv:
    """Build (or find) the environment of a model whose `python_env` lists requirements."""
    assert entry.python_env is not None and entry.python_env.requirements
    path = env_dir(name, entry, envs_dir)
    python = str(path / "bin" / "python")
    if (path / MARKER).exists() and not rebuild:
        return BuiltEnv(path, python, probe(python), None)
    started = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], "creating the venv", out)
    site = Path(_run([python, "-c", _PURELIB], "finding its site-packages", out).strip())
    (site / PTH_NAME).write_text("".join(f"{p}\n" for p in base_site_dirs()))
    constraints = path / "llm-gateway-constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in base_pins()))
    install = [sys.executable, "-m", "pip", "--python", python, "install"]
    install += ["--disable-pip-version-check", "-c", str(constraints)]
    _run([*install, *entry.python_env.requirements], "installing the requirements", out, show=True)
    versions = probe(python)
    marker = {"requirements": entry.python_env.requirements, "base": sys.prefix, **versions}
    (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return BuiltEnv(path, python, versions, time.perf_counter() - started)


_PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def base_site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def base_pins() -> list[str]:
    """Constraints that keep a model environment on the base's torch build."""
    try:
        return [f"torch=={importlib.metadata.version('torch')}"]
    except importlib.metadata.PackageNotFoundError:
        return []


def probe(python: str) -> dict[str, Any]:
    """Python, torch and transformers as the interpreter `python` would import them."""
    result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EnvironmentBuildFailed(f"{python} does not run: {result.stderr.strip()[-500:]}")
    versions: dict[str, Any] = json.loads(result.stdout)
    return versions


def describe(versions: dict[str, Any]) -> str:
    """One line for people: python, transformers, and torch with where it comes from."""
    torch = versions.get("torch") or {}
    transformers = versions.get("transformers") or {}
    base = set(base_site_dirs())
    shared = " (the base environment's)" if torch.get("location") in base else ""
    return (
        f"python {versions.get('python')}, "
        f"transformers {transformers.get('version', 'not installed')}, "
        f"torch {torch.get('version', 'not installed')}{shared}"
    )


def _run(command: list[str], doing: str, out: Output, show: bool = False) -> str:
    """Run a build step; `show` streams its output (pip's) to `out` as it comes."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:  # the `with` closes the pipe however the loop ends
        assert process.stdout is not None
        lines = []
        for line in calm_pip_output(process.stdout) if show else process.stdout:
            lines.append(line)
            if show:
                out.write("    " + line)
                out.flush()
    if process.returncode != 0:
        tail = "".join(lines[-20:]).rstrip()
        raise EnvironmentBuildFailed(f"{doing} failed (exit {process.returncode}):\n{tail}")
    return "".join(lines)


# pip's words for what the base-site-packages design does on purpose: a package of the base
# environment is seen inside the new one, so pip tries to uninstall it before installing the
# environment's own version, finds it outside the environment, and leaves it (as it should).
_FOUND = re.compile(r"\s*Found existing installation: (?P<name>\S+) (?P<version>\S+)\s*$")
_OUTSIDE = re.compile(r"\s*Not uninstalling (?P<name>\S+) at (?P<where>.+), outside environment")
_CANT = re.compile(r"\s*Can't uninstall '[^']+'\. No files were found to uninstall\.\s*$")
_ATTEMPT = re.compile(r"\s*Attempting uninstall: \S+\s*$")
_RESOLVER = re.compile(r"ERROR: pip's dependency resolver does not currently take into account")
_CONFLICT = re.compile(
    r"(?P<who>\S+ \S+) requires (?P<wants>.+), but you have (?P<has>.+) which is incompatible\."
)


def calm_pip_output(lines: Iterable[str]) -> Iterator[str]:
    """pip's install output, with its messages about the base environment's packages said
    as what they are: the base keeps its copy, the environment's own version shadows it,
    and base packages that want another version are noted, not reported as errors."""
    found: tuple[str, str] | None = None
    for line in lines:
        if _ATTEMPT.match(line) or _CANT.match(line):
            continue
        if match := _FOUND.match(line):
            found = (match["name"], match["version"])
            continue
        outside = _OUTSIDE.match(line)
        if found and outside:
            yield (
                f"  {found[0]} {found[1]} stays in the base environment; "
                "this environment's own version shadows it\n"
            )
        elif found:  # a real uninstall follows: pip's own line was right
            yield f"    Found existing installation: {found[0]} {found[1]}\n"
        found = None
        if outside:
            continue
        if _RESOLVER.match(line):
            yield "note: base-environment packages that want other versions than this one has:\n"
        elif match := _CONFLICT.match(line.strip()):
            yield f"  {match['who']} wants {match['wants']}; this environment has {match['has']}\n"
        else:
            yield line
