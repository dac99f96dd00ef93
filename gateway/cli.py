"""`llm-gateway` (also `python -m gateway`): serve, check, models, pull, plan, env build, schema."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.registry.config import ModelEntry, parse_bytes
from gateway.registry.hub import local_source_problems, remote_code_warnings
from gateway.registry.load import ConfigError, ConfigIssue, LoadedRegistry, load_registry

DEFAULT_CONFIG = "models.yaml"
Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from gateway.api.auth import KeySourceError

    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except KeySourceError as exc:
        print(f"{args.config}: gateway.auth: {exc}", file=sys.stderr)
        return 2
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    commands = parser.add_subparsers(metavar="COMMAND")

    serve = _command(commands, "serve", "run the gateway", run_serve)
    serve.add_argument("--host", help="interface to bind (default: gateway.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: gateway.port, 6006)")
    serve.add_argument(
        "--cluster",
        metavar="ray[://ADDRESS]",
        help=(
            "serve the models on a Ray cluster: `ray` starts a local one, `ray:auto` or "
            "`ray:HOST:PORT` joins one, `ray://HOST:PORT` through Ray Client "
            "(default: gateway.cluster; unset: this machine alone)"
        ),
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    _command(commands, "check", "validate the registry file", run_check)
    _command(commands, "models", "list the registry's models", run_models)

    pull = _command(commands, "pull", "download a model's weights from its hub", run_pull)
    pull.add_argument("name", metavar="NAME")

    plan = _command(commands, "plan", "show how a model's layers fall over its devices", run_plan)
    plan.add_argument("name", metavar="NAME")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--gpu-memory", metavar="SIZE", type=_byte_size,
        help="`engine: vllm`: each GPU's memory (e.g. 24GiB) where nvidia-smi is absent",
    )  # fmt: skip

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of the registry file",
        description="print the JSON Schema of models.yaml (docs/models.schema.json holds it)",
    )
    schema.set_defaults(run=run_schema)

    env = commands.add_parser("env", help="per-model Python environments")
    env_commands = env.add_subparsers(metavar="ACTION")
    build = _command(env_commands, "build", "build models' Python environments", run_env_build)
    build.add_argument("names", nargs="*", metavar="NAME", help="models whose python_env to build")
    build.add_argument(
        "--all", action="store_true", help="every model whose python_env lists requirements"
    )
    build.add_argument("--rebuild", action="store_true", help="start over even if built")
    return parser


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    run: Command,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=text, description=text)
    sub.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="registry file (models.yaml)")
    sub.set_defaults(run=run)
    return sub


def _byte_size(text: str) -> int:
    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a size above 0, got {text!r}")
    return size


def run_check(args: argparse.Namespace) -> int:
    loaded = load_registry(args.config)
    issues = [
        ConfigIssue(f"models.{name}.source", message, hint, loaded.line(("models", name, "source")))
        for name, entry in loaded.registry.models.items()
        for message, hint in local_source_problems(entry)
    ]
    issues += _template_issues(loaded)
    if issues:
        raise ConfigError(args.config, issues)
    for warning in remote_code_warnings(loaded.registry.models):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    count = len(loaded.registry.models)
    print(f"{args.config}: OK ({count} model{'s' if count != 1 else ''})")
    return 0


def _template_issues(loaded: LoadedRegistry) -> list[ConfigIssue]:
    """Each model's `chat_template:` rendered once on a sample conversation."""
    from gateway.registry.chat_templates import TemplateProblem, render_sample

    issues = []
    for name, entry in loaded.registry.models.items():
        if entry.chat_template is None:
            continue
        try:
            render_sample(entry.chat_template)
        except TemplateProblem as exc:
            loc = ("models", name, "chat_template")
            hint = "fix the template: it must render system, user and assistant messages"
            issues.append(ConfigIssue(".".join(loc), str(exc), hint, loaded.line(loc)))
    return issues


def run_schema(args: argparse.Namespace) -> int:
    from gateway.registry.schema import render

    sys.stdout.write(render())
    return 0


