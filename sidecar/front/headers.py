"""Header rules of a forwarding proxy, as pure functions over (name, value) pairs.

RFC 9110 section 7.6.1: Connection, every header it names, and the classic
hop-by-hop set are not forwarded.  Requests gain the X-Forwarded-* headers.

``Connection`` cannot unframe a request: Content-Length and Host are kept whatever
it names (RFC 9110 7.6.1 lets a proxy keep what it must; RFC 9112 6.3 and 3.2 say the
forwarded message frames its own body and an HTTP/1.1 request carries Host).  A
Content-Length the client named, dropped, would leave the body to be read by the app
as the next request.  Transfer-Encoding is always dropped here and set again by the
request head from the body the proxy actually sends.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDictProxy

__all__ = ("HOP_BY_HOP", "request_headers", "response_headers")

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)
# Also not forwarded upstream: we answer Expect: 100-continue ourselves.
_REQUEST_DROP = HOP_BY_HOP | {"expect"}
# Never dropped because Connection names them: they frame and route the request.
_FRAMING = frozenset(("content-length", "host"))


def _named_by_connection(values: Iterable[str]) -> frozenset[str]:
    named: set[str] = set()
    for value in values:
        named.update(token.strip().lower() for token in value.split(","))
    return frozenset(named)


def request_headers(
    headers: CIMultiDictProxy[str], *, client: str | None, proto: str = "http"
) -> list[tuple[str, str]]:
    """Headers to send upstream: end-to-end ones as received, plus X-Forwarded-*.

    X-Forwarded-For gets the client appended (one field, where the first one was).
    X-Forwarded-Proto and -Host are set from this hop when absent and kept when an
    earlier proxy (the ingress that terminated TLS) set them, as a non-edge Envoy
    does: overwriting ``https`` with this hop's ``http`` sends apps that enforce
    HTTPS into redirect loops.  One pass over the headers: this runs per request.
    """
    drop = _REQUEST_DROP
    if "Connection" in headers:
        drop = drop | (_named_by_connection(headers.getall("Connection")) - _FRAMING)
    out: list[tuple[str, str]] = []
    prior: list[str] = []
    at = -1
    has_proto = has_host = False
    for name, value in headers.items():
        lname = name.lower()
        if lname in drop:
            continue
        if lname == "x-forwarded-for" and client:
            if at < 0:
                at = len(out)
                out.append((name, value))
            prior.append(value)
            continue
        if lname == "x-forwarded-proto":
            has_proto = True
        elif lname == "x-forwarded-host":
            has_host = True
        out.append((name, value))
    if client:
        forwarded_for = ", ".join((*prior, client))
        if at < 0:
            out.append(("X-Forwarded-For", forwarded_for))
        else:
            out[at] = ("X-Forwarded-For", forwarded_for)
    if not has_proto:
        out.append(("X-Forwarded-Proto", proto))
    if not has_host:
        host = headers.get("Host")
        if host is not None:
            out.append(("X-Forwarded-Host", host))
    return out


def response_headers(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str | None]:
    """Headers to send to the client (the upstream's, minus hop-by-hop ones), and the app's
    transfer codings other than ``chunked`` (``gzip`` of ``gzip, chunked``), which the client
    must be told about: the body is forwarded as it came, still coded.  One pass over the
    headers in the common case: this runs per response."""
    out: list[tuple[str, str]] = []
    named: list[str] = []
    codings: list[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname not in HOP_BY_HOP:
            out.append((name, value))
        elif lname == "connection":
            named.append(value)
        elif lname == "transfer-encoding":
            codings.extend(c.strip() for c in value.split(",")
                           if c.strip() and c.strip().lower() != "chunked")
    if named:
        drop = _named_by_connection(named) - HOP_BY_HOP  # "keep-alive": nothing more to drop
        if drop:
            out = [(k, v) for k, v in out if k.lower() not in drop]
    return out, ", ".join(codings) or None
