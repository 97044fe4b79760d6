"""Inputs for the smuggling harness (``tests/smuggle.py``): seeds from public corpora and
hypothesis strategies built from the known smuggling primitives.

Sources of the seeds (read, not copied wholesale; the strings are data):
- defparam/smuggler (MIT licence, (c) 2020 Evan Custodio), ``configs/default.py`` and
  ``configs/exhaustive.py``: the Transfer-Encoding header mutations (``GADGETS``
  below), rendered as it renders them (the gadget line, then Host, then
  Content-Length) with its two probe bodies, CL.TE (``Content-Length: 4`` over
  ``1\\r\\nZ\\r\\n0\\r\\n\\r\\n``) and TE.CL (``Content-Length: 6`` over ``0\\r\\n\\r\\nX``).
- The classic CL.TE / TE.CL / TE.TE shapes (Linhart et al. 2005, "HTTP Request
  Smuggling"; Kettle 2019, "HTTP Desync Attacks"), and the defects of issue 12
  (gzip bodies, Connection naming framing headers, 1xx with a body, h2c).
"""

from __future__ import annotations

import gzip

from hypothesis import strategies as st

from tests.smuggle import SENTINEL, Case

__all__ = ("CASES", "SEEDS", "case_strategy", "smuggler_seeds")

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"


# defparam/smuggler configs/exhaustive.py: the named mutations
_NAMED_GADGETS = [
    " Transfer-Encoding: chunked", "Transfer-Encoding:\tchunked", "Transfer-Encoding\t:\tchunked",
    "Transfer Encoding: chunked", "Transfer_Encoding: chunked", "Transfer Encoding:chunked",
    "Transfer-Encoding : chunked", "Transfer-Encoding:  chunked", "Transfer-Encoding:\x0bchunked",
    "Transfer-Encoding: chunked, cow", "Transfer-Encoding: cow, chunked", "Content-Encoding: chunked",
    "Transfer-Encoding:\n chunked", 'Transfer-Encoding: "chunked"', "Transfer-Encoding: 'chunked'",
    "Transfer-Encoding: chunk", "TrAnSFer-EnCODinG: cHuNkeD", "TRANSFER-ENCODING: CHUNKED",
    "Transfer-Encoding: chunked\r", "Transfer-Encoding: chunked\t",
    "Transfer-Encoding: cow\r\nTransfer-Encoding: chunked", "Transfer\r-Encoding: chunked",
    "Transfer-Encoding: cow chunked bar", "Transfer-Encoding:\xffchunked", "Transfer-Encoding: ch\x96nked",
    "Transf\x82r-Encoding: chunked", "X:X\rTransfer-Encoding: chunked", "X:X\nTransfer-Encoding: chunked",
]
# defparam/smuggler configs/default.py: each byte in four places around the header
_BYTES = [0x1, 0x4, 0x8, 0x9, 0xA, 0xB, 0xC, 0xD, 0x1F, 0x20, 0x7F, 0xA0, 0xFF]
_PLACES = ["Transfer-Encoding:%cchunked", "Transfer-Encoding%c: chunked", "%cTransfer-Encoding: chunked",
           "Transfer-Encoding: chunked%c", "X: X%cTransfer-Encoding: chunked",
           "Transfer-Encoding: chunked%cX: X", "X: X\r%cTransfer-Encoding: chunked",
           "X: X%c\nTransfer-Encoding: chunked", "Transfer-Encoding: chunked\r%cX: X",
           "Transfer-Encoding: chunked%c\nX: X"]
GADGETS = _NAMED_GADGETS + [place % b for b in _BYTES for place in _PLACES]


def _render(gadget: str, length: int, body: bytes, method: bytes = b"POST") -> bytes:
    """smuggler's template: request line, the gadget, Host, Content-Type, Content-Length."""
    return (method + b" /s?cb=1 HTTP/1.1\r\n" + gadget.encode("latin-1") + b"\r\nHost: app\r\n"
            b"Content-type: application/x-www-form-urlencoded; charset=UTF-8\r\n"
            b"Content-Length: %d\r\n\r\n" % length + body)


def smuggler_seeds() -> list[Case]:
    """Each gadget with smuggler's CL.TE and TE.CL probes, the sentinel behind."""
    out = []
    for i, gadget in enumerate(GADGETS):
        out.append(Case(_render(gadget, 4, b"1\r\nZ\r\n0\r\n\r\n") + SENTINEL, name=f"smuggler-clte-{i}"))
        out.append(Case(_render(gadget, 6, b"0\r\n\r\nX") + SENTINEL, name=f"smuggler-tecl-{i}"))
    return out


def _gzip_smuggler() -> bytes:
    return gzip.compress(b"x=" + b"a" * 300 + SMUGGLED, mtime=0)


