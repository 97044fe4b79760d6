"""sidecar: a reverse proxy beside your app that makes its shutdowns lossless."""

__version__ = "0.1.0"
