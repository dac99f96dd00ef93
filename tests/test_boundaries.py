"""Module boundaries: the gateway process never imports torch or transformers (they belong
to the worker processes), adapters never import the web framework, and the gateway's
packages form layers: registry below backends below lifecycle below api."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT

MODEL_LIBRARIES = {"torch", "transformers"}
WEB_LIBRARIES = {"fastapi", "starlette", "uvicorn"}


def gateway_side_files() -> list[Path]:
    package = ROOT / "gateway"
    return sorted(p for p in package.rglob("*.py") if "worker" not in p.relative_to(package).parts)


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every import in the file, at module level or inside functions."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def run_python(code: str) -> dict[str, list[str]]:
    """Run `code` in a fresh interpreter; it prints a JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, list[str]] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_the_scan_sees_the_gateway_side_and_not_the_worker() -> None:
    names = {str(p.relative_to(ROOT)) for p in gateway_side_files()}
    assert {"gateway/app.py", "gateway/cli.py", "gateway/api/routes/seed.py"} <= names
    assert not any(name.startswith("gateway/worker/") for name in names)


def test_no_gateway_side_module_mentions_an_import_of_torch_or_transformers() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & MODEL_LIBRARIES)
        for path in gateway_side_files()
    }
    assert {name: libs for name, libs in offenders.items() if libs} == {}


def test_no_adapter_imports_the_web_framework() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & WEB_LIBRARIES)
        for path in sorted((ROOT / "adapters").glob("*.py"))
    }
    assert len(offenders) >= 4  # __init__, base and the three families were scanned
    assert {name: libs for name, libs in offenders.items() if libs} == {}


def test_the_running_gateway_side_loads_neither_torch_nor_transformers(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(f"gateway: {{default_model: m}}\nmodels:\n  m: {{source: {tmp_path}}}\n")
    loaded = run_python(
        f"""
        import importlib, json, pkgutil, sys
        import gateway
        imported = []
        for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
            if module.name == "gateway.__main__" or module.name.startswith("gateway.worker"):
                continue
            importlib.import_module(module.name)
            imported.append(module.name)
        from fastapi.testclient import TestClient
        from gateway.app import create_app
        from gateway.cli import main
        from gateway.registry.load import load_registry
        assert main(["check", "--config", {str(config)!r}]) == 0
        assert main(["models", "--config", {str(config)!r}]) == 0
        with TestClient(create_app(load_registry({str(config)!r}))) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").json()["data"][0]["id"] == "m"
            assert client.post("/m", json={{"prompt": ""}}).status_code == 400
            assert client.post("/v1/chat/completions", json={{"model": "x"}}).status_code == 400
        print(json.dumps({{"imported": imported, "modules": sorted(sys.modules)}}))
        """
    )
    assert {
        "gateway.app",
        "gateway.cli",
        "gateway.api.service",
        "gateway.api.routes.openai",
    } <= set(loaded["imported"])
    roots = {name.split(".")[0] for name in loaded["modules"]}
    assert "fastapi" in roots  # the probe did run the web app
    assert roots & MODEL_LIBRARIES == set()


# Each package may import only the packages below it (and the shared `errors`, `http`).
LAYERS = ["registry", "backends", "lifecycle", "api"]


def gateway_imports(path: Path) -> set[str]:
    """The first component under `gateway.` of every import of the gateway in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        names |= {m.split(".")[1] for m in modules if m.startswith("gateway.")}
    return names


def test_each_package_imports_only_the_layers_below_it() -> None:
    package = ROOT / "gateway"
    upward: dict[str, list[str]] = {}
    scanned = 0
    for level, layer in enumerate(LAYERS):
        above = set(LAYERS[level + 1 :])
        for path in sorted((package / layer).rglob("*.py")):
            scanned += 1
            if found := sorted(gateway_imports(path) & above):
                upward[str(path.relative_to(ROOT))] = found
    assert scanned >= 30
    assert upward == {}


def test_the_layer_scan_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from gateway.lifecycle import supervisor\nimport gateway.api.auth\n")
    assert gateway_imports(module) == {"lifecycle", "api"}


def test_importing_every_adapter_loads_no_web_framework() -> None:
    loaded = run_python(
        """
        import importlib, json, sys
        from adapters import ADAPTERS
        for target in ADAPTERS.values():
            importlib.import_module(target.partition(":")[0])
        print(json.dumps({"modules": sorted(sys.modules)}))
        """
    )
    roots = {name.split(".")[0] for name in loaded["modules"]}
    assert "adapters" in roots
    assert roots & WEB_LIBRARIES == set()
