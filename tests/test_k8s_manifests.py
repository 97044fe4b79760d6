"""The Kubernetes wiring, read from the *rendered* manifests (``kubectl kustomize``).

These are the static promises of deploy/: the numbers in the pod spec and in the sidecar's
config agree, the drain is triggered before the app is signalled, the Service reaches the
sidecar rather than the app, the admin port is fenced off, the alerts and the dashboard
speak the contract's metric names. tests/test_k8s_replay.py then replays a pod termination
against real processes. .ci/validate-deploy.sh runs the external linters.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.metrics import BUDGET_KEYS
from tests.kustomize import DEPLOY, KUBECTL, needs_kubectl, render, seconds

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ["base", "overlays/native-sidecar", "overlays/shared-pid"]
CONTRACT_METRICS = {
    "sidecar_requests_in_flight", "sidecar_requests_total", "sidecar_request_duration_seconds",
    "sidecar_requests_rejected_total", "sidecar_requests_aborted_total",
    "sidecar_upstream_errors_total", "sidecar_connections_open", "sidecar_websockets_open",
    "sidecar_drain_state", "sidecar_drain_started_timestamp_seconds",
    "sidecar_drain_duration_seconds", "sidecar_upstream_up",
}
# The configured budget (sidecar.metrics.BUDGET_KEYS), which rules and dashboard compare with.
BUDGET_METRICS = {f"sidecar_{key.replace('.', '_')}_seconds" for key in BUDGET_KEYS}
EXPORTED_METRICS = CONTRACT_METRICS | BUDGET_METRICS


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


class Pod:
    """The rendered Deployment's pod template, with the sidecar's config resolved."""

    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.objs = objs
        self.deployment = one(objs, "Deployment")
        self.spec = self.deployment["spec"]["template"]["spec"]
        maps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        candidates = self.spec["containers"] + self.spec.get("initContainers", [])
        self.sidecar: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        for container in candidates:
            for mount in container.get("volumeMounts", []):
                cm = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
                if cm in maps and "sidecar.yaml" in maps[cm].get("data", {}):
                    self.sidecar = container
                    self.config_text = maps[cm]["data"]["sidecar.yaml"]
                    self.config = yaml.safe_load(self.config_text)
        assert self.sidecar, "no container mounts a ConfigMap holding sidecar.yaml"
        self.apps = [c for c in self.spec["containers"] if c is not self.sidecar]
        assert len(self.apps) == 1, "expected exactly one app container beside the sidecar"
        self.app = self.apps[0]

    def port_of(self, key: str) -> int:
        return int(str(self.config[key]).rpartition(":")[2])

    def sidecar_port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int) or str(name_or_number).isdigit():
            return int(name_or_number)
        ports = {p["name"]: p["containerPort"]
                 for p in self.sidecar.get("ports", []) if "name" in p}
        assert name_or_number in ports, f"the sidecar container has no port named {name_or_number}"
        return int(ports[name_or_number])

    @property
    def grace(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))


@pytest.fixture(scope="module", params=WORKLOADS)
def pod(request: pytest.FixtureRequest) -> Pod:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return Pod(render(request.param))


@needs_kubectl
def test_app_prestop_drains_the_sidecar_before_the_app_is_signalled(pod: Pod) -> None:
    """The kubelet sends the app SIGTERM only when its preStop returns: that hook must be a
    GET of the sidecar's /drain on the admin port, which answers once drained."""
    hook = pod.app.get("lifecycle", {}).get("preStop", {}).get("httpGet")
    assert hook, "the app container needs a preStop httpGet of the sidecar's /drain"
    assert hook["path"].split("?")[0] == "/drain"
    assert "wait=false" not in hook["path"], "the hook must wait for the drain to finish"
    assert "host" not in hook, "the hook must target the pod IP, where the admin port listens"
    port = hook["port"]
    if isinstance(port, str) and not port.isdigit():
        # The kubelet resolves a named hook port among the *app* container's own ports.
        names = {p.get("name"): p["containerPort"] for p in pod.app.get("ports", [])}
        assert port in names, f"named port {port!r} is not a port of the app container"
        port = names[port]
    assert int(port) == pod.port_of("admin")
    assert int(port) == pod.sidecar_port("admin")
    headers = {h["name"]: h["value"] for h in hook.get("httpHeaders", [])}
    if pod.config.get("admin_token"):
        assert headers.get("Authorization", "").startswith("Bearer ")


