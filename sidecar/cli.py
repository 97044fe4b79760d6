"""Command line: ``sidecar run``, ``sidecar drain``, ``sidecar check-config``.

The only module that calls ``sys.exit``.  Exit codes: 0 fine, 1 runtime failure,
2 bad configuration or usage (before any port is bound).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from . import __version__
from .config import Config, ConfigError, load, to_yaml
from .values import parse_duration

__all__ = ("main",)

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A reverse-proxy sidecar that makes application shutdowns lossless.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy (with -- CMD ARGS: also run and wrap the app)",
                         usage="sidecar run [--config PATH] [--listen H:P] [--admin H:P] "
                               "[--upstream URL] [-- CMD ARG...]")
    _config_flag(run)
    run.add_argument("--listen", metavar="H:P", help="proxy listener (overrides listen)")
    run.add_argument("--admin", metavar="H:P", help="admin listener (overrides admin)")
    run.add_argument("--upstream", metavar="URL", help="upstream URL (overrides upstream.url)")

    drain = sub.add_parser("drain", help="ask a running sidecar to drain; exit 0 once drained")
    drain.add_argument("--admin", metavar="URL", default="http://127.0.0.1:9901",
                       help="admin base URL (default http://127.0.0.1:9901); "
                            "the token comes from SIDECAR_ADMIN_TOKEN")
    drain.add_argument("--no-wait", action="store_true", help="return once the drain has started")
    drain.add_argument("--timeout", metavar="DURATION", default="120s",
                       help="give up after this long (default 120s)")

    check = sub.add_parser("check-config", help="validate and print the effective config")
    _config_flag(check)
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help="YAML config file (default: $SIDECAR_CONFIG, else built-in defaults)")


def _load(args: argparse.Namespace, flags: dict[str, str | None]) -> Config:
    path = args.config or os.environ.get("SIDECAR_CONFIG") or None
    return load(path, env=os.environ, flags=flags)


def _config_problems(exc: ConfigError) -> int:
    print("sidecar: invalid configuration:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    args = _parser().parse_args(argv)
    if command is not None and args.command != "run":
        _parser().error("'-- CMD' is only for 'sidecar run'")
    if command == []:
        _parser().error("'--' must be followed by the command to run")

    if args.command == "check-config":
        try:
            config = _load(args, {})
        except ConfigError as exc:
            return _config_problems(exc)
        sys.stdout.write(to_yaml(config))
        return EXIT_OK
    if args.command == "drain":
        return _drain(args)
    return _run(args, command)


def _run(args: argparse.Namespace, command: list[str] | None) -> int:
    try:
        config = _load(args, {"listen": args.listen, "admin": args.admin, "upstream": args.upstream})
    except ConfigError as exc:
        return _config_problems(exc)

    from . import log, server  # after validation: nothing is bound before this point

    log.setup(level=config.logging.level, fmt=config.logging.format)
    loop_factory = None
    if command is None:  # wrap mode reaps children on SIGCHLD, which uvloop keeps for itself
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(server.run(config, command=command))
    except server.StartupError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return exc.exit_code


def _drain(args: argparse.Namespace) -> int:
    from .client import DrainFailed, request_drain

    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        print(f"sidecar drain: --timeout: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        summary = request_drain(args.admin, token=os.environ.get("SIDECAR_ADMIN_TOKEN") or None,
                                wait=not args.no_wait, timeout=timeout)
    except DrainFailed as exc:
        print(f"sidecar drain: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(summary))
    return EXIT_OK
