"""A pod termination replayed on an injected gRPC Deployment loses no call.

The Deployment is a real one: microservices-demo's ``cartservice`` (tests/manifests/public/,
a gRPC server on 7070 with ``grpc:`` readiness and liveness probes and a Service port named
``grpc``), injected by the real ``sidecar inject`` on the file as published. The pod is then
deleted the way the kubelet does it (tests/k8s_replay.py: the injected preStop, SIGTERMs in the
native-sidecar order, SIGKILL at the grace period, time scaled by K8S_REPLAY_SCALE) with a
grpcio app that dies on SIGTERM at once and grpc.aio clients over h2c (tests/grpc_load.py).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from tests.grpc_load import GrpcLoad, grpc_replay_app
from tests.injecting import PUBLIC, container, env, find, inject, injected_pod, template
from tests.k8s_replay import Replay, assert_lossless, losses, replay_termination

DEMO = PUBLIC / "microservices-demo.yaml"


def figures(replay: Replay) -> str:
    """Calls sent / answered OK / received by the app / lost, and how the others ended."""
    received = {rid for event, rid, _ in replay.app_log if event == "recv"}
    ok = {o.rid for o in replay.outcomes if o.kind == "ok"}
    kinds = collections.Counter(o.kind for o in replay.outcomes)
    unseen = collections.Counter(o.rid.rstrip("0123456789-") for o in replay.outcomes
                                 if o.kind != "ok" and o.rid not in received)
    return (f"calls sent {len(replay.outcomes)}, answered OK {len(ok)}, received by the app "
            f"{len(received)}, lost {len(received - ok)}; not OK and never reached the app: "
            f"{dict(unseen)}; outcomes {dict(kinds)}")


async def test_deleting_an_injected_grpc_pod_loses_no_call(tmp_path: Path) -> None:
    """cartservice, injected: readiness uses the app's gRPC health service (upstream.health_grpc,
    from its grpc: probe); on deletion every call the app received is answered OK exactly once,
    long calls run across the start of `closing`, the app is SIGTERMed only after the preStop
    /drain returned, and the sidecar exits 0 within the grace period."""
    docs, report = inject(str(DEMO))
    assert "upstream.health_grpc is '', what the app's grpc readinessProbe checks" in report
    side = container(template(find(docs, "Deployment", "cartservice"))["spec"], "drain-sidecar")
    assert env(side)["SIDECAR_UPSTREAM_HEALTH_GRPC"] == ""
    assert [p["name"] for p in side["ports"]] == ["grpc", "admin"]
    pod = injected_pod(docs, "cartservice")
    assert pod.native and pod.config["upstream"]["health_grpc"] == ""

    replay = await replay_termination(pod, tmp_path, app=grpc_replay_app, load=GrpcLoad)
    print(figures(replay))
    upstream = replay.ready_status["upstream"]
    assert upstream["health_grpc"] == "" and upstream["healthy"], replay.ready_status
    assert_lossless(replay)
    # Served while draining too: every steady and long call (steady clients leave once the pod
    # is out of the endpoints, before closing) is answered OK; only laggards that reconnect
    # after closing are refused, UNAVAILABLE, before reaching the app (gRPC retries those).
    failed = [o for o in replay.outcomes if o.kind != "ok"]
    assert all(o.rid.startswith("laggard") and o.kind == "unavailable" for o in failed), \
        [(o.rid, o.detail) for o in failed]
    assert json.loads(replay.hook["body"])["state"] == "drained"
    assert replay.app_sigterm is not None and replay.app_sigterm >= replay.hook["at"], \
        replay.timeline()
    assert replay.exit_codes["drain-sidecar"] == 0, replay.timeline()


async def test_the_replay_catches_an_injected_grpc_pod_without_its_prestop(
        tmp_path: Path) -> None:
    """Not a rubber stamp: the same injected pod with the app's preStop removed gets SIGTERM at
    once, before the drain, and loses calls it had received."""
    docs, _ = inject(str(DEMO))
    pod = injected_pod(docs, "cartservice")
    pod.app.pop("lifecycle")
    replay = await replay_termination(pod, tmp_path, app=grpc_replay_app, load=GrpcLoad)
    print(figures(replay))
    found = {p.split(":")[0] for p in losses(replay)}
    assert found >= {"lost", "early SIGTERM"}, "\n".join(losses(replay)) + replay.timeline()