@needs_kubectl
def test_grace_period_covers_the_whole_drain(pod: Pod) -> None:
    """terminationGracePeriodSeconds equals drain.grace_period, and the drain (delay, timeout,
    exit wait) fits in it, so the kubelet never SIGKILLs a pod mid-drain."""
    drain, exit_ = pod.config["drain"], pod.config["exit"]
    assert pod.grace == seconds(drain["grace_period"])
    budget = seconds(drain["delay"]) + seconds(drain["timeout"]) + seconds(exit_["wait"])
    assert budget <= pod.grace
    # A request admitted at the end of the delay can finish before the deadline.
    assert seconds(pod.config["upstream"]["timeout"]) <= seconds(drain["timeout"])


@needs_kubectl
def test_sidecar_config_in_the_configmap_is_valid(pod: Pod, tmp_path: Path) -> None:
    """The ConfigMap's sidecar.yaml passes ``sidecar check-config`` as the container runs it."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(pod.config_text)
    env = {"PATH": "/usr/bin:/bin"}
    env.update({e["name"]: e["value"] for e in pod.sidecar.get("env", []) if "value" in e})
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "--config", str(path)],
        check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_kubectl
def test_service_sends_clients_to_the_sidecar_listener(pod: Pod) -> None:
    """The Service's targetPort is the sidecar's listen port, never the app's."""
    service = one(pod.objs, "Service")
    listen = pod.port_of("listen")
    for port in service["spec"]["ports"]:
        assert pod.sidecar_port(port["targetPort"]) == listen
    assert str(pod.config["upstream"]["url"]).startswith("http://127.0.0.1:"), \
        "the app should be reachable on the pod's loopback only"
    assert not pod.app.get("ports"), "the app container should expose no port of its own"


@needs_kubectl
def test_probes_use_the_admin_endpoints(pod: Pod) -> None:
    """Readiness is /readyz (503 once draining), liveness /healthz, both on the admin port."""
    admin = pod.port_of("admin")
    ready, live = pod.sidecar["readinessProbe"]["httpGet"], pod.sidecar["livenessProbe"]["httpGet"]
    assert (ready["path"], pod.sidecar_port(ready["port"])) == ("/readyz", admin)
    assert (live["path"], pod.sidecar_port(live["port"])) == ("/healthz", admin)


@needs_kubectl
def test_pod_runs_locked_down_without_service_links(pod: Pod) -> None:
    """Non-root, read-only root fs, no privilege escalation, no capabilities, RuntimeDefault
    seccomp, resources set; and no service links (they would inject SIDECAR_* variables)."""
    assert pod.spec["enableServiceLinks"] is False
    assert pod.spec["securityContext"]["runAsNonRoot"] is True
    assert pod.spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in (pod.app, pod.sidecar):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["runAsNonRoot"] is True
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind])


