"""The pod-termination replay's promises: deleting a pod built from the rendered manifests
loses no admitted request, and the replay catches a manifest edited into a lossy shape.
The harness (the pod as rendered, the kubelet, the load) is tests/k8s_replay.py."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_replay import (
    PodSpec,
    app_container,
    assert_lossless,
    losses,
    replay_termination,
    sidecar_container,
)
from tests.kustomize import KUBECTL, render

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


# ---- the promises -----------------------------------------------------------------------------

async def test_deleting_a_classic_pod_loses_no_admitted_request(tmp_path: Path) -> None:
    """deploy/base: on pod deletion the kubelet sends the sidecar SIGTERM and runs the app's
    preStop GET /drain at once; every request the app received is answered 2xx, and the app is
    signalled only after the sidecar drained; nothing is SIGKILLed."""
    replay = await replay_termination(PodSpec.from_objects(render("base")), tmp_path)
    assert_lossless(replay)
    assert replay.hook["status"] == 200 and json.loads(replay.hook["body"])["state"] == "drained"
    assert replay.app_sigterm is not None and replay.app_sigterm >= replay.hook["at"]
    assert replay.exit_codes["sidecar"] == 0, replay.timeline()


async def test_deleting_a_native_sidecar_pod_loses_no_admitted_request(tmp_path: Path) -> None:
    """overlays/native-sidecar: the sidecar gets SIGTERM only after the app exited, so the
    app's preStop is what drains it; still nothing admitted is lost."""
    pod = PodSpec.from_objects(render("overlays/native-sidecar"))
    assert pod.native
    replay = await replay_termination(pod, tmp_path)
    assert_lossless(replay)
    assert json.loads(replay.hook["body"])["state"] == "drained"
    assert replay.app_sigterm is not None and replay.app_sigterm >= replay.hook["at"]
    assert replay.exit_codes["sidecar"] == 0, replay.timeline()


async def test_deleting_a_shared_pid_pod_lets_the_sidecar_stop_the_app_after_the_drain(
        tmp_path: Path) -> None:
    """overlays/shared-pid: the sidecar itself signals the app (exit.process) once in-flight
    requests are done, before answering the preStop. The regex is pointed at this test's app
    (tests/test_k8s_manifests.py checks the manifest's regex against the manifest's command)."""
    pod = PodSpec.from_objects(render("overlays/shared-pid"))
    tag = uuid.uuid4().hex
    pod.config["exit"]["process"] = re.escape(f"--tag {tag}")
    replay = await replay_termination(pod, tmp_path, tag=tag)
    assert_lossless(replay)
    assert replay.app_sigterm is not None and replay.app_sigterm < replay.hook["at"], \
        "the sidecar, not the kubelet, should have signalled the app\n" + replay.timeline()
    assert json.loads(replay.hook["body"])["exit"]["outcome"] == "exited", replay.hook


async def test_admin_token_pattern_keeps_the_drain_lossless(tmp_path: Path) -> None:
    """The documented token pattern: SIDECAR_ADMIN_TOKEN in the sidecar's env and the same
    bearer token in the app's preStop httpHeaders still drains before the app's SIGTERM."""
    objs = render("base")
    sidecar_container(objs).setdefault("env", []).append(
        {"name": "SIDECAR_ADMIN_TOKEN", "value": "s3cr3t"})
    app_container(objs)["lifecycle"]["preStop"]["httpGet"]["httpHeaders"] = [
        {"name": "Authorization", "value": "Bearer s3cr3t"}]
    replay = await replay_termination(PodSpec.from_objects(objs), tmp_path)
    assert_lossless(replay)
    assert replay.hook["status"] == 200


def _no_prestop(objs: list[dict[str, Any]]) -> None:
    app_container(objs).pop("lifecycle", None)


def _short_grace(objs: list[dict[str, Any]]) -> None:
    pod = PodSpec.from_objects(objs)
    short = pod.drain_seconds("delay") + pod.drain_seconds("timeout") / 2
    pod.spec["terminationGracePeriodSeconds"] = int(short)


def _token_without_header(objs: list[dict[str, Any]]) -> None:
    sidecar_container(objs).setdefault("env", []).append(
        {"name": "SIDECAR_ADMIN_TOKEN", "value": "s3cr3t"})


LOSSY = {
    "base, app preStop removed": ("base", _no_prestop, ("lost", "early SIGTERM")),
    "native sidecar, app preStop removed": ("overlays/native-sidecar", _no_prestop,
                                            ("lost", "early SIGTERM")),
    "grace period shorter than drain.delay + drain.timeout": ("base", _short_grace,
                                                              ("SIGKILL", "lost")),
    "admin token set, preStop without the header": ("base", _token_without_header,
                                                    ("lost", "early SIGTERM")),
}


@pytest.mark.parametrize("case", list(LOSSY))
async def test_replay_catches_a_lossy_manifest(case: str, tmp_path: Path) -> None:
    """The replay is not a rubber stamp: the same load against a manifest edited into a lossy
    shape reports lost requests, an early SIGTERM or a SIGKILL."""
    path, mutate, expected = LOSSY[case]
    objs = render(path)
    mutate(objs)
    replay = await replay_termination(PodSpec.from_objects(objs), tmp_path)
    problems = losses(replay)
    found = {p.split(":")[0] for p in problems}
    assert found >= set(expected), (f"{case}: expected {expected}, found {sorted(found)}\n"
                                    + "\n".join(problems) + "\n" + replay.timeline())


