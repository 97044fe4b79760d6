"""The benchmark scripts in bench/ keep working: they document their flags, and a tiny run of each
completes and writes its report.  A self-check only: nothing here looks at a timing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("script", ["throughput.py", "scale.py", "drain.py", "timeline.py", "rolling.py",
                                    "soak.py", "grpc_rolling.py", "h2c.py", "instructions.py"])
def test_bench_script_documents_its_flags_including_the_sidecar_checkout(script: str) -> None:
    r = _run([str(BENCH / script), "--help"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--sidecar-root" in r.stdout


def test_throughput_refuses_an_unknown_target_by_name() -> None:
    r = _run([str(BENCH / "throughput.py"), "--targets", "direct,envoy"], timeout=60)
    assert r.returncode == 2
    assert "envoy" in r.stderr


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_throughput_tiny_run_writes_a_report_with_the_sidecar_row(tmp_path: Path) -> None:
    out = tmp_path / "tp.md"
    r = _run([str(BENCH / "throughput.py"), "--targets", "direct,sidecar", "--stages", "fast",
              "--duration", "1", "--rounds", "1", "--warmup", "0", "--no-install", "--out", str(out)],
             timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "| sidecar | 1" in text and "proxy CPU µs/req" in text
    assert (tmp_path / "tp.json").exists()


def test_scale_tiny_run_reports_memory_and_the_drain_of_its_connections(tmp_path: Path) -> None:
    out = tmp_path / "scale.md"
    r = _run([str(BENCH / "scale.py"), "--conns", "50", "--size", "0.01", "--warmup", "0", "--no-nginx",
              "--out", str(out)], timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "KB per connection" in text
    assert "of 50 (still open at the end: 0)" in text  # every idle connection was closed by the drain


def test_grpc_rolling_tiny_run_reports_failed_and_lost_calls_per_front(tmp_path: Path) -> None:
    out = tmp_path / "grpc.md"
    r = _run([str(BENCH / "grpc_rolling.py"), "--fronts", "sidecar,none", "--apps", "graceful",
              "--rounds", "1", "--workers", "4", "--warmup", "0.5", "--tail", "0.2", "--delay", "0.3",
              "--out", str(out)], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "| front | app | calls | failed | LOST | duplicates |" in text
    assert "| sidecar | graceful |" in text and "| none | graceful |" in text


@pytest.mark.skipif(shutil.which("h2load") is None or shutil.which("nghttpd") is None,
                    reason="h2load/nghttpd are not installed (apt-get install nghttp2-client nghttp2-server)")
def test_h2c_tiny_run_writes_a_report_with_the_sidecar_row(tmp_path: Path) -> None:
    out = tmp_path / "h2c.md"
    r = _run([str(BENCH / "h2c.py"), "--targets", "direct,sidecar", "--stages", "rate", "--duration", "1",
              "--rounds", "1", "--rate", "200", "--out", str(out)], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "| sidecar | n/a |" in text and "p99 added ms" in text


@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("h2load") is None,
                    reason="valgrind/h2load are not installed (apt-get install valgrind nghttp2-client)")
def test_instructions_tiny_run_counts_instructions_per_request(tmp_path: Path) -> None:
    out = tmp_path / "instr.md"
    r = _run([str(BENCH / "instructions.py"), "--kinds", "fast", "--requests", "50", "--warmup", "10",
              "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| GET /fast |"))
    assert int(row.split("|")[2].strip().replace(",", "")) > 1000  # a count, not a blank


def test_instructions_refuses_an_unknown_kind_by_name() -> None:
    r = _run([str(BENCH / "instructions.py"), "--kinds", "fast,websocket"], timeout=60)
    assert r.returncode == 2
    assert "websocket" in r.stderr
