"""Byte-faithful HTTP/1.1 forwarding: each framing defect found by attacking the sidecar
(issue 12) as a promise.  The app is ``tests/apps/recorder.py``: it parses what reaches
it with llhttp, strictly, and records every request, so "the app parsed one request,
with the body the client framed" is checked on the app's own reading of the bytes."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.apps.recorder import Recorded, Recorder, Reply, echo
from tests.conftest import Sidecar, StartSidecar, raw_request

CONFIG = {"logging": {"access_log": True}, "upstream": {"timeout": "5s"}}


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    app = await Recorder().start()
    yield app
    await app.close()


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar, recorder: Recorder) -> Sidecar:
    return await start_sidecar(CONFIG, upstream=recorder.url)


# Pipelined after every test request: its answer ends the connection, and it proves the
# connection was still in step (the app parsed it as the next request, not inside a body).
SENTINEL = b"GET /end HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


async def exchange(port: int, data: bytes, *, sentinel: bool = True,
                   timeout: float = 10.0) -> bytes | None:
    """Send the bytes (and the sentinel), read until the sidecar closes; None if it reset.
    (Not a half-close: a client's EOF is a client that went away, answered 499.)"""
    reader, writer = await raw_request(port, data + (SENTINEL if sentinel else b""))
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return None
    finally:
        writer.close()


def statuses(data: bytes | None) -> list[int]:
    return [int(code) for code in re.findall(rb"(?:^|\n)HTTP/1\.[01] (\d{3}) ", data or b"")]


def access_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    return [e for e in sidecar.logs if e.get("logger") == "sidecar.access"]


async def assert_counted(sidecar: Sidecar, recorder: Recorder) -> None:
    """The invariant: the requests the app parsed are the ones the sidecar logged."""
    async def logged() -> None:
        while len(access_lines(sidecar)) < len(recorder.requests):
            await asyncio.sleep(0.01)
    await asyncio.wait_for(logged(), 10)
    seen = sorted((e["method"], e["path"].encode()) for e in access_lines(sidecar))
    assert seen == sorted((r.method, r.target) for r in recorder.requests)


def scripted(answer: bytes, then: str = "keep") -> Callable[[Recorded], Reply]:
    """The app answers ``answer`` to every request but the sentinel."""
    return lambda req: echo(req) if req.target == b"/end" else Reply(answer, then)


def targets(recorder: Recorder) -> list[bytes]:
    return [r.target for r in recorder.requests]


# --- 1. compressed request bodies ------------------------------------------------------------

def _gzip_smuggler() -> bytes:
    """A 300-byte gzip member whose inflated form ends in a second request."""
    tail = b"GET /admin/smuggled HTTP/1.1\r\nHost: app\r\n\r\n"
    pad = 0
    while True:
        member = gzip.compress(b"x=" + b"a" * pad + tail, mtime=0)
        if len(member) >= 300:
            return member
        pad = pad * 2 + 50 if len(member) < 200 else pad + 1


async def test_gzip_request_body_reaches_the_app_as_sent_and_smuggles_nothing(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """Defect 1: the app gets the compressed bytes the client framed, with their
    Content-Encoding and Content-Length, and parses one request, not two."""
    body = _gzip_smuggler()
    data = await exchange(sidecar.port, b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Encoding: gzip\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert statuses(data) == [200, 200]
    assert targets(recorder) == [b"/upload", b"/end"], recorder.requests
    assert recorder.requests[0].body == body
    assert recorder.requests[0].header("Content-Encoding") == [b"gzip"]
    assert recorder.requests[0].header("Content-Length") == [b"%d" % len(body)]


# --- 2. Connection options that name framing headers ----------------------------------------

SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: app\r\n\r\n"
NAMED = {
    "content-length": b"POST /a HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, Content-Length\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
    "transfer-encoding": b"POST /a HTTP/1.1\r\nHost: app\r\nConnection: Transfer-Encoding\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                         % (len(SMUGGLED), SMUGGLED),
    "host": b"POST /a HTTP/1.1\r\nHost: app\r\nConnection: Host\r\nContent-Length: 2\r\n\r\nhi",
}


@pytest.mark.parametrize("name", list(NAMED))
async def test_connection_naming_a_framing_header_does_not_unframe_the_request(
        sidecar: Sidecar, recorder: Recorder, name: str) -> None:
    """Defect 2: whatever ``Connection`` names, the forwarded request frames its own body
    and keeps Host (RFC 9110 7.6.1, RFC 9112 6.3): one request, the body as framed."""
    raw = NAMED[name]
    expected = b"hi" if name == "host" else SMUGGLED
    data = await exchange(sidecar.port, raw)
    assert statuses(data) == [200, 200], data
    assert targets(recorder) == [b"/a", b"/end"], (recorder.requests, recorder.errors)
    assert recorder.requests[0].body == expected
    assert recorder.requests[0].header("Host") == [b"app"]
    await assert_counted(sidecar, recorder)


# --- 3. the app's response head is bounded ---------------------------------------------------

async def test_response_head_over_the_cap_is_a_502_and_logged(
        start_sidecar: StartSidecar, recorder: Recorder) -> None:
    """Defect 3: an app that sends header lines without end gets its connection cut at
    ``upstream.max_response_head``; the client gets 502 and the log says why."""
    pad = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    recorder.reply = scripted(b"HTTP/1.1 200 OK\r\n" + pad * 4096 + b"Content-Length: 0\r\n\r\n")
    sidecar = await start_sidecar({**CONFIG, "upstream": {"max_response_head": "16KiB"}},
                                  upstream=recorder.url)
    data = await exchange(sidecar.port, b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
    assert statuses(data) == [502, 200]
    entry = await sidecar.wait_log("upstream error")
    assert "16384" in entry["error"]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_an_endless_response_head_does_not_grow_the_sidecar(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """Defect 3, as the issue measured it: 64 MiB of header lines from the app grew the
    sidecar by 166 MiB.  With the default cap (64 KiB) it is a 502 and the sidecar's
    memory stays where it was (within 32 MiB: allocator noise, not the head)."""
    pad = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    recorder.reply = scripted(b"HTTP/1.1 200 OK\r\n" + pad * (64 * 1024) + b"Content-Length: 0\r\n\r\n")
    before = _rss_kib(sidecar.proc.pid)
    data = await exchange(sidecar.port, b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
    assert statuses(data) == [502, 200]
    assert _rss_kib(sidecar.proc.pid) - before < 32 * 1024


# --- 4. a reset is not an end ----------------------------------------------------------------

async def test_close_delimited_response_cut_by_a_reset_reaches_the_client_incomplete(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """Defect 4: a body delimited by the close, ended by a TCP reset instead, is cut on the
    client side too: no terminating chunk, the connection is cut (RFC 9112 8)."""
    recorder.reply = scripted(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"p" * 1000,
                              "hold")
    reader, writer = await raw_request(sidecar.port, b"GET /r HTTP/1.1\r\nHost: app\r\n\r\n")
    received = await asyncio.wait_for(reader.readuntil(b"p" * 1000), 10)  # the head and body are out
    Recorder.reset(recorder.held[0])
    try:
        received += await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        pass
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in received
    assert not received.endswith(b"0\r\n\r\n"), received


# --- 5. 1xx with a body ----------------------------------------------------------------------

async def test_interim_response_with_a_body_is_not_spliced_into_the_final_one(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """Defect 5: a 1xx has no body (RFC 9112 6.3); bytes after its head are not the final
    response's body.  The client gets a 502, never ``hello`` inside a 200."""
    recorder.reply = scripted(b"HTTP/1.1 199 X\r\nContent-Length: 5\r\n\r\nhello"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    data = await exchange(sidecar.port, b"GET /i HTTP/1.1\r\nHost: app\r\n\r\n")
    assert b"hello" not in (data or b""), data
    assert statuses(data) in ([502, 200], [200, 200])
    if statuses(data)[0] == 200:
        assert data is not None and b"Content-Length: 2\r\n\r\nokHTTP/1.1 200" in data


# --- 6. the smaller ones ---------------------------------------------------------------------

async def test_100_continue_is_not_sent_to_an_http_1_0_client(sidecar: Sidecar, recorder: Recorder) -> None:
    """RFC 9110 15.2: no 1xx to an HTTP/1.0 client, even if it sent Expect."""
    data = await exchange(sidecar.port, b"POST /c HTTP/1.0\r\nHost: app\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 2\r\n\r\nhi", sentinel=False)
    assert statuses(data) == [200], data
    assert recorder.requests[0].body == b"hi"


async def test_100_continue_is_still_sent_to_an_http_1_1_client(sidecar: Sidecar, recorder: Recorder) -> None:
    reader, writer = await raw_request(sidecar.port, b"POST /c HTTP/1.1\r\nHost: app\r\n"
                                       b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hi")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert recorder.requests[0].body == b"hi"


async def test_obs_text_in_a_response_header_value_is_forwarded_byte_for_byte(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """``filename="r\\xe9sum\\xe9.pdf"`` (latin-1 obs-text) and valid UTF-8 arrive as sent."""
    recorder.reply = scripted(b"HTTP/1.1 200 OK\r\nContent-Disposition: attachment; "
                              b"filename=\"r\xe9sum\xe9.pdf\"\r\nX-Utf8: caf\xc3\xa9\r\n"
                              b"Content-Length: 2\r\n\r\nok")
    data = await exchange(sidecar.port, b"GET /f HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
                          sentinel=False)
    assert data is not None
    assert b"\r\nContent-Disposition: attachment; filename=\"r\xe9sum\xe9.pdf\"\r\n" in data
    assert b"\r\nX-Utf8: caf\xc3\xa9\r\n" in data


async def test_obs_text_in_the_reason_phrase_is_forwarded_byte_for_byte(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """RFC 9112 4 allows obs-text in the reason: a latin-1 reason with ASCII headers arrives as
    sent (the head is written byte for byte when the reason alone is not ASCII)."""
    recorder.reply = scripted(b"HTTP/1.1 200 Gr\xfc\xdfe\r\nContent-Length: 2\r\n\r\nok")
    data = await exchange(sidecar.port, b"GET /f HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
                          sentinel=False)
    assert data is not None
    assert data.startswith(b"HTTP/1.1 200 Gr\xfc\xdfe\r\n"), data[:80]
    assert data.endswith(b"\r\n\r\nok")


async def test_obs_text_in_a_request_header_value_is_forwarded_byte_for_byte(
        sidecar: Sidecar, recorder: Recorder) -> None:
    await exchange(sidecar.port, b"GET /f HTTP/1.1\r\nHost: app\r\nX-Name: r\xe9sum\xe9\r\n"
                                 b"X-Utf8: caf\xc3\xa9\r\nConnection: close\r\n\r\n", sentinel=False)
    assert recorder.requests[0].header("X-Name") == [b"r\xe9sum\xe9"]
    assert recorder.requests[0].header("X-Utf8") == [b"caf\xc3\xa9"]


async def test_response_whose_transfer_coding_is_not_chunked_is_delimited_by_the_close(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """RFC 9112 6.3: Transfer-Encoding not ending in chunked: the body runs to the close.
    The client gets all of it, with the coding named (the proxy chunks on top)."""
    body = gzip.compress(b"hello world", mtime=0)
    recorder.reply = scripted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + body, "close")
    reader, writer = await raw_request(sidecar.port, b"GET /g HTTP/1.1\r\nHost: app\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"\r\nTransfer-Encoding: gzip, chunked\r\n" in head, head
    received = b""
    while True:
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).split(b";")[0], 16)
        chunk = await asyncio.wait_for(reader.readexactly(size + 2), 10)
        if size == 0:
            break
        received += chunk[:-2]
    writer.close()
    assert received == body


async def test_unsolicited_101_from_the_app_is_a_502_without_a_transport_error(
        sidecar: Sidecar, recorder: Recorder) -> None:
    recorder.reply = scripted(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\n"
                              b"Connection: upgrade\r\n\r\nrawbytes")
    data = await exchange(sidecar.port, b"GET /u HTTP/1.1\r\nHost: app\r\n\r\n")
    assert statuses(data) == [502, 200], data
    await sidecar.wait_log("upstream error")
    assert not [line for line in sidecar.raw if "Fatal error" in line or "Traceback" in line]


async def test_h2c_upgrade_is_not_honoured_and_the_request_is_forwarded_as_http_1_1(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """``Upgrade`` is hop-by-hop: the app gets a plain HTTP/1.1 request without it."""
    data = await exchange(sidecar.port, H2C % b"/one", sentinel=False)
    assert statuses(data) == [200], data
    assert targets(recorder) == [b"/one"]
    assert not recorder.requests[0].header("Upgrade") and not recorder.requests[0].header("HTTP2-Settings")
    assert not recorder.errors


async def test_request_pipelined_after_an_h2c_upgrade_request_does_not_hang(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """aiohttp's parser drops what follows an upgrade it does not support in the same read,
    so the connection ends with the first answer: the client sees the close at once (its
    second request unanswered, so never processed: it may retry it, RFC 9112 9.3.2), and
    the app got exactly the requests the sidecar answered and logged."""
    data = await exchange(sidecar.port, H2C % b"/one" + SENTINEL, sentinel=False, timeout=10)
    assert statuses(data)[:1] == [200], data
    assert targets(recorder) == [b"/one", b"/end"][:len(statuses(data))]
    await assert_counted(sidecar, recorder)


H2C = (b"GET %s HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\n"
       b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")


async def test_gzip_upload_arrives_intact_and_the_answer_is_the_apps(sidecar: Sidecar, recorder: Recorder) -> None:
    """The legitimate side of defect 1 (an OTLP exporter's gzip upload)."""
    body = gzip.compress(json.dumps({"spans": list(range(2000))}).encode(), mtime=0)
    data = await exchange(sidecar.port, b"POST /v1/traces HTTP/1.1\r\nHost: app\r\nContent-Encoding: gzip\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                                        % (len(body), body))
    assert statuses(data) == [200, 200]
    assert recorder.requests[0].body == body
    assert data is not None and echo(recorder.requests[0]).data.split(b"\r\n\r\n")[1] in data


NOT_HANDSHAKES = {
    "head": b"HEAD /h HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n\r\n",
    "no-connection-upgrade": b"GET /h HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n\r\n",
    "a-body": b"GET /h HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(NOT_HANDSHAKES))
async def test_a_request_that_is_not_a_websocket_handshake_reaches_the_app_as_sent(
        sidecar: Sidecar, recorder: Recorder, name: str) -> None:
    """Found by the smuggling fuzz: any request with ``Upgrade: websocket`` went through the
    websocket client, which sent the app a bodiless GET of its own (a HEAD logged as HEAD
    reached the app as GET; a body was dropped) and gave the client a made-up
    ``200 Invalid response status``.  Only a GET handshake (RFC 6455 4.1: Connection:
    upgrade, a key, no body) is relayed as a websocket; the rest is HTTP, Upgrade dropped."""
    raw = NOT_HANDSHAKES[name]
    data = await exchange(sidecar.port, raw)
    assert statuses(data) == [200, 200], data
    method = raw.split(b" ", 1)[0].decode()
    assert [(r.method, r.target) for r in recorder.requests] == [(method, b"/h"), ("GET", b"/end")]
    assert recorder.requests[0].body == (b"hello" if name == "a-body" else b"")
    assert not recorder.requests[0].header("Upgrade")
    assert data is not None and b"Invalid response status" not in data
    await assert_counted(sidecar, recorder)


async def test_a_nul_in_the_reason_phrase_is_a_502_not_an_error(
        sidecar: Sidecar, recorder: Recorder) -> None:
    """Found by the smuggling fuzz: llhttp lets a NUL through in the app's reason phrase;
    aiohttp's writer then refused the head (ValueError: an error line with a traceback, and a
    500). RFC 9112 4: the reason is HTAB, SP, VCHAR or obs-text: the answer is refused, 502."""
    recorder.reply = scripted(b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok")
    data = await exchange(sidecar.port, b"GET /cr HTTP/1.1\r\nHost: app\r\n\r\n")
    assert statuses(data) == [502, 200], data
    await sidecar.wait_log("upstream error")
    assert not [line for line in sidecar.raw if "Traceback" in line or '"level": "error"' in line]
