"""Telling the app to exit once drained, wrap mode, and the ``sidecar drain`` client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import (
    UPSTREAM_APP,
    StartSidecar,
    StartUpstream,
    free_port,
    read_events,
    run_cli,
    upstream_url,
)

FAST = {"drain": {"delay": "0s", "timeout": "5s"}, "exit": {"wait": "5s"}}


def _event_times(events: Path, kind: str) -> list[float]:
    return [e["t"] for e in read_events(events) if e["event"] == kind]


async def _in_flight_done_at(sidecar) -> float:  # type: ignore[no-untyped-def]
    stamp = (await sidecar.wait_log("in-flight requests done"))["ts"]
    return datetime.fromisoformat(stamp).timestamp()  # RFC 3339 UTC


async def test_exit_pid_file_signals_the_app_after_the_drain(
        start_sidecar: StartSidecar, start_upstream_process: StartUpstream, tmp_path: Path) -> None:
    app, port, events = await start_upstream_process()
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{app.pid}\n")
    sidecar = await start_sidecar({**FAST, "exit": {"pid_file": str(pid_file), "wait": "5s"}},
                                  upstream=f"http://127.0.0.1:{port}")
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0
    assert await asyncio.wait_for(app.wait(), 5) == 0
    outcome = await sidecar.wait_log("upstream exit")
    assert outcome["action"] == "pid_file" and outcome["outcome"] == "exited"
    assert _event_times(events, "sigterm")[0] >= await _in_flight_done_at(sidecar)
    assert [e["msg"] for e in sidecar.logs].index("state closing") < \
        [e["msg"] for e in sidecar.logs].index("upstream exit: exited")


async def test_exit_process_regex_signals_every_match_but_never_the_sidecar(
        start_sidecar: StartSidecar, start_upstream_process: StartUpstream) -> None:
    app, port, _ = await start_upstream_process()
    sidecar = await start_sidecar({**FAST, "exit": {"process": f"upstream\\.py --port {port}\\b", "wait": "5s"}},
                                  upstream=f"http://127.0.0.1:{port}")
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0
    assert await asyncio.wait_for(app.wait(), 5) == 0
    outcome = await sidecar.wait_log("upstream exit")
    assert outcome["pids"] == [app.pid] and outcome["outcome"] == "exited"


async def test_exit_http_calls_quitquitquit_and_waits_for_the_port_to_close(
        start_sidecar: StartSidecar, start_upstream_process: StartUpstream) -> None:
    app, port, _ = await start_upstream_process()
    url = f"http://127.0.0.1:{port}"
    sidecar = await start_sidecar({**FAST, "exit": {"http": {"url": url + "/quitquitquit"}, "wait": "5s"}},
                                  upstream=url)
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0
    assert await asyncio.wait_for(app.wait(), 5) == 0
    outcome = await sidecar.wait_log("upstream exit")
    assert outcome["action"] == "http" and outcome["status"] == 200 and outcome["outcome"] == "exited"


async def test_exit_failures_are_logged_and_the_sidecar_still_exits(
        start_sidecar: StartSidecar, upstream, tmp_path: Path) -> None:
    for exit_cfg, expected in (
        ({"pid_file": str(tmp_path / "missing.pid")}, "no pid"),
        ({"process": "no-such-process-anywhere-[0-9]{40}"}, "no process matched"),
        ({"http": f"http://127.0.0.1:{free_port()}/quitquitquit"}, "request failed"),
    ):
        sidecar = await start_sidecar({**FAST, "exit": {**exit_cfg, "wait": "1s"}},
                                      upstream=upstream_url(upstream))
        sidecar.send(signal.SIGTERM)
        assert await sidecar.wait_exit() == 0
        outcome = await sidecar.wait_log("upstream exit")
        assert outcome["outcome"].startswith(expected), outcome


async def test_exit_pid_file_with_a_dead_pid_is_reported(start_sidecar: StartSidecar, upstream, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    (tmp_path / "dead.pid").write_text(str(proc.pid))
    sidecar = await start_sidecar({**FAST, "exit": {"pid_file": str(tmp_path / "dead.pid")}},
                                  upstream=upstream_url(upstream))
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0
    assert (await sidecar.wait_log("upstream exit"))["outcome"].startswith("no such process")


def _wrap(port: int, events: Path, *extra: str) -> list[str]:
    return [sys.executable, UPSTREAM_APP, "--port", str(port), "--events", str(events), *extra]


async def test_wrap_mode_is_starting_until_the_child_is_healthy_then_serves(
        start_sidecar: StartSidecar, tmp_path: Path) -> None:
    port = free_port()
    events = tmp_path / "events.jsonl"
    sidecar = await start_sidecar({**FAST, "upstream": {"health_path": "/healthz"}},
                                  upstream=f"http://127.0.0.1:{port}",
                                  command=_wrap(port, events, "--delay-start", "1"))
    async with aiohttp.ClientSession() as client:
        async with client.get(sidecar.admin + "/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["state"] == "starting"
        async with client.get(sidecar.url + "/headers") as resp:
            assert resp.status == 503  # nothing is forwarded to an app that is not up
        await sidecar.wait_log("state serving")
        async with client.get(sidecar.admin + "/readyz") as resp:
            assert resp.status == 200
        async with client.get(sidecar.url + "/headers?id=1") as resp:
            assert resp.status == 200
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0
    assert await _in_flight_done_at(sidecar) <= _event_times(events, "sigterm")[0]


async def test_wrap_mode_exits_with_the_childs_exit_code(start_sidecar: StartSidecar, tmp_path: Path) -> None:
    port = free_port()
    sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{port}",
                                  command=_wrap(port, tmp_path / "e.jsonl", "--exit-code", "3"))
    await sidecar.wait_log("state serving")
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 3


async def test_wrap_mode_kills_a_child_that_ignores_the_signal_and_exits_128_plus_9(
        start_sidecar: StartSidecar, tmp_path: Path) -> None:
    port = free_port()
    sidecar = await start_sidecar({**FAST, "exit": {"wait": "300ms"}}, upstream=f"http://127.0.0.1:{port}",
                                  command=_wrap(port, tmp_path / "e.jsonl", "--ignore-sigterm"))
    await sidecar.wait_log("state serving")
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 128 + signal.SIGKILL
    assert (await sidecar.wait_log("upstream exit"))["outcome"].startswith("killed")


async def test_wrap_mode_uses_the_configured_exit_signal(start_sidecar: StartSidecar, tmp_path: Path) -> None:
    port = free_port()
    sidecar = await start_sidecar({**FAST, "exit": {"signal": "SIGINT"}}, upstream=f"http://127.0.0.1:{port}",
                                  command=_wrap(port, tmp_path / "e.jsonl", "--exit-code", "0"))
    await sidecar.wait_log("state serving")
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0
    assert (await sidecar.wait_log("signalled child"))["signal"] == "SIGINT"


async def test_wrap_mode_drains_at_once_when_the_child_dies_and_exits_with_its_code(
        start_sidecar: StartSidecar, tmp_path: Path) -> None:
    port = free_port()
    sidecar = await start_sidecar({"drain": {"delay": "20s", "timeout": "5s"}}, upstream=f"http://127.0.0.1:{port}",
                                  command=_wrap(port, tmp_path / "e.jsonl", "--exit-code", "7"))
    await sidecar.wait_log("state serving")
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"http://127.0.0.1:{port}/quitquitquit") as resp,  # the app quits by itself
    ):
        assert resp.status == 200
    assert await sidecar.wait_exit(timeout=10) == 7  # without waiting out the 20s delay
    assert (await sidecar.wait_log("state draining"))["trigger"] == "child exited"


async def test_wrap_mode_reaps_orphaned_grandchildren(start_sidecar: StartSidecar, tmp_path: Path) -> None:
    """Safe as PID 1: a process the app orphans is adopted and reaped, not left a zombie."""
    port = free_port()
    script = f"(sleep 0.2 &) ; exec {sys.executable} {UPSTREAM_APP} --port {port}"
    sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{port}", command=["sh", "-c", script])
    await sidecar.wait_log("state serving")

    def zombies() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (OSError, ValueError):
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[1]) == sidecar.proc.pid and fields[0] == "Z":
                found.append(int(entry))
        return found

    def adopted_sleepers() -> list[int]:
        return [int(e) for e in os.listdir("/proc") if e.isdigit()
                and _ppid(int(e)) == sidecar.proc.pid and _comm(int(e)) == "sleep"]

    for _ in range(300):  # the orphan is adopted, then exits after 0.2s
        if not adopted_sleepers():
            break
        await asyncio.sleep(0.02)
    assert zombies() == []
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def test_sidecar_drain_exits_0_after_a_clean_drain(start_sidecar: StartSidecar, upstream) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "100ms"}}, upstream=upstream_url(upstream),
                                  env={"SIDECAR_ADMIN_TOKEN": "tok"})
    code, out, err = await run_cli("drain", "--admin", sidecar.admin, env={"SIDECAR_ADMIN_TOKEN": "tok"})
    assert code == 0, err
    assert '"state": "drained"' in out
    assert await sidecar.wait_exit() == 0


async def test_sidecar_drain_exits_1_when_requests_were_aborted(
        start_sidecar: StartSidecar, upstream) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "200ms"}}, upstream=upstream_url(upstream))
    async with aiohttp.ClientSession() as client:
        stuck = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=x"))
        async with client.get(upstream_url(upstream) + "/__started?key=x"):
            pass
        code, _, err = await run_cli("drain", "--admin", sidecar.admin)
        assert code == 1 and "aborted" in err
        stuck.cancel()
    assert await sidecar.wait_exit() == 0


async def test_sidecar_drain_exits_1_when_the_sidecar_is_unreachable_or_refuses() -> None:
    code, _, err = await run_cli("drain", "--admin", f"http://127.0.0.1:{free_port()}", "--timeout", "2s")
    assert code == 1 and "cannot reach" in err


async def test_sidecar_drain_no_wait_returns_at_once(start_sidecar: StartSidecar, upstream) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "1s"}}, upstream=upstream_url(upstream))
    code, out, _ = await run_cli("drain", "--admin", sidecar.admin, "--no-wait")
    assert code == 0 and '"state": "draining"' in out
    assert await sidecar.wait_exit() == 0


async def test_sigterms_while_exiting_after_the_drain_do_not_change_the_exit_code(
        start_sidecar: StartSidecar, upstream) -> None:
    """The kubelet signals a native sidecar right after the app exits, which can be while the
    drained sidecar is exiting: it still exits 0, never 143."""
    sidecar = await start_sidecar({"drain": {"delay": "0s", "linger": "0s"}},
                                  upstream=upstream_url(upstream))
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("sidecar exiting")
    exited = asyncio.ensure_future(sidecar.proc.wait())
    while not exited.done():  # keep signalling through the whole way out
        with contextlib.suppress(ProcessLookupError):
            os.kill(sidecar.proc.pid, signal.SIGTERM)  # not Popen.send_signal: it reaps (poll)
        await asyncio.sleep(0.001)
    assert await sidecar.wait_exit() == 0


async def test_wrap_mode_command_not_found_exits_127_naming_it(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(command=["/nonexistent/app"], wait=None)
    assert await sidecar.wait_exit() == 127
    assert any("cannot start '/nonexistent/app'" in line for line in sidecar.raw)


def _can_unshare_pid() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs root and unshare(1) for a PID namespace")
async def test_as_pid_1_of_a_container_sigterm_drains_reaps_orphans_and_exits_with_the_childs_code(
        start_sidecar: StartSidecar, tmp_path: Path) -> None:
    """The sidecar as PID 1 of its own PID namespace, as ENTRYPOINT in a container."""
    port = free_port()
    script = f"(sleep 0.2 &) ; exec {sys.executable} {UPSTREAM_APP} --port {port} --exit-code 5"
    sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{port}", command=["sh", "-c", script],
                                  prefix=["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])
    await sidecar.wait_log("state serving")
    children = Path(f"/proc/{sidecar.proc.pid}/task/{sidecar.proc.pid}/children").read_text().split()
    pid1 = int(children[0])  # the sidecar, as the host sees it
    nspid = next(line for line in Path(f"/proc/{pid1}/status").read_text().splitlines()
                 if line.startswith("NSpid:"))
    assert nspid.split()[-1] == "1"  # PID 1 inside its namespace
    for _ in range(300):  # the orphaned sleep is adopted by PID 1 and, once it exits, reaped
        if not [e for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == pid1
                and _comm(int(e)) == "sleep"]:
            break
        await asyncio.sleep(0.02)
    zombies = [e for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == pid1
               and Path(f"/proc/{e}/stat").read_text().rpartition(")")[2].split()[0] == "Z"]
    assert zombies == []
    os.kill(pid1, signal.SIGTERM)
    assert await sidecar.wait_exit() == 5
    assert (await sidecar.wait_log("upstream exit"))["outcome"] == "exited"
