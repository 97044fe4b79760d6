"""Config fuzz: random YAML documents and SIDECAR_* values never produce a traceback; every
rejection exits 2 and each problem line names the key (or the file) it is about."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar import cli
from sidecar.config import SCHEMA, ConfigError, load, to_yaml
from sidecar.config.sources import dotted
from tests.conftest import ROOT, free_port

KEYS = [(section, key) for section, keys in SCHEMA.items() for key in keys]
DOTTED = {dotted(s, k) for s, k in KEYS} | {s for s in SCHEMA if s} | {"exit.http.url", "exit.http.method"}
ENV_NAMES = [f"SIDECAR_{s}_{k}".upper() if s else f"SIDECAR_{k}".upper() for s, k in KEYS] + [
    "SIDECAR_EXIT_HTTP_URL", "SIDECAR_EXIT_HTTP_METHOD", "SIDECAR_DRAIN_TIMOUT", "SIDECAR_CLIENT_X"]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LIKELY = st.sampled_from([
    "5s", "250ms", "2m", "1h", "0", "-1", "1e400", "9" * 400, ".inf", "nan", "SIGTERM", "SIGNOPE",
    "http://127.0.0.1:8000", "http://:nope", "unix:rel.sock", "unix:/x.sock", "0.0.0.0:70000", "8080",
    "[::1]:80", "/healthz", "healthz", "(unclosed", "(" * 5000, "a{99999999999}", "true", "maybe",
    "null", "", " ", "close", "wait", "json", "xml", "POST", "P O S T", "٣s", "²", "\udcff",
])
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=30) | LIKELY)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(["url", "method"]),
                                        inner, max_size=3), max_leaves=8)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """Mostly the schema's own shape, with values from everywhere; sometimes anything at all."""
    if draw(st.integers(0, 9)) == 9:
        return draw(VALUES)
    doc: dict[Any, Any] = {}
    for section, key in draw(st.lists(st.sampled_from(KEYS), max_size=6)):
        value = draw(VALUES)
        if section:
            target = doc.setdefault(section, {})
            if isinstance(target, dict):
                target[key] = value
        else:
            doc[key] = value
    if draw(st.integers(0, 4)) == 4:
        doc[draw(st.text(max_size=10))] = draw(VALUES)
    if draw(st.integers(0, 4)) == 4:
        doc[draw(st.sampled_from([s for s in SCHEMA if s]))] = draw(SCALARS)
    return doc


# What an environment can hold: no NUL, no lone surrogate beyond os.environ's surrogateescape.
ENV_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=30)
ENVS = st.dictionaries(st.sampled_from(ENV_NAMES), LIKELY | ENV_TEXT, max_size=5)


def named(problem: str, given: set[str]) -> bool:
    """Does this problem line start by naming a key, an env variable, or the file?"""
    head = problem.split(":", 1)[0].split(" (", 1)[0]
    return (head in DOTTED or head in given or head.startswith(("SIDECAR_", "config file "))
            or head.split(".", 1)[0] in given
            or any(problem.startswith(f"{key!r}: ") for key in given))  # an odd key, quoted


def check(doc_text: str | None, env: dict[str, str]) -> None:
    """load() either returns a config that survives to_yaml and a reload, or names the key."""
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if doc_text is not None:
            path = os.path.join(tmp, "sidecar.yaml")
            Path(path).write_text(doc_text, encoding="utf-8", errors="surrogateescape")
        try:
            config = load(path, env=env)
        except ConfigError as exc:
            given = set(env)
            with contextlib.suppress(Exception):
                data = yaml.safe_load(doc_text or "")
                if isinstance(data, dict):
                    given |= {str(k) for k in data}
                    given |= {f"{k}.{kk}" for k, v in data.items() if isinstance(v, dict) for kk in v}
            assert exc.problems
            for problem in exc.problems:
                assert named(problem, given), problem
            return
        again = os.path.join(tmp, "again.yaml")
        Path(again).write_text(to_yaml(config))
        assert to_yaml(load(again)) == to_yaml(config)  # the printed config is valid, and stable


@FUZZ
@given(doc=documents())
def test_random_yaml_documents_are_loaded_or_rejected_naming_the_key(doc: Any) -> None:
    check(yaml.safe_dump(doc, allow_unicode=True), {})


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(["[" * 5000, "{a: " * 3000, "a: &x [*x]", "--- !!python/object:os.system x"]))
@example(text="::")  # found by this test: a key ':' read ':: unknown key'; now "':': unknown key"
def test_random_yaml_text_is_loaded_or_rejected_naming_the_file(text: str) -> None:
    check(text, {})


@FUZZ
@given(env=ENVS)
def test_random_sidecar_env_values_are_loaded_or_rejected_naming_the_key(env: dict[str, str]) -> None:
    check(None, env)


@FUZZ
@given(doc=documents(), env=ENVS)
def test_check_config_exits_0_or_2_and_never_raises(doc: Any, env: dict[str, str]) -> None:
    """The real entry point, in-process: exit code 0 with YAML, or 2 with problems on stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sidecar.yaml")
        Path(path).write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, {**clean, **env}, clear=True), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check-config", "--config", path])
    assert code in (0, 2)
    if code == 2:
        assert err.getvalue().startswith("sidecar: invalid configuration:\n") and out.getvalue() == ""
    else:
        assert yaml.safe_load(out.getvalue())["drain"]


NASTY = {
    "not-utf8": b"drain: {delay: \xff\xfe}\n",
    "nested-too-deeply": b"[" * 5000,
    "regex-nested-too-deeply": b"exit: {process: '" + b"(" * 5000 + b"'}\n",
    "regex-repeat-too-large": b"exit: {process: 'a{99999999999}'}\n",
    "infinite-duration": b"drain: {timeout: .inf}\n",
    "not-a-number-duration": b"upstream: {timeout: .nan}\n",
    "duration-beyond-float": b"drain: {delay: " + b"9" * 400 + b"s}\n",
}


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_config_file_exits_2_before_binding_without_traceback(tmp_path: Path, name: str) -> None:
    """A handful of real `sidecar run` processes: exit 2, a clear message, the port left free."""
    path = tmp_path / "sidecar.yaml"
    path.write_bytes(NASTY[name])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(path), "--listen", f"127.0.0.1:{port}",
         "--admin", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, check=False, env=env, timeout=60, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "sidecar: invalid configuration:" in out.stderr
    assert "sidecar started" not in out.stderr
    with socket.socket() as s:  # nothing was bound
        s.bind(("127.0.0.1", port))