def run_models(args: argparse.Namespace) -> int:
    registry = load_registry(args.config).registry
    default = registry.gateway.default_model
    rows = [("NAME", "HUB", "SOURCE", "ADAPTER", "DEVICES")]
    for name, entry in registry.models.items():
        devices = entry.devices if entry.devices == "cpu" else ",".join(map(str, entry.devices))
        source = entry.upstream.url if entry.upstream else entry.source or ""
        label = f"{name} (default)" if name == default else name
        rows.append(
            (label, "remote" if entry.upstream else entry.hub, source, entry.adapter, devices)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def run_pull(args: argparse.Namespace) -> int:
    import subprocess

    from gateway.registry import hub

    loaded = load_registry(args.config)
    entry = _entry(loaded, args.name)
    if entry is None or entry.source is None:
        print(f"{args.name}: nothing to pull (no hub source)", file=sys.stderr)
        return 2
    cache = Path(loaded.registry.gateway.cache_dir)
    found = hub.locate(entry, entry.source, cache)
    if found is not None or entry.hub == "local":
        print(f"{args.name}: {found or 'no download for a local path'}: nothing to pull")
        return 0 if found else 2
    print(f"{args.name}: pulling {entry.hub}:{entry.source} into {hub.hub_cache(entry, cache)}")
    request = {"name": args.name, "entry": entry.model_dump(mode="json"), "cache": str(cache)}
    # A subprocess: the hub libraries (modelscope imports torch) stay out of this process.
    done = subprocess.run(
        [sys.executable, "-m", "gateway.worker.pull"],
        input=json.dumps(request), stdout=subprocess.DEVNULL, text=True, check=False,
    )  # fmt: skip
    return done.returncode


def run_plan(args: argparse.Namespace) -> int:
    from gateway.lifecycle import placement

    loaded = load_registry(args.config)
    entry = _entry(loaded, args.name)
    if entry is None:
        return 2
    settings = loaded.registry.gateway
    try:
        plan = placement.make_plan(
            args.name, entry, Path(settings.cache_dir), Path(settings.envs_dir), args.gpu_memory
        )
    except placement.PlanError as exc:
        print(f"{args.name}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan, indent=2) if args.json else placement.render(plan))
    return 0 if plan["fits"] else 1


def run_env_build(args: argparse.Namespace) -> int:
    from gateway.backends import envs

    loaded = load_registry(args.config)
    envs_dir = Path(loaded.registry.gateway.envs_dir)
    names = list(args.names)
    if args.all:
        models = loaded.registry.models.items()
        names += [n for n, e in models if e.python_env and e.python_env.requirements]
        if not names:
            print(f"{args.config}: no model has python_env.requirements; nothing to build")
    elif not names:
        print("env build: name the models to build, or give --all", file=sys.stderr)
        return 2
    entries = [(name, _entry(loaded, name)) for name in dict.fromkeys(names)]
    for name, entry in entries:
        if entry is None:
            return 2
        spec = entry.python_env
        if spec is None or spec.python:
            where = spec.python if spec and spec.python else sys.executable
            try:
                versions = envs.probe(envs.python_for(name, entry, envs_dir))
            except (envs.EnvironmentMissing, envs.EnvironmentBuildFailed) as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                return 1
            print(f"{name}: runs on {where} ({envs.describe(versions)}); nothing to build")
            continue
        path = envs.env_dir(name, entry, envs_dir)
        if args.rebuild or not (path / envs.MARKER).exists():
            print(f"{name}: building {path} ({', '.join(spec.requirements)})", flush=True)
        try:
            built = envs.build_env(name, entry, envs_dir, rebuild=args.rebuild, out=sys.stdout)
        except envs.EnvironmentBuildFailed as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        done = "already built" if built.seconds is None else f"built in {built.seconds:.1f}s"
        print(f"{name}: {done}: {envs.describe(built.versions)}")
    return 0


def _entry(loaded: LoadedRegistry, name: str) -> ModelEntry | None:
    entry = loaded.registry.models.get(name)
    if entry is None:
        known = ", ".join(sorted(loaded.registry.models)) or "(none)"
        print(f"no model {name!r} in {loaded.path}; models: {known}", file=sys.stderr)
    return entry


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.api.connections import ConnectionGuard, guarded_protocol
    from gateway.app import create_app
    from gateway.backends.rundir import RunDirTooLong
    from gateway.serving import DrainingServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per worker call is noise
    loaded: LoadedRegistry = load_registry(Path(args.config))
    for warning in remote_code_warnings(loaded.registry.models):
        logging.getLogger("gateway").warning("%s", warning)
    settings = loaded.registry.gateway
    address = args.cluster or settings.cluster
    cluster = None
    if address is not None:
        from gateway.backends.cluster.connect import ClusterUnavailable, connect
        from gateway.registry.config import GatewaySettings

        try:
            GatewaySettings(cluster=address)  # the same rule as models.yaml
            cluster = connect(address)
        except (ValueError, ClusterUnavailable) as exc:
            print(f"llm-gateway: --cluster {address}: {exc}", file=sys.stderr)
            return 2
    try:
        app = create_app(loaded, cluster=cluster)
    except RunDirTooLong as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise

    def limits() -> tuple[float, int]:  # read per connection: a reload applies at once
        current = app.state.supervisor.registry.gateway
        return current.header_timeout_s, current.max_connections

    config = uvicorn.Config(
        app,
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        log_level=args.log_level,
        http=guarded_protocol(ConnectionGuard(limits)),
        timeout_graceful_shutdown=5,  # after the drain: connections still open get 5 s
    )
    DrainingServer(config, app.state.drain).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
