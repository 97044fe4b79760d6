"""The differential smuggling harness: raw client bytes through a proxy to the recorder
app, and the invariant checked on what each side parsed (the processes and threads
that run a case are in ``tests/smuggle_rig.py``).  Used by
``tests/test_smuggling.py`` (a fast deterministic subset) and ``bench/smuggle.py``
(the long run, and the same inputs through nginx).

The invariant (issue 12), for one case (one client connection):
- request side: the requests the app parsed (llhttp, strict) are, in order, requests
  a strict llhttp parser reads in the client's bytes (one cut on its way may be
  missing, none altered or added), each with the same method, target (origin form)
  and body bytes; and each is one the proxy logged
  (its access log: method and path), so nothing reaches the app uncounted;
- response side: every response the client reads is the app's answer to that
  request (the same status, body and end-to-end headers), or a 4xx/5xx of the
  proxy's own, or a cut connection with a prefix of the app's body; never bytes of
  another response, and nothing after the last one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httptools

from tests.apps.recorder import Recorded, echo

__all__ = ("SENTINEL", "Case", "Message", "check", "final", "own_answer", "parse_answers", "parse_stream")

SENTINEL = b"GET /end HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization"}


@dataclass
class Case:
    """Client bytes; ``reply``: the app's raw answer to the first request (echo after)."""
    client: bytes
    reply: bytes | None = None
    then: str = "keep"  # after the reply: keep | close | reset
    name: str = ""
    early: bool = False  # the reply leaves as soon as the head is parsed, before the body


@dataclass
class Message:
    method: str = ""
    target: bytes = b""
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    headers_done: bool = False


class _Collect:
    def __init__(self, request: bool) -> None:
        self.messages: list[Message] = []
        self.parser: Any = (httptools.HttpRequestParser if request else httptools.HttpResponseParser)(self)
        self.request = request

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        m = self.messages[-1]
        m.headers_done = True
        if self.request:
            m.method = self.parser.get_method().decode("latin-1")
        else:
            m.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def parse_stream(data: bytes, *, request: bool) -> tuple[list[Message], str | None]:
    """Every message llhttp (strict) reads in ``data``; the error that stopped it, if any.
    Requests: ``Upgrade`` is read as any header (the proxies under test do not honour an
    upgrade the app does not accept, so what follows is still HTTP/1.1)."""
    if request:
        data = re.sub(rb"(?im)^upgrade:", b"Xpgrade:", data)
    c = _Collect(request)
    try:
        c.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return c.messages, "upgrade"
    except httptools.HttpParserError as exc:
        return c.messages, str(exc) or type(exc).__name__
    return c.messages, None


def _aiohttp(m: Message) -> bool:
    """aiohttp's own 400 for a request it could not parse has a body, even after a HEAD
    (it cannot know the method of what it could not parse)."""
    return any(k.lower() == b"server" and b"aiohttp" in v for k, v in m.headers)


def final(m: Message) -> bool:
    """A final answer: 1xx other than 100-103 count too (a proxy that passes a ``199`` on
    makes its client read the next answer as the final one: an answer out of step)."""
    return m.status >= 200 or m.status not in (100, 101, 102, 103)


def parse_answers(data: bytes, methods: list[str]) -> tuple[list[Message], str | None]:
    """The responses the client read, one parser per response, so that the answer to a
    HEAD ends with its head (llhttp cannot be told the method): answer i is to request i."""
    out: list[Message] = []
    at = 0
    while at < len(data):
        c = _Collect(False)
        answered = len([m for m in out if final(m)])
        head_only = answered < len(methods) and methods[answered] == "HEAD"
        start = at
        try:
            while at < len(data) and not (c.messages and (c.messages[-1].complete or (
                    head_only and final(c.messages[-1]) and c.messages[-1].headers_done
                    and not _aiohttp(c.messages[-1])))):
                c.parser.feed_data(data[at:at + 1])
                at += 1
        except httptools.HttpParserError as exc:
            out.extend(c.messages)
            return out, str(exc) or type(exc).__name__
        out.extend(c.messages)
        if c.messages and head_only and c.messages[-1].headers_done and not _aiohttp(c.messages[-1]):
            c.messages[-1].complete = True
        if at == start or not c.messages or not c.messages[-1].complete:
            break
    return out, None