@needs_kubectl
def test_admin_port_is_reachable_only_from_monitoring(pod: Pod) -> None:
    """The NetworkPolicy opens the proxy port to all, the admin port only to the monitoring
    namespace (Prometheus)."""
    policy = one(pod.objs, "NetworkPolicy")
    labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    admin, listen = pod.port_of("admin"), pod.port_of("listen")
    for rule in policy["spec"]["ingress"]:
        ports = {pod.sidecar_port(p["port"]) for p in rule["ports"]}
        if admin in ports:
            assert rule.get("from"), "the admin port must not be open to every source"
            for peer in rule["from"]:
                assert peer == {"namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        else:
            assert ports == {listen}


@needs_kubectl
def test_native_sidecar_overlay_runs_the_sidecar_as_a_restartable_init_container() -> None:
    """native-sidecar: the sidecar is an init container with restartPolicy Always (started
    first, stopped last) and the app keeps the preStop that triggers the drain."""
    pod = Pod(render("overlays/native-sidecar"))
    assert pod.sidecar in pod.spec["initContainers"]
    assert pod.sidecar["restartPolicy"] == "Always"
    assert all(c["name"] != pod.sidecar["name"] for c in pod.spec["containers"])
    assert pod.app["lifecycle"]["preStop"]["httpGet"]["path"] == "/drain"
    # Everything but the placement matches the base's sidecar container.
    base = Pod(render("base")).sidecar
    moved = {k: v for k, v in pod.sidecar.items() if k not in ("restartPolicy", "startupProbe")}
    assert moved == base


@needs_kubectl
def test_shared_pid_overlay_lets_the_sidecar_find_and_signal_the_app() -> None:
    """shared-pid: one process namespace, exit.process matches the app's command line (as
    /proc/PID/cmdline joined by spaces) and not the sidecar's, both run as the same UID."""
    pod = Pod(render("overlays/shared-pid"))
    assert pod.spec["shareProcessNamespace"] is True
    pattern = re.compile(pod.config["exit"]["process"])
    app_cmdline = " ".join(pod.app.get("command", []) + pod.app.get("args", []))
    assert pattern.search(app_cmdline), f"{pattern.pattern!r} does not match {app_cmdline!r}"
    sidecar_cmdline = " ".join(["/usr/local/bin/python", "/usr/local/bin/sidecar", "run",
                                *pod.sidecar.get("args", [])])
    assert not pattern.search(sidecar_cmdline)
    assert pod.spec["securityContext"]["runAsUser"] == 10001
    for container in (pod.app, pod.sidecar):
        assert "runAsUser" not in container["securityContext"]
    # Apart from `exit`, the same config as the base.
    base = Pod(render("base")).config
    assert {k: v for k, v in pod.config.items() if k != "exit"} == \
        {k: v for k, v in base.items() if k != "exit"}
    assert pod.app["lifecycle"]["preStop"] == Pod(render("base")).app["lifecycle"]["preStop"]


# ---- monitoring --------------------------------------------------------------------------------

RULES = DEPLOY / "monitoring" / "rules" / "sidecar.rules.yaml"
DASHBOARD = DEPLOY / "monitoring" / "dashboards" / "drain-sidecar.json"


def metric_names(expr: str) -> set[str]:
    return {m.removesuffix("_bucket") for m in re.findall(r"\bsidecar_[a-z_]+", expr)}


@needs_kubectl
def test_prometheusrule_carries_the_promtool_tested_rules_file() -> None:
    """The PrometheusRule object holds exactly the groups of the rules file promtool tests."""
    rule = one(render("monitoring"), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_alerts_cover_aborts_slow_drains_and_a_down_upstream() -> None:
    """Three alerts, on the metrics the sidecar exports; the slow-drain threshold is 80% of each
    pod's own exported grace period, with no grace period written into the rule."""
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert set(rules) == {"SidecarDrainAbortedRequests", "SidecarDrainNearGracePeriod",
                          "SidecarUpstreamDown"}
    assert "sidecar_requests_aborted_total" in rules["SidecarDrainAbortedRequests"]["expr"]
    assert "sidecar_upstream_up" in rules["SidecarUpstreamDown"]["expr"]
    slow = rules["SidecarDrainNearGracePeriod"]["expr"]
    assert "sidecar_drain_duration_seconds" in slow
    assert re.search(r">\s*0\.8\s*\*\s*max by \(namespace, pod\) \(max_over_time\("
                     r"sidecar_drain_grace_period_seconds\[", slow), slow
    numbers = set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", slow))
    assert numbers == {"0.8"}, f"hard-coded numbers besides the 80% in {slow!r}"
    for rule in rules.values():
        assert metric_names(rule["expr"]) <= EXPORTED_METRICS


@needs_kubectl
def test_podmonitor_scrapes_admin_metrics_often_enough_to_see_a_drains_end() -> None:
    """The PodMonitor scrapes /metrics on the pods' admin port at least once per drain.linger,
    so the final counters of a drained pod are collected before it exits."""
    monitor = one(render("monitoring"), "PodMonitor")
    pod = Pod(render("base"))
    labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert pod.sidecar_port(endpoint["port"]) == pod.port_of("admin")
    assert seconds(endpoint["interval"]) <= seconds(pod.config["drain"]["linger"])


def test_dashboard_shows_traffic_and_drains_with_contract_metrics() -> None:
    """The Grafana dashboard has a panel for in-flight, rate by code, rejected, aborted, drain
    state and drain duration (against each pod's own grace period, no fixed seconds), and
    queries only metrics the sidecar exports, every one filtered by namespace, workload, pod."""
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    queried: dict[str, set[str]] = {}
    exprs = [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    for panel in panels:
        assert panel.get("description"), f"panel {panel['title']!r} needs a description"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            queried.setdefault(panel["title"], set()).update(metric_names(target["expr"]))
            exprs.append(target["expr"])
    everything = set().union(*queried.values())
    assert everything <= EXPORTED_METRICS
    assert {"sidecar_requests_in_flight", "sidecar_requests_total",
            "sidecar_requests_rejected_total", "sidecar_requests_aborted_total",
            "sidecar_drain_state", "sidecar_drain_duration_seconds",
            "sidecar_drain_grace_period_seconds"} <= everything
    assert 'by (code)' in " ".join(t["expr"] for p in panels for t in p["targets"]
                                   if "sidecar_requests_total" in t["expr"])
    variables = [v["name"] for v in board["templating"]["list"]]
    assert variables == ["datasource", "namespace", "workload", "pod"]
    for expr in exprs:
        for selector in re.findall(r"sidecar_[a-z_]+\{([^}]*)\}", expr):
            for var in ("namespace", "workload", "pod"):
                assert f'{var}=~"${var}"' in selector, f"{var} filter missing in {expr!r}"
    # Thresholds are shares of the grace period (the alert's 80%), not seconds of one workload.
    (duration,) = [p for p in panels if "sidecar_drain_duration_seconds" in queried[p["title"]]]
    defaults = duration["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit" and defaults["max"] == 1
    steps = [s["value"] for s in defaults["thresholds"]["steps"]]
    assert steps[0] is None and 0.8 in steps and all(v <= 1 for v in steps[1:])


@needs_kubectl
def test_podmonitor_labels_series_with_their_workload() -> None:
    """The PodMonitor adds the `workload` label the dashboard filters by: the controller's name,
    the ReplicaSet hash of a Deployment's pods cut off."""
    monitor = one(render("monitoring"), "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    relabel = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "workload"]
    assert relabel
    controller = ["__meta_kubernetes_pod_controller_kind", "__meta_kubernetes_pod_controller_name"]

    def workload(kind: str, name: str) -> str | None:
        value = None  # relabeling as Prometheus does it: anchored regex, last match wins
        for r in relabel:
            assert r["sourceLabels"] == controller
            m = re.fullmatch(r["regex"], f"{kind};{name}")
            if m:
                value = m.expand(r["replacement"].replace("$", "\\"))
        return value

    assert workload("ReplicaSet", "demo-7c9d8b6f5") == "demo"
    assert workload("ReplicaSet", "shop-api-5d4f9bq2x") == "shop-api"
    assert workload("StatefulSet", "db") == "db"
    assert workload("DaemonSet", "node-agent") == "node-agent"


@needs_kubectl
def test_dashboard_ships_as_a_configmap_for_the_grafana_sidecar() -> None:
    """The dashboard ConfigMap is labelled grafana_dashboard=1 and holds the JSON file."""
    maps = [o for o in render("monitoring") if o["kind"] == "ConfigMap"]
    (cm,) = maps
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["drain-sidecar.json"]) == json.loads(DASHBOARD.read_text())


# ---- the image ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_runs_sidecar_run_as_non_root_with_the_default_config() -> None:
    """The runtime stage: ENTRYPOINT ["sidecar", "run"], STOPSIGNAL SIGTERM, a numeric non-root
    USER, ports 8080 and 9901, SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml copied from
    config/sidecar.yaml, no bytecode written at run time, the uvloop extra installed."""
    instructions = dockerfile_instructions()
    froms = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    runtime = instructions[froms[-1]:]
    base_image = runtime[0][1].replace("${PYTHON_VERSION}", "3.11")
    assert re.match(r"python:\S*3\.1[12]\S*-slim", base_image)
    last = {word: rest for word, rest in runtime}
    assert json.loads(last["ENTRYPOINT"]) == ["sidecar", "run"]
    assert last["STOPSIGNAL"] == "SIGTERM"
    uid = last["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert set(last["EXPOSE"].split()) == {"8080", "9901"}
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert ["config/sidecar.yaml", "/etc/sidecar/sidecar.yaml"] in [c.split()[-2:] for c in copies]
    build = " ".join(rest for word, rest in instructions[:froms[-1]] if word == "RUN")
    assert '".[uvloop]"' in build, "the wheels must include the uvloop extra"
    # The allow-list .dockerignore lets in what the Dockerfile copies.
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "sidecar/", "config/sidecar.yaml"):
        assert f"!{needed}" in ignore