_GZ = _gzip_smuggler()
# The shapes of issue 12 and the classic desyncs, by name.
SEEDS = [
    Case(b"POST /gz HTTP/1.1\r\nHost: app\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
         % (len(_GZ), _GZ) + SENTINEL, name="gzip-body-inflates-to-a-request"),
    Case(b"POST /a HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, Content-Length\r\nContent-Length: %d"
         b"\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED) + SENTINEL, name="connection-names-content-length"),
    Case(b"POST /a HTTP/1.1\r\nHost: app\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED) + SENTINEL,
         name="connection-names-transfer-encoding"),
    Case(b"POST /a HTTP/1.1\r\nHost: app\r\nConnection: Host\r\nContent-Length: 2\r\n\r\nhi" + SENTINEL,
         name="connection-names-host"),
    Case(b"POST /clte HTTP/1.1\r\nHost: app\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\nG" + SENTINEL, name="cl-te"),
    Case(b"POST /tecl HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
         b"8\r\nSMUGGLED\r\n0\r\n\r\n" + SENTINEL, name="te-cl"),
    Case(b"POST /tete HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-encoding: x\r\n\r\n"
         b"0\r\n\r\n" + SENTINEL, name="te-te"),
    Case(b"GET /get-with-body HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED)
         + SENTINEL, name="get-with-a-body"),
    Case(b"POST /ext HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2;a=b\r\nhi\r\n2;\"q\"\r\nho\r\n0;x\r\nTrailer-A: 1\r\n\r\n" + SENTINEL, name="chunk-extensions-trailers"),
    Case(b"POST /lf HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\n0\n\n" + SENTINEL,
         name="bare-lf-chunks"),
    Case(b"GET /h2c HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
         b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n" + SENTINEL, name="h2c-then-pipelined"),
    Case(b"GET /r HTTP/1.1\r\nHost: app\r\n\r\n" + SENTINEL,
         reply=b"HTTP/1.1 199 X\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
         name="1xx-with-a-body"),
    Case(b"GET /r HTTP/1.1\r\nHost: app\r\n\r\n" + SENTINEL,
         reply=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
         name="two-answers-to-one-request"),
    Case(b"HEAD /r HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
         reply=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", name="head-answered-with-a-body"),
    Case(b"GET /r HTTP/1.1\r\nHost: app\r\n\r\n" + SENTINEL,
         reply=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
         name="response-te-and-cl"),
    Case(b"GET /r HTTP/1.1\r\nHost: app\r\n\r\n" + SENTINEL,
         reply=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", then="reset", name="reset-mid-body"),
    Case(b"POST /early HTTP/1.1\r\nHost: app\r\nContent-Length: 70000\r\n\r\n" + b"z" * 70000 + SENTINEL,
         reply=b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig", early=True, name="early-answer-before-the-body"),
    Case(b"POST /early HTTP/1.1\r\nHost: app\r\nContent-Length: 70000\r\n\r\n" + b"z" * 70000 + SENTINEL,
         reply=b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig", then="close",
         early=True, name="early-answer-and-close"),
    Case(b"GET /r HTTP/1.1\r\nHost: app\r\n\r\n" + SENTINEL,
         reply=b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", name="204-with-a-body"),
]
CASES = SEEDS + smuggler_seeds()


# --- hypothesis: requests and answers from the primitives ------------------------------------

_CL_VALUES = [b"%d", b"+%d", b" %d", b"0%d", b"%d, %d", b"%d ", b"%dx", b"-%d", b"%d.0"]
_TE_VALUES = [b"chunked", b" chunked", b"chunked, chunked", b"gzip, chunked", b"chunked, gzip",
              b"identity", b"xchunked", b"\tchunked", b"CHUNKED", b"chunked;q=1", b"", b"\x0bchunked"]
_CONNECTION = [b"close", b"keep-alive", b"Content-Length", b"Transfer-Encoding", b"Host",
               b"Content-Encoding", b"upgrade", b"keep-alive, Content-Length", b"X-A", b"Expect"]
_EXTRA = [b"Content-Encoding: gzip", b"Expect: 100-continue", b"Upgrade: h2c", b"Upgrade: websocket",
          b"X-A: a\rb", b"X-A: a\nb", b"X-A:\r\n folded", b"X-A: caf\xe9", b"Host: other",
          b"Content-Length: 0", b"Transfer-Encoding: chunked", b"Trailer: X-T", b"TE: trailers"]
_CHUNK_SIZES = [b"%x", b"%X", b"0%x", b"%x;ext", b"%x ; ext=\"v\"", b"%x\t", b"%x;", b" %x", b"%x\x00"]


@st.composite
def request(draw: st.DrawFn, last: bool = False) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"]
                                  + ([b"HEAD"] if last else [])))
    body = draw(st.sampled_from([b"", b"hello", SMUGGLED, _GZ[:40], b"0\r\n\r\n", b"x" * 300]))
    lines = [method + b" /f%d?q=%d HTTP/1.1" % (draw(st.integers(0, 9)), draw(st.integers(0, 9))),
             b"Host: app"]
    framing = draw(st.sampled_from(["cl", "te", "both", "none", "te-dup", "cl-dup"]))
    length = len(body) + draw(st.sampled_from([0, 0, 0, -1, 1, 5]))
    if framing in ("cl", "both", "cl-dup"):
        lines.append(b"Content-Length: " + draw(st.sampled_from(_CL_VALUES)).replace(b"%d", b"%d" % max(length, 0)))
    if framing == "cl-dup":
        lines.append(b"Content-Length: %d" % len(body))
    if framing in ("te", "both", "te-dup"):
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from(_TE_VALUES)))
    if framing == "te-dup":
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from(_TE_VALUES)))
    if draw(st.booleans()):
        lines.append(b"Connection: " + draw(st.sampled_from(_CONNECTION)))
    lines.extend(draw(st.lists(st.sampled_from(_EXTRA), max_size=2)))
    if framing in ("te", "both", "te-dup") and draw(st.integers(0, 3)):
        size = draw(st.sampled_from(_CHUNK_SIZES))
        payload = (size.replace(b"%x", b"%x" % len(body)).replace(b"%X", b"%X" % len(body)) + b"\r\n"
                   + body + b"\r\n") if body else b""
        payload += draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0\n\n", b"0\r\n"]))
    else:
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


