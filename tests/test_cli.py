"""What a newcomer meets first: ``sidecar drain`` arguments and answers, ``run --help``,
and log lines that a person (text) or a pipeline (JSON) can read."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
from datetime import UTC, datetime

import pytest

from sidecar.drain_client import admin_url
from tests.conftest import StartSidecar, free_port, run_cli, upstream_url


@pytest.mark.parametrize(("given", "url"), [
    ("http://127.0.0.1:9901", "http://127.0.0.1:9901"),
    ("http://127.0.0.1:9901/", "http://127.0.0.1:9901"),
    ("127.0.0.1:9901", "http://127.0.0.1:9901"),
    ("localhost:9901", "http://localhost:9901"),
    ("0.0.0.0:9901", "http://127.0.0.1:9901"),
    (":9901", "http://127.0.0.1:9901"),
    ("9901", "http://127.0.0.1:9901"),
    ("[::1]:9901", "http://[::1]:9901"),
])
def test_drain_admin_takes_a_url_or_the_host_port_that_run_admin_takes(given: str, url: str) -> None:
    assert admin_url(given) == url


async def test_drain_admin_host_port_drains_a_running_sidecar(start_sidecar: StartSidecar, upstream) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s"}}, upstream=upstream_url(upstream))
    code, out, err = await run_cli("drain", "--admin", f"127.0.0.1:{sidecar.admin_port}")
    assert code == 0, err
    assert json.loads(out)["state"] == "drained"
    assert await sidecar.wait_exit() == 0


@pytest.mark.parametrize("given", ["ftp://h:1", "127.0.0.1:port", "http://:9901", "http://h:99999"])
async def test_drain_with_a_malformed_admin_is_an_argument_error_exit_2(given: str) -> None:
    code, out, err = await run_cli("drain", "--admin", given)
    assert code == 2 and out == ""
    assert "--admin: expected a URL like http://127.0.0.1:9901 or HOST:PORT" in err
    assert "cannot reach" not in err


async def test_drain_timeout_while_draining_says_it_was_reached_and_exits_3(
        start_sidecar: StartSidecar, upstream) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "3s", "timeout": "5s"}},
                                  upstream=upstream_url(upstream))
    code, _, err = await run_cli("drain", "--admin", sidecar.admin, "--timeout", "300ms")
    assert code == 3, err
    assert "was reached and is draining, but had not finished after 0.3s" in err
    assert "(state draining, 0 in flight)" in err
    assert "cannot reach" not in err
    assert await sidecar.wait_exit() == 0  # the drain went on without the caller


async def test_drain_of_a_port_nobody_listens_on_says_cannot_reach_and_exits_1() -> None:
    code, _, err = await run_cli("drain", "--admin", f"127.0.0.1:{free_port()}", "--timeout", "2s")
    assert code == 1
    assert "cannot reach the sidecar at http://127.0.0.1:" in err and "refused" in err.lower()


async def test_run_help_describes_the_command_and_names_every_variable() -> None:
    from sidecar.config import SCHEMA
    from sidecar.config.sources import env_name

    code, out, _ = await run_cli("run", "--help")
    assert code == 0
    assert "wrap mode" in out and "precedence: built-in defaults < config file" in out
    for flag, env in (("--listen", "SIDECAR_LISTEN"), ("--admin", "SIDECAR_ADMIN"),
                      ("--upstream", "SIDECAR_UPSTREAM_URL"), ("--config", "SIDECAR_CONFIG")):
        assert flag in out and env in out
    for section, keys in SCHEMA.items():
        for key in keys:
            assert env_name(section, key) in out
    assert "SIDECAR_EXIT_SIGNAL=SIGINT" in out


async def test_json_log_lines_carry_rfc3339_utc_timestamps(start_sidecar: StartSidecar, upstream) -> None:
    before = datetime.now(UTC)
    sidecar = await start_sidecar(upstream=upstream_url(upstream))
    entry = await sidecar.wait_log("sidecar started")
    stamp = entry["ts"]
    assert isinstance(stamp, str) and stamp.endswith("Z") and "T" in stamp
    at = datetime.fromisoformat(stamp)
    assert at.tzinfo is not None and abs((at - before).total_seconds()) < 60


async def test_text_log_is_one_clean_line_per_event(start_sidecar: StartSidecar, upstream) -> None:
    """No field repeats what the message says; nested values are flattened, not escaped JSON."""
    sidecar = await start_sidecar({"logging": {"format": "text"}, "drain": {"delay": "0s"}},
                                  upstream=upstream_url(upstream), wait=None)
    await _wait_raw(sidecar, "sidecar started")
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0
    lines = sidecar.raw
    state = next(line for line in lines if " state draining" in line)
    assert "state=" not in state and "trigger=SIGTERM" in state
    finished = next(line for line in lines if " drain finished" in line)
    assert "exit.outcome=" in finished and '\\"' not in finished and "{" not in finished
    for line in lines:
        assert datetime.fromisoformat(line.split(" ", 1)[0])  # each line starts with its time


def test_auto_format_is_text_on_a_terminal_and_json_otherwise() -> None:
    from sidecar.log import resolve_format

    main, secondary = pty.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            assert resolve_format("auto", tty) == "text"
    finally:
        os.close(main)
        os.close(secondary)
    with open(os.devnull, "w") as pipe:
        assert resolve_format("auto", pipe) == "json"
        assert resolve_format("text", pipe) == "text"


async def _wait_raw(sidecar, text: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not any(text in line for line in sidecar.raw):
        assert loop.time() < deadline, f"no {text!r} in:\n" + "\n".join(sidecar.raw)
        await asyncio.sleep(0.02)
