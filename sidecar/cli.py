"""Command line: ``sidecar run``, ``drain``, ``check-config``, ``inject`` and ``uninject``.

The only module that calls ``sys.exit``.  Exit codes: 0 fine, 1 runtime failure,
2 bad configuration or usage (before any port is bound); ``sidecar drain`` also
3 when the sidecar was reached but had not drained within ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from . import __version__
from .config import Config, ConfigError, load, to_yaml
from .config.values import parse_duration

__all__ = ("main",)

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_PENDING = 0, 1, 2, 3

_RUN_DESCRIPTION = """\
Run the proxy in front of the app at upstream.url.  With -- CMD ARG... (wrap mode)
also start CMD as the app, forward nothing to it until it is healthy, and once
drained send it exit.signal and exit with its exit code.
SIGTERM or SIGINT (Ctrl-C) starts a drain; a second SIGINT skips to the deadline."""


def _run_epilog() -> str:
    """Precedence, then every setting's variable with its key and default (from the schema)."""
    from .config import SCHEMA
    from .config.sources import dotted, env_name

    lines = ["precedence: built-in defaults < config file < SIDECAR_* environment < flags",
             "", "environment (each sets one config key; see docs/configuration.md):"]
    for section, keys in SCHEMA.items():
        for key, (_, default) in keys.items():
            shown = "null" if default is None else default
            lines.append(f"  {env_name(section, key):<34} {dotted(section, key)} (default {shown})")
    lines += ["  SIDECAR_EXIT_HTTP_URL, SIDECAR_EXIT_HTTP_METHOD  exit.http.url, exit.http.method",
              "", "in wrap mode the app gets exit.signal once drained; for an app that exits cleanly",
              "on Ctrl-C, set SIDECAR_EXIT_SIGNAL=SIGINT (with SIGTERM such an app ends with 143)."]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A reverse-proxy sidecar that makes application shutdowns lossless.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy (with -- CMD ARGS: also run and wrap the app)",
                         usage="sidecar run [--config PATH] [--listen H:P] [--admin H:P] "
                               "[--upstream URL] [-- CMD ARG...]",
                         description=_RUN_DESCRIPTION, epilog=_run_epilog(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_flag(run)
    run.add_argument("--listen", metavar="H:P", help="proxy listener: listen, $SIDECAR_LISTEN")
    run.add_argument("--admin", metavar="H:P", help="admin listener: admin, $SIDECAR_ADMIN")
    run.add_argument("--upstream", metavar="URL",
                     help="the app: upstream.url, $SIDECAR_UPSTREAM_URL")

    drain = sub.add_parser(
        "drain", help="ask a running sidecar to drain; exit 0 once drained",
        description="Ask a running sidecar to drain and wait until it has (for an exec preStop "
                    "hook). The token comes from SIDECAR_ADMIN_TOKEN.",
        epilog="exit codes: 0 drained; 1 unreachable, refused, or drained with aborted requests; "
               "2 bad arguments; 3 reached, but the drain had not finished within --timeout")
    drain.add_argument("--admin", metavar="URL", default="http://127.0.0.1:9901",
                       help="admin base URL, or HOST:PORT as 'run --admin' takes "
                            "(default http://127.0.0.1:9901)")
    drain.add_argument("--no-wait", action="store_true", help="return once the drain has started")
    drain.add_argument("--timeout", metavar="DURATION", default="120s",
                       help="give up after this long (default 120s)")

    check = sub.add_parser("check-config", help="validate and print the effective config")
    _config_flag(check)
    _add_inject_commands(sub)
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
    if args.command in ("inject", "uninject"):
        return _inject(args)
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
            code = runner.run(server.run(config, command=command))
    except server.StartupError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return exc.exit_code
    # Drained and about to exit with its code: closing the loop restored the default
    # actions, and a SIGTERM now (the kubelet stops a native sidecar right after the app)
    # would turn a clean exit into 143.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _drain(args: argparse.Namespace) -> int:
    from .drain_client import DrainFailed, DrainPending, admin_url, request_drain

    try:
        admin = admin_url(args.admin)
    except ValueError as exc:
        print(f"sidecar drain: --admin: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        print(f"sidecar drain: --timeout: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        summary = request_drain(admin, token=os.environ.get("SIDECAR_ADMIN_TOKEN") or None,
                                wait=not args.no_wait, timeout=timeout)
    except DrainPending as exc:
        print(f"sidecar drain: {exc}", file=sys.stderr)
        return EXIT_PENDING
    except DrainFailed as exc:
        print(f"sidecar drain: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(summary))
    return EXIT_OK


# ---- sidecar inject / uninject ------------------------------------------------------------------

def _add_inject_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .k8s.inject import DEFAULT_IMAGE

    inputs = {"nargs": "*", "metavar": "FILE|DIR|-",
              "help": "manifests: files, directories (recursively), - for stdin (the default)"}
    inject = sub.add_parser(
        "inject", help="add the sidecar to the workloads in Kubernetes manifests",
        description="Write the manifests to stdout with the drain sidecar added to every "
                    "Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, "
                    "CronJob, Pod and Argo Rollout, in front of its HTTP port (HTTP/1.1, h2c, "
                    "gRPC; a port that is not HTTP is never fronted); a report on stderr. Exit 0, "
                    "or 2 (nothing written) for unreadable input or a bad sidecar.drain/* "
                    "annotation; 1 if the output cannot be written.")
    inject.add_argument("inputs", **inputs)  # type: ignore[arg-type]
    inject.add_argument("--config", metavar="PATH",
                        help="sidecar config to inject as SIDECAR_* env (default: built-in "
                             "defaults; the shell's SIDECAR_* variables are not read)")
    inject.add_argument("--image", metavar="IMAGE", default=DEFAULT_IMAGE,
                        help=f"sidecar image (default {DEFAULT_IMAGE}: a local name, as the "
                             "Dockerfile builds it; push it and give the registry's name)")
    inject.add_argument("--classic", action="store_true",
                        help="a regular container instead of a native sidecar (Kubernetes < 1.29)")
    inject.add_argument("--port", metavar="NAME|NUMBER",
                        help="the container port to front in every workload that has it (the "
                             "sidecar.drain/port annotation wins); others choose as without it")
    inject.add_argument("--exclude", metavar="KIND/NAME", action="append", default=[],
                        help="leave this workload as it is (e.g. deployment/reviews-v3 or just "
                             "its name); repeatable")
    inject.add_argument("--keep-service", action="store_true",
                        help="rewrite no Service targetPort (phase one of a rollout onto running "
                             "pods: inject again without it once every pod has the sidecar)")
    output = {"choices": ("yaml", "json"), "default": "yaml",
              "help": "output format (default yaml; json: one object, or a List of several)"}
    inject.add_argument("-o", "--output", **output)  # type: ignore[arg-type]
    uninject = sub.add_parser(
        "uninject", help="remove what inject added: workloads come back exactly as they were",
        description="Write the manifests to stdout with every injected workload restored from "
                    "its sidecar.drain/original annotation and every Service targetPort that "
                    "inject rewrote put back; a report on stderr. Exit 0, 2 for unreadable "
                    "input, 1 if the output cannot be written.")
    uninject.add_argument("inputs", **inputs)  # type: ignore[arg-type]
    uninject.add_argument("-o", "--output", **output)  # type: ignore[arg-type]


def _inject(args: argparse.Namespace) -> int:
    from .k8s.inject import Options
    from .k8s.manifests import dump, inject_all, kubernetes_only, read, uninject_all

    verb = f"sidecar {args.command}"
    if not args.inputs and sys.stdin.isatty():
        print(f"{verb}: give FILE, DIR or - (stdin is a terminal)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load(args.config) if args.command == "inject" else None
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{verb}: --config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:  # the same error class names an unreadable input, an annotation or a field
        docs, report = kubernetes_only(read(args.inputs))
        if config is not None:
            options = Options(config, args.config, args.image, args.classic, port=args.port,
                              keep_service=args.keep_service,
                              exclude=frozenset(e.strip().lower() for e in args.exclude))
            report += inject_all(docs, options)
        else:
            report += uninject_all(docs)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{verb}: {problem}", file=sys.stderr)
        print(f"{verb}: nothing written", file=sys.stderr)
        return EXIT_CONFIG
    text = dump(docs, args.output)
    for line in report:
        print(line, file=sys.stderr)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        print(f"{verb}: cannot write the output: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK
