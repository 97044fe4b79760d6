"""`sidecar inject`: which port it fronts (the contract's "Which ports inject fronts"), how the
user chooses one (annotation, --port), and the names the ports get."""

from __future__ import annotations

from pathlib import Path

from tests.injecting import (
    MANIFESTS,
    container,
    env,
    find,
    inject,
    load_docs,
    sidecar,
    template,
    write,
)


def test_the_port_annotation_chooses_among_several_ports() -> None:
    """A two-container StatefulSet with three ports: sidecar.drain/port picks `query`; the other
    container and ports are untouched; tuning annotations reach the env."""
    docs, _ = inject(str(MANIFESTS / "statefulset-multi.yaml"))
    spec = template(find(docs, "StatefulSet", "search"))["spec"]
    engine, exporter = container(spec, "engine"), container(spec, "exporter")
    assert [p["name"] for p in engine["ports"]] == ["query-app", "transport"]
    assert exporter["ports"] == [{"name": "metrics", "containerPort": 9114}]
    # It serves traffic too, so it waits for the drain before its SIGTERM (issue 14 §3).
    assert exporter["lifecycle"] == {"preStop": {"httpGet": {"path": "/drain", "port": 9901}}}
    side = container(spec, "drain-sidecar")
    assert side["ports"][0]["name"] == "query"
    assert env(side)["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:9200"
    assert env(side)["SIDECAR_DRAIN_LINGER"] == "5s"
    assert env(side)["SIDECAR_LOGGING_ACCESS_LOG"] == "true"


def test_several_ports_without_the_annotation_is_an_error(tmp_path: Path) -> None:
    """Which port do clients use? Not guessed: exit 2 listing the ports and the annotation."""
    docs = load_docs(MANIFESTS / "statefulset-multi.yaml")
    del template(docs[0])["metadata"]["annotations"]["sidecar.drain/port"]
    done = sidecar("inject", str(write(tmp_path, docs)))
    assert done.returncode == 2 and done.stdout == ""
    assert ("statefulset/search: 3 TCP container ports (query 9200 in engine, transport 9300 in "
            "engine, metrics 9114 in exporter)") in done.stderr
    assert "sidecar.drain/port" in done.stderr
