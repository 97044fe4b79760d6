"""Differential smuggling fuzz: the sidecar is byte-faithful (issue 12).

For any bytes a client sends, the requests the app parses (llhttp, strict) are exactly
requests the sidecar counted and logged, each with the body the client framed; for
any bytes the app answers, the client gets that answer (hop-by-hop headers aside), an
error of the sidecar's own, or a cut connection, never bytes of another response.
The harness and the invariant are in ``tests/smuggle.py``; the inputs (seeds from
defparam/smuggler, the classic desyncs, issue 12's shapes, and hypothesis strategies
over the smuggling primitives) in ``tests/smuggle_cases.py``.  The long run is
``bench/smuggle.py`` (figures in ``bench/results/smuggle.md``).

Where nginx (1.22, ``proxy_http_version 1.1``, run by ``bench/smuggle.py --nginx``
on the same inputs) differs, and which is right:
- A response ``Transfer-Encoding: gzip`` (not ending in chunked): nginx answers 502
  ("upstream sent unknown Transfer-Encoding"); the sidecar forwards the body delimited
  by the close, as RFC 9112 6.3 says a recipient must read it, and tells the client
  ``gzip, chunked``.  Both are safe; the sidecar's is what the RFC prescribes.
- A 1xx with a body (``199`` + ``Content-Length: 5``): both 502 (nginx: "upstream
  sent invalid header"; neither splices it).
- ``Connection: Content-Length`` on a request: nginx does not treat request
  ``Connection`` options as hop-by-hop at all (it forwards its own ``Connection:
  close``/keep-alive and the client's Content-Length): safe.  The sidecar drops the
  named headers but never the framing ones or Host: safe and RFC 9110 7.6.1.
- ``Content-Encoding: gzip`` request bodies: both forward the bytes as received.
- h2c upgrade with a request pipelined behind: nginx ignores Upgrade (no
  ``proxy_set_header Upgrade``) and answers both; the sidecar answers the first and
  closes (aiohttp's C parser has dropped the rest of that read), so the second is
  unanswered, never processed, and retryable.  nginx's is better; the sidecar's is
  safe (nothing reaches the app uncounted), and a client never waits.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import ROOT
from tests.smuggle import Case, SidecarRig
from tests.smuggle_cases import CASES, SEEDS, case_strategy, smuggler_seeds


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
