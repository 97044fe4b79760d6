"""Configuration: YAML file, ``SIDECAR_*`` environment and flags into frozen dataclasses.

``model`` holds the dataclasses, the schema and ``load``; ``sources`` reads the file and
the environment; ``values`` parses each leaf.  Everything a caller needs is re-exported here.
"""

from .model import (
    SCHEMA,
    Address,
    ClientConfig,
    Config,
    ConfigError,
    DrainConfig,
    ExitConfig,
    ExitHttp,
    LoggingConfig,
    UpstreamConfig,
    format_duration,
    load,
    to_yaml,
)

__all__ = (
    "SCHEMA",
    "Address",
    "ClientConfig",
    "Config",
    "ConfigError",
    "DrainConfig",
    "ExitConfig",
    "ExitHttp",
    "LoggingConfig",
    "UpstreamConfig",
    "format_duration",
    "load",
    "to_yaml",
)
