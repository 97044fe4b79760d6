"""Security promises: the admin token guards /drain, is never logged, printed, forwarded or
inherited; the app never sees hop-by-hop headers; /drain is not reachable on the proxy port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import (
    ROOT,
    UPSTREAM_APP,
    StartSidecar,
    free_port,
    raw_request,
    read_response,
    upstream_events,
    upstream_url,
    wait_port,
)

TOKEN = "s3cret-Token-4f9a"


@pytest.fixture
async def guarded(start_sidecar: StartSidecar, upstream):  # type: ignore[no-untyped-def]
    return await start_sidecar({"logging": {"access_log": True}}, upstream=upstream_url(upstream),
                               env={"SIDECAR_ADMIN_TOKEN": TOKEN})


async def state(client: aiohttp.ClientSession, admin: str) -> str:
    async with client.get(admin + "/status") as resp:
        return str((await resp.json())["state"])


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x",
    f"Bearer {TOKEN * 50}", f"Bearer {TOKEN.lower()}", f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}",
])
async def test_drain_with_a_wrong_short_or_long_token_is_401_and_starts_nothing(
        guarded, client, authorization) -> None:
    """The token is compared in full (hmac.compare_digest): no prefix, case or scheme games."""
    headers = {} if authorization is None else {"Authorization": authorization}
    for method in ("GET", "POST"):
        async with client.request(method, guarded.admin + "/drain?wait=false", headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await state(client, guarded.admin) == "serving"


async def test_drain_with_a_token_that_is_not_utf8_is_401_not_a_crash(guarded, client) -> None:
    reader, writer = await raw_request(
        guarded.admin_port, b"POST /drain?wait=false HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                            b"Authorization: Bearer \xff\xfe" + TOKEN.encode() + b"\r\n\r\n")
    status, _, _ = await read_response(reader)
    writer.close()
    assert status.split()[1] == "401"
    assert await state(client, guarded.admin) == "serving"
    assert not [line for line in guarded.raw if "Traceback" in line]


async def test_drain_with_the_right_token_starts_the_drain(guarded, client) -> None:
    async with client.post(guarded.admin + "/drain?wait=false",
                           headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 202
    assert await state(client, guarded.admin) != "serving"


async def test_admin_token_never_appears_in_any_output(guarded, client) -> None:
    """Debug level and access log on; wrong and right tokens sent; the drain client run too:
    not one line of the sidecar's output, or the client's, carries the token."""
    async with client.get(guarded.url + "/headers?q=1") as resp:
        assert resp.status == 200
    async with client.post(guarded.admin + "/drain?wait=false",
                           headers={"Authorization": f"Bearer {TOKEN}-wrong"}) as resp:
        assert resp.status == 401
    drain = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "drain", "--admin", guarded.admin, "--timeout", "30s",
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
             "SIDECAR_ADMIN_TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT))
    out, err = await asyncio.wait_for(drain.communicate(), 60)
    assert drain.returncode == 0, err
    assert await guarded.wait_exit(30) == 0
    assert any('"sidecar.access"' in line for line in guarded.raw)  # the access log was on
    assert any('"level": "debug"' in line or "drain" in line for line in guarded.raw)
    for text in (*guarded.raw, out.decode(), err.decode()):
        assert TOKEN not in text, text


async def test_check_config_redacts_a_token_from_env_and_never_echoes_a_bad_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "check-config", env={**env, "SIDECAR_ADMIN_TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and TOKEN not in out.decode() + err.decode()
    assert "admin_token: <redacted>" in out.decode()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"admin_token: [{TOKEN}]\ndrain: {{delay: never}}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "check-config", "--config", str(bad), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and "admin_token" in err.decode()
    assert TOKEN not in out.decode() + err.decode()


async def test_app_sees_only_end_to_end_headers_and_never_the_token(guarded, upstream) -> None:
    """The sidecar adds X-Forwarded-* and nothing else: no Authorization, no token, and the
    hop-by-hop headers the client sent are gone."""
    reader, writer = await raw_request(guarded.port, (
        b"GET /headers HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic eA==\r\nUpgrade: h2c\r\nX-App: kept\r\n\r\n"))
    _, _, body = await read_response(reader)
    writer.close()
    seen = json.loads(body)["headers"]
    names = {k.lower() for k, _ in seen} - {"connection"}  # aiohttp's own hop to the app
    assert names == {"host", "x-app", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
    assert TOKEN not in json.dumps(seen)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_drain_on_the_proxy_port_is_forwarded_to_the_app_and_drains_nothing(
        guarded, client, upstream, method) -> None:
    """Even with the right token, /drain on the proxy port is just a path of the app."""
    async with client.request(method, guarded.url + "/drain",
                              headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 404  # the app's answer
    assert [e["path"] for e in upstream_events(upstream) if e["event"] == "received"] == ["/drain"]
    assert await state(client, guarded.admin) == "serving"
    async with client.get(guarded.admin + "/readyz") as resp:
        assert resp.status == 200


async def test_wrapped_app_does_not_inherit_the_admin_token(start_sidecar: StartSidecar, tmp_path: Path) -> None:
    """In wrap mode the child gets the sidecar's environment minus SIDECAR_ADMIN_TOKEN."""
    port, dump = free_port(), tmp_path / "env.json"
    script = (f"import json, os, runpy, sys; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)));"
              f"sys.argv = ['upstream', '--port', '{port}'];"
              f"runpy.run_path({UPSTREAM_APP!r}, run_name='__main__')")
    sidecar = await start_sidecar(upstream=f"http://127.0.0.1:{port}", command=[sys.executable, "-c", script],
                                  env={"SIDECAR_ADMIN_TOKEN": TOKEN, "SIDECAR_DRAIN_DELAY": "0s"})
    await wait_port(port, timeout=30)
    env = json.loads(dump.read_text())
    assert "SIDECAR_ADMIN_TOKEN" not in env
    assert TOKEN not in json.dumps(env)
    assert env.get("SIDECAR_DRAIN_DELAY") == "0s"  # only the token is withheld
    sidecar.send(signal.SIGTERM)  # drain, which stops the child too
    assert await sidecar.wait_exit(30) == 0
