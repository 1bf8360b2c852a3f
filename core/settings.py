"""One settings object, from command-line flags over ABSTREAM_* environment variables over defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    """How the server runs. Defaults work on a laptop: loopback only, data under ./data."""

    addr: str = "127.0.0.1:50051"
    data_dir: str = "./data"
    # The largest request taken (gRPC holds each whole while receiving it): 100,000 typical events
    # are ~8 MB as messages, ~3 MB columnar.
    max_message_bytes: int = 16 * 1024 * 1024
    grace_seconds: float = 10.0
    quarantine_limit: int = 100_000
    log_level: str = "INFO"
    fsync: str = "always"
    fsync_interval_ms: int = 50
    snapshot_every_events: int = 1_000_000
    snapshot_every_seconds: float = 300.0
    snapshot_compression: str = "none"
    snapshots_kept: int = 2
    tokens_file: str = ""  # TOML file of hashed tokens with scopes; empty: no authentication
    insecure: bool = False  # allow a non-loopback address without tokens
    reflection: bool = True
    tls_cert: str = ""  # PEM files; a certificate and key turn TLS on
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM: require client certificates signed by it (mutual TLS)
    max_batch_events: int = 100_000
    max_ingest_streams: int = 64
    # Refuse ingest (RESOURCE_EXHAUSTED) above this resident size; -1: 80% of the memory the process
    # may use (its cgroup's limit or the machine's RAM); 0: off.
    memory_high_water_bytes: int = -1
    max_ingest_bytes: int = 256 << 20  # ingest requests in flight, as charged until their ack (service/admission.py)
    metrics_addr: str = ""  # host:port for Prometheus metrics over HTTP; empty: off
    log_format: str = "json"
    engine: str = "embedded"  # or "clickhouse": stateless gateways over a ClickHouse cluster
    clickhouse: str = ""  # host:port[,host:port...] of the cluster's servers (native protocol)
    clickhouse_cluster: str = ""  # the cluster's name in their remote_servers
    clickhouse_database: str = "ab"
    clickhouse_insert_quorum: int = 2  # replicas of each shard a batch is on before its ack

    def __post_init__(self) -> None:
        choices = {"fsync": ("always", "interval"), "snapshot_compression": ("none", "lz4", "zstd"),
                   "log_format": ("json", "text"), "engine": ("embedded", "clickhouse")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.engine == "clickhouse" and not (self.clickhouse and self.clickhouse_cluster):
            raise ValueError("--engine clickhouse needs --clickhouse HOST:PORT[,...] and --clickhouse-cluster NAME")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get("ABSTREAM_" + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(getattr(cls, f.name), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Flags for every setting; each defaults to its ABSTREAM_* variable, then to the default."""
        for f in fields(cls):
            default = getattr(cls, f.name)
            flag = "--" + f.name.replace("_", "-")
            help = f"(env ABSTREAM_{f.name.upper()}, default {default!r})"
            if isinstance(default, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            else:
                parser.add_argument(flag, type=type(default), default=None, help=help)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls.from_env(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _parse(default, raw: str):
    if isinstance(default, bool):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return type(default)(raw)
