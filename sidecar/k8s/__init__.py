"""``sidecar inject`` / ``uninject``: Kubernetes manifests in and out, the injected pod's
config and its ports.  Depends on ``sidecar.config`` only."""
