"""Rendering the deploy/ manifests for the Kubernetes tests, as `kubectl kustomize` does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config.values import parse_duration as seconds

__all__ = ("DEPLOY", "KUBECTL", "needs_kubectl", "render", "seconds")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def render(path: str) -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/<path>``: the objects as they would be applied."""
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]
