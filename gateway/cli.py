"""`llm-gateway` (also `python -m gateway`): serve, check, models, pull, plan, env build."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.registry import ConfigError, LoadedRegistry, load_registry

DEFAULT_CONFIG = "models.yaml"
Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from gateway.auth import KeySourceError

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
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    _command(commands, "check", "validate the registry file", run_check)
    _command(commands, "models", "list the registry's models", run_models)
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


def run_check(args: argparse.Namespace) -> int:
    loaded = load_registry(args.config)
    count = len(loaded.registry.models)
    print(f"{args.config}: OK ({count} model{'s' if count != 1 else ''})")
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


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.serving import DrainingServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per worker call is noise
    loaded: LoadedRegistry = load_registry(Path(args.config))
    settings = loaded.registry.gateway
    app = create_app(loaded)
    config = uvicorn.Config(
        app,
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,  # after the drain: connections still open get 5 s
    )
    DrainingServer(config, app.state.drain).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
