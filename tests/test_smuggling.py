"""Differential smuggling fuzz: the sidecar is byte-faithful (issue 12).

For any bytes a client sends, the requests the app parses (llhttp, strict) are exactly
requests the sidecar counted and logged, each with the body the client framed; for
any bytes the app answers, the client gets that answer (hop-by-hop headers aside), an
error of the sidecar's own, or a cut connection, never bytes of another response.
The harness and the invariant are in ``tests/smuggle.py``; the inputs (seeds from
defparam/smuggler, the classic desyncs, issue 12's shapes, and hypothesis strategies
over the smuggling primitives) in ``tests/smuggle_cases.py``.  The long run is
``bench/smuggle.py`` (figures in ``bench/results/smuggle.md``).

Where nginx 1.22.1 (``proxy_http_version 1.1``, keep-alive upstream, run by
``bench/smuggle.py --nginx`` on the same inputs to the same recorder) differs, and
which is right:
- A ``1xx`` with a body (``199`` + ``Content-Length: 5`` + ``hello``, then the 200):
  nginx passes the ``199`` on as if final, body and all; a client (for which 1xx is
  interim) then reads the *next* response as this request's answer: a response
  desync.  The sidecar answers 502 (RFC 9112 6.3: a 1xx has no body).  Sidecar right.
- An unsolicited ``101`` from the app: nginx relays it and turns the client connection
  into a tunnel (the pipelined request behind it never gets an HTTP answer).  The
  sidecar answers 502: nobody asked to switch (RFC 9110 15.2.2).  Sidecar right.
- A response ``Transfer-Encoding: gzip`` (not ending in chunked): both read it to the
  close (RFC 9112 6.3); nginx re-chunks it and drops the ``gzip`` coding from the
  header, so the client gets coded bytes unlabelled; the sidecar says ``gzip, chunked``.
- A NUL in the reason phrase: nginx forwards it; the sidecar answers 502 (RFC 9112 4
  allows HTAB, SP, VCHAR, obs-text only).  Both avoid a desync; the sidecar is stricter.
- A response head of ~100 KiB: nginx 502 ("upstream sent too big header", its
  ``proxy_buffer_size`` is 4-8 KiB); the sidecar forwards heads up to 64 KiB
  (``upstream.max_response_head``).  Both bounded.
- Request bytes a strict llhttp rejects (a control byte in a header value as in
  smuggler's ``X: X\x01Transfer-Encoding: chunked``, a non-token header name
  ``Transf\x82r-Encoding``, bare-LF chunk lines, a chunk extension without a name):
  nginx accepts them (dropping the invalid header, or tolerating the LF) and
  forwards a request it frames itself with ``Content-Length``; the sidecar answers
  400.  Neither desyncs (nginx re-frames what it forwards); the sidecar's refusal is
  what RFC 9110 5.5 and RFC 9112 2.2 recommend for invalid framing.
- h2c upgrade with a request pipelined behind it: nginx ignores ``Upgrade`` (no
  ``proxy_set_header Upgrade``) and answers both; the sidecar answers the first and
  closes (aiohttp's C parser has dropped the rest of that read), so the second is
  unanswered, never processed, and retryable.  nginx's is better; the sidecar's is
  safe (nothing reaches the app uncounted) and the client never waits.
- The same as nginx: gzip request bodies forwarded as received (the sidecar decompressed
  them before issue 12); ``Connection: Content-Length``/``Host`` on a request keeps the
  framing (nginx ignores request ``Connection`` options; the sidecar drops the named
  headers but never the framing ones or Host); no ``100 Continue`` to HTTP/1.0; obs-text
  header values byte for byte; a reset close-delimited body is cut, not terminated.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import ROOT
from tests.smuggle import Case
from tests.smuggle_cases import CASES, SEEDS, case_strategy, smuggler_seeds
from tests.smuggle_rig import SidecarRig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarRig]:
    rig = SidecarRig(tmp_path_factory.mktemp("smuggle"), root=ROOT)
    try:
        yield rig
    finally:
        rig.close()


@pytest.mark.parametrize("case", SEEDS, ids=[c.name for c in SEEDS])
def test_seed_holds_the_invariant(rig: SidecarRig, case: Case) -> None:
    """Issue 12's shapes and the classic desyncs, one by one."""
    assert rig.run(case) == []


def test_smuggler_corpus_holds_the_invariant(rig: SidecarRig) -> None:
    """Every Transfer-Encoding mutation of defparam/smuggler, with its CL.TE and TE.CL probes."""
    failures = {c.name: v for c in smuggler_seeds() if (v := rig.run(c))}
    assert failures == {}


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=case_strategy())
def test_fuzzed_requests_and_answers_hold_the_invariant(rig: SidecarRig, case: Case) -> None:
    assert rig.run(case) == [], case


def test_after_the_fuzz_nothing_was_logged_as_an_error(rig: SidecarRig) -> None:
    assert rig.errors_logged() == []
    assert len(CASES) > 300
