"""Configuration and the command line: clear answers to bad input, before any port is bound."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, load, to_yaml
from tests.conftest import ROOT, free_port


def sidecar(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, check=False,
                          env=full_env, timeout=timeout, cwd=ROOT)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return str(path)


def test_example_config_documents_every_default() -> None:
    assert load(str(ROOT / "config" / "sidecar.yaml")) == load(None)


def test_check_config_prints_yaml_that_is_itself_a_valid_config(tmp_path: Path) -> None:
    path = write(tmp_path, "drain: {delay: 250ms, timeout: 2m, grace_period: 3m}\nadmin_token: s3cret\n")
    out = sidecar("check-config", "--config", path)
    assert out.returncode == 0, out.stderr
    assert "s3cret" not in out.stdout
    printed = yaml.safe_load(out.stdout)
    assert (printed["drain"]["delay"], printed["drain"]["timeout"]) == ("250ms", "120s")
    again = write(tmp_path, out.stdout)
    reloaded = load(again)
    assert reloaded.drain == load(path).drain
    assert reloaded.admin_token == "<redacted>"


@pytest.mark.parametrize(("text", "key"), [
    ("drain: {timout: 5s}\n", "drain.timout"),
    ("upstreem: {url: http://x:1}\n", "upstreem"),
    ("drain: {delay: soon}\n", "drain.delay"),
    ("drain: {delay: -1}\n", "drain.delay"),
    ("listen: 0.0.0.0:70000\n", "listen"),
    ("admin: localhost\n", "admin"),
    ("upstream: {url: 'ftp://x:1'}\n", "upstream.url"),
    ("upstream: {url: 'http://:nope'}\n", "upstream.url"),
    ("upstream: {max_connections: lots}\n", "upstream.max_connections"),
    ("upstream: {max_response_head: 1GiB}\n", "upstream.max_response_head"),
    ("upstream: {max_response_head: 100}\n", "upstream.max_response_head"),
    ("drain: {websockets: maybe}\n", "drain.websockets"),
    ("exit: {signal: SIGNOPE}\n", "exit.signal"),
    ("exit: {process: '(unclosed'}\n", "exit.process"),
    ("exit: {http: {url: 'not a url'}}\n", "exit.http.url"),
    ("logging: {format: xml}\n", "logging.format"),
    ("logging: {access_log: maybe}\n", "logging.access_log"),
    ("drain: {delay: 10s, timeout: 20s, grace_period: 30s}\nexit: {wait: 5s}\n", "drain.grace_period"),
])
def test_invalid_config_exits_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    out = sidecar("check-config", "--config", write(tmp_path, text))
    assert out.returncode == 2
    assert f"  {key}" in out.stderr, out.stderr
    assert out.stdout == ""


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    out = sidecar("check-config", "--config", write(tmp_path, "drain: {delay: x, timeout: y}\n"))
    assert out.returncode == 2
    assert "drain.delay" in out.stderr and "drain.timeout" in out.stderr


def test_problems_of_every_kind_are_reported_in_one_pass(tmp_path: Path) -> None:
    """An invalid value elsewhere does not hide an over-budget drain (nor an unknown key)."""
    text = ("logging: {level: loud}\ndrain: {delay: 20s, timeout: 20s, grace_period: 30s, timout: 1s}\n"
            "listen: 127.0.0.1:9000\nadmin: 127.0.0.1:9000\n")
    out = sidecar("check-config", "--config", write(tmp_path, text))
    assert out.returncode == 2
    for key in ("logging.level", "drain.grace_period", "drain.timout", "admin"):
        assert f"  {key}" in out.stderr, out.stderr


def test_a_negative_duration_is_refused_as_negative() -> None:
    out = sidecar("check-config", env={"SIDECAR_DRAIN_DELAY": "-5s"})
    assert out.returncode == 2
    assert "drain.delay (from SIDECAR_DRAIN_DELAY): must not be negative, got '-5s'" in out.stderr


def test_unknown_env_setting_is_an_error_with_a_suggestion() -> None:
    out = sidecar("check-config", env={"SIDECAR_DRAIN_TIMOUT": "5s"})
    assert out.returncode == 2
    assert "SIDECAR_DRAIN_TIMOUT" in out.stderr and "SIDECAR_DRAIN_TIMEOUT" in out.stderr


def test_service_links_of_a_service_named_like_a_section_are_not_settings() -> None:
    """A Service named sidecar-drain-x in the namespace must not stop the sidecar from starting."""
    links = {"SIDECAR_DRAIN_X_SERVICE_HOST": "10.0.0.7", "SIDECAR_DRAIN_X_SERVICE_PORT": "80",
             "SIDECAR_DRAIN_X_SERVICE_PORT_HTTP": "80", "SIDECAR_DRAIN_X_PORT": "tcp://10.0.0.7:80",
             "SIDECAR_DRAIN_X_PORT_80_TCP": "tcp://10.0.0.7:80",
             "SIDECAR_DRAIN_X_PORT_80_TCP_ADDR": "10.0.0.7", "SIDECAR_DRAIN_X_PORT_80_TCP_PORT": "80",
             "SIDECAR_DRAIN_X_PORT_80_TCP_PROTO": "tcp"}
    out = sidecar("check-config", env=links)
    assert out.returncode == 0, out.stderr
    typo = sidecar("check-config", env={"SIDECAR_DRAIN_DELAI": "1s"})
    assert typo.returncode == 2 and "SIDECAR_DRAIN_DELAI" in typo.stderr


def test_kubernetes_service_link_variables_are_not_mistaken_for_settings() -> None:
    out = sidecar("check-config", env={"SIDECAR_SERVICE_HOST": "10.0.0.1", "SIDECAR_PORT": "tcp://x:1"})
    assert out.returncode == 0, out.stderr


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1111\nupstream: {url: 'http://file:1', timeout: 7s}\n"
                           "drain: {delay: 1s}\n")
    config = load(path, env={"SIDECAR_LISTEN": "127.0.0.1:2222", "SIDECAR_UPSTREAM_URL": "http://env:2",
                             "SIDECAR_DRAIN_DELAY": "3s"},
                  flags={"listen": "127.0.0.1:3333", "upstream": None})
    assert config.listen.port == 3333          # flag beats env and file
    assert config.upstream.url == "http://env:2"  # env beats file
    assert config.drain.delay == 3.0           # env beats file
    assert config.upstream.timeout == 7.0      # file beats default
    assert config.drain.timeout == 20.0        # default


def test_config_path_comes_from_sidecar_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, "drain: {delay: 2s}\n")
    out = sidecar("check-config", env={"SIDECAR_CONFIG": path})
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["drain"]["delay"] == "2s"


def test_env_names_the_key_and_the_variable_on_error() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, env={"SIDECAR_UPSTREAM_TIMEOUT": "fast"})
    assert info.value.problems[0].startswith("upstream.timeout (from SIDECAR_UPSTREAM_TIMEOUT):")


def test_durations_accept_every_documented_form() -> None:
    config = load(None, env={"SIDECAR_DRAIN_DELAY": "250ms", "SIDECAR_DRAIN_TIMEOUT": "2m",
                             "SIDECAR_EXIT_WAIT": "3", "SIDECAR_DRAIN_GRACE_PERIOD": "2.5m"})
    assert (config.drain.delay, config.drain.timeout, config.exit.wait) == (0.25, 120.0, 3.0)
    assert config.drain.grace_period == 150.0


def test_sizes_accept_every_documented_form() -> None:
    for text, size in (("64KiB", 65536), ("1MiB", 1 << 20), ("2048", 2048), ("4096B", 4096)):
        assert load(None, env={"SIDECAR_UPSTREAM_MAX_RESPONSE_HEAD": text}).upstream.max_response_head == size
    assert load(None).upstream.max_response_head == 64 * 1024


def test_retry_after_takes_seconds_or_a_duration() -> None:
    assert load(None, env={"SIDECAR_DRAIN_RETRY_AFTER": "7"}).drain.retry_after == 7
    assert load(None, env={"SIDECAR_DRAIN_RETRY_AFTER": "1500ms"}).drain.retry_after == 2
    with pytest.raises(ConfigError):
        load(None, env={"SIDECAR_DRAIN_RETRY_AFTER": "soon"})


def test_exit_http_accepts_a_mapping_or_env() -> None:
    config = load(None, env={"SIDECAR_EXIT_HTTP_URL": "http://127.0.0.1:8000/quitquitquit"})
    assert config.exit.http is not None and config.exit.http.method == "POST"
    assert "quitquitquit" in to_yaml(config)


def test_run_with_bad_config_exits_2_before_binding_any_port(tmp_path: Path) -> None:
    port = free_port()
    path = write(tmp_path, f"listen: 127.0.0.1:{port}\ndrain: {{delay: never}}\n")
    out = sidecar("run", "--config", path)
    assert out.returncode == 2
    assert "drain.delay" in out.stderr
    with socket.socket() as s:  # nothing was left bound, and nothing was logged as started
        s.bind(("127.0.0.1", port))
    assert "sidecar started" not in out.stderr


def test_run_with_a_port_in_use_fails_clearly() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = sidecar("run", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "cannot listen" in out.stderr


def test_missing_config_file_is_a_config_error() -> None:
    out = sidecar("check-config", "--config", "/nonexistent/sidecar.yaml")
    assert out.returncode == 2 and "/nonexistent/sidecar.yaml" in out.stderr


def test_python_dash_m_and_version_work() -> None:
    out = sidecar("--version")
    assert out.returncode == 0 and out.stdout.startswith("sidecar ")