def origin_form(target: bytes) -> bytes:
    if target.startswith(b"/"):
        return target
    rest = target.split(b"://", 1)[-1]
    slash = rest.find(b"/")
    return rest[slash:] if slash >= 0 else b"/"


def check(case: Case, parsed: list[Recorded], answered: list[Recorded],
          logged: list[tuple[str, bytes, int]] | None, received: bytes) -> list[str]:
    """The invariant's violations for one case (empty: it held).  ``parsed``: the complete
    requests the app read; ``answered``: the requests it answered, in order (an early
    answer's request may never have completed: the proxy then drops that connection)."""
    problems: list[str] = []
    sent, _ = parse_stream(case.client, request=True)
    sent = [m for m in sent if m.complete]
    # 1. the app parsed, in order, requests the client framed, byte for byte (a subsequence:
    #    one cut on its way, by an early answer or an error, is skipped, never altered)
    rest = iter(enumerate(sent))
    for got in parsed:
        key = (got.method, got.target, got.body)
        if not any(key == (w.method, origin_form(w.target), w.body) for _, w in rest):
            problems.append(f"the app parsed a request the client did not frame (or not in this "
                            f"order): {got.method} {got.target!r} body={got.body[:60]!r}")
            break
    # 2. each one the proxy counted (logged)
    if logged is not None:
        counted = Counter((m, origin_form(p)) for m, p, _ in logged)
        for got in parsed:
            key = (got.method, got.target)
            if counted[key] <= 0:
                problems.append(f"the app parsed {key} but the proxy never logged it")
            counted[key] -= 1
    # 3. the client read the app's answers, the proxy's errors, or a cut; nothing else
    answers, error = parse_answers(received, [m.method for m in sent])
    heads = [m for m in answers if final(m)]
    scripted = next((i for i, r in enumerate(answered) if r.target != b"/end"), None)
    for i, resp in enumerate(heads):  # the i-th answer is to the i-th request (in order)
        if own_answer(resp):
            continue  # the proxy's own 4xx/5xx
        if i >= len(answered):
            problems.append(f"answer {i} is not the app's, nor the proxy's: {resp.status} {resp.body[:80]!r}")
            break
        req = answered[i]
        data = case.reply if case.reply is not None and i == scripted else echo(req).data
        finals = [m for m in parse_stream(data, request=False)[0] if m.status >= 200]
        if not finals:  # the app's answer is not one a strict parser accepts: only errors are fine
            problems.append(f"the client got {resp.status} for an answer llhttp rejects")
            continue
        expected = finals[0]
        if resp.status != expected.status or not _body_ok(resp, expected, req.method):
            problems.append(f"response for {req.target!r}: got {resp.status} {resp.body[:80]!r}, "
                            f"the app sent {expected.status} {expected.body[:80]!r}")
        elif not _headers_ok(resp, expected):
            problems.append(f"response headers for {req.target!r} differ: {resp.headers} / {expected.headers}")
    if error is not None and answers and answers[-1].complete and error != "upgrade":
        problems.append(f"bytes after the last response: {error} in {received[-120:]!r}")
    return problems


def own_answer(resp: Message) -> bool:
    """An answer of the proxy's own: aiohttp's (the sidecar's) carry its Server header,
    nginx's its signature page.  The app's never do (the cases send no Server)."""
    if resp.status < 400:
        return False
    server = b" ".join(v for k, v in resp.headers if k.lower() == b"server")
    return b"aiohttp" in server or (b"nginx" in server and b"<center>" in resp.body)


def _body_ok(resp: Message, expected: Message, method: str) -> bool:
    if method == "HEAD" or expected.status in (204, 304):
        return resp.body == b""
    if resp.complete:
        return resp.body == expected.body if expected.complete else expected.body.startswith(resp.body)
    return expected.body.startswith(resp.body)  # cut: a prefix of it


def _headers_ok(resp: Message, expected: Message) -> bool:
    def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        named = {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}
        return [(k.lower(), v) for k, v in headers
                if k.lower() not in HOP_BY_HOP and k.lower() not in named - {b"content-length"}
                and k.lower() not in (b"date", b"content-length")]
    got = end_to_end(resp.headers)
    return all(h in got for h in end_to_end(expected.headers))