@st.composite
def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, max(0, len(buf) - 1)))
        op = draw(st.sampled_from(["insert", "delete", "flip"]))
        if op == "insert":
            buf[at:at] = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b":", b",", b"\xff"]))
        elif op == "delete" and buf:
            del buf[at:at + draw(st.integers(1, 3))]
        elif buf:
            buf[at] = draw(st.integers(0, 255))
    return bytes(buf)


_STATUS = [b"200 OK", b"201 Created", b"204 No Content", b"304 Not Modified", b"404 Not Found",
           b"500 Oops", b"299 X"]
_INTERIM = [b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            b"HTTP/1.1 199 X\r\nContent-Length: 2\r\n\r\nhi", b"HTTP/1.1 102 Processing\r\n\r\n"]
_RESP_EXTRA = [b"X-A: caf\xe9", b"X-B: a\r\n folded", b"Connection: close", b"Connection: keep-alive",
               b"Connection: Content-Length", b"Connection: X-A", b"Keep-Alive: timeout=5",
               b"Content-Disposition: attachment; filename=\"r\xe9sum\xe9.pdf\"", b"Trailer: X-T",
               b"X-C: a\rb"]


@st.composite
def answer(draw: st.DrawFn) -> tuple[bytes, str]:
    """A raw response of the app, and what it does after it (keep, close, reset)."""
    status = draw(st.sampled_from(_STATUS))
    body = draw(st.sampled_from([b"", b"hello", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil", b"y" * 1000]))
    lines = [b"HTTP/1.1 " + status]
    framing = draw(st.sampled_from(["cl", "te", "close", "both", "te-gzip", "cl-wrong"]))
    if framing in ("cl", "both"):
        lines.append(b"Content-Length: %d" % len(body))
    if framing == "cl-wrong":
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.sampled_from([-2, 3]))))
    if framing in ("te", "both"):
        lines.append(b"Transfer-Encoding: chunked")
    if framing == "te-gzip":
        lines.append(b"Transfer-Encoding: gzip")
    lines.extend(draw(st.lists(st.sampled_from(_RESP_EXTRA), max_size=2)))
    if framing in ("te", "both"):
        size = draw(st.sampled_from(_CHUNK_SIZES)).replace(b"%x", b"%x" % len(body)).replace(b"%X", b"%X" % len(body))
        payload = (size + b"\r\n" + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        payload = body
    data = draw(st.sampled_from(_INTERIM)) + b"\r\n".join(lines) + b"\r\n\r\n" + payload
    then = "close" if framing in ("close", "te-gzip") else draw(st.sampled_from(["keep", "keep", "close", "reset"]))
    return data, then


@st.composite
def case_strategy(draw: st.DrawFn) -> Case:
    """Request side (pipelined, mutated) or answer side (one request, a scripted answer)."""
    if draw(st.booleans()):
        count = draw(st.integers(1, 3))
        reqs = [draw(request(last=i == count - 1)) for i in range(count)]
        data = b"".join(reqs)
        if draw(st.integers(0, 2)) == 0:
            data = draw(mutate(data))
        return Case(data + SENTINEL, name="fuzz-request")
    reply, then = draw(answer())
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"POST"]))
    if draw(st.integers(0, 3)) == 0:
        reply = draw(mutate(reply))
    body = draw(st.sampled_from([b"hi", b"z" * 70000]))  # a large one is still being sent early
    early = method == b"POST" and draw(st.booleans())
    head = method + b" /r HTTP/1.1\r\nHost: app\r\n" + (
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body) if method == b"POST" else b"\r\n")
    if early:
        return Case(head + SENTINEL, reply, then, name="fuzz-answer", early=True)
    if method == b"HEAD":  # the client cannot frame what follows a HEAD answer: last on its connection
        return Case(head.replace(b"Host: app\r\n", b"Host: app\r\nConnection: close\r\n"), reply, then,
                    name="fuzz-answer")
    return Case(head + SENTINEL, reply, then, name="fuzz-answer")
