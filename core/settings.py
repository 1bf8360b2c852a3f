"""One settings object, from command-line flags over ABSTREAM_* environment variables over defaults."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields


def _s(default, help: str, choices: tuple = (), serve_default=None):
    """A setting: its default, what it does (for --help), its allowed values, if limited, and, if
    `abstream serve` defaults to something else than a Settings() made in code, that."""
    return field(default=default, metadata={"help": help, "choices": choices, "serve_default": serve_default})


@dataclass(frozen=True)
class Settings:
    """How the server runs. Defaults work on a laptop: loopback only, data under ./data."""

    addr: str = _s("127.0.0.1:50051", "where gRPC listens (host:port; port 0 picks a free one)")
    data_dir: str = _s("./data", "the embedded engine's log and snapshots; '' keeps nothing (memory only)")
    max_message_bytes: int = _s(16 * 1024 * 1024, "largest request taken (100,000 typical events are ~8 MB as "
                                                  "messages, ~3 MB columnar); gRPC holds each whole while receiving it")
    grace_seconds: float = _s(10.0, "on SIGTERM, how long open ingest streams get to finish")
    quarantine_limit: int = _s(100_000, "rejected events kept for ListQuarantine (the newest, shared fairly among "
                                        "the test prefixes tokens are limited to)")
    log_level: str = _s("INFO", "log level: DEBUG, INFO, WARNING or ERROR")
    fsync: str = _s("always", "always: every ack waits for an fsync of its log record; interval: a thread fsyncs "
                              "every --fsync-interval-ms (a power loss may lose that much)", ("always", "interval"))
    fsync_interval_ms: int = _s(50, "with --fsync interval, how often")
    snapshot_every_events: int = _s(1_000_000, "write a snapshot after this many events, stored or rejected (0: "
                                               "never by count)")
    snapshot_log_ratio: float = _s(0.5, "by count or time, also wait until the events since the last snapshot are "
                                        "this share of the events it holds (a snapshot writes them all); 0: every "
                                        "--snapshot-every-events or --snapshot-every-seconds")
    snapshot_every_seconds: float = _s(300.0, "write a snapshot after this long, with the events since as "
                                              "--snapshot-log-ratio says (0: never by time)")
    snapshot_compression: str = _s("none", "snapshot files' compression (none: restarts memory-map them)",
                                   ("none", "lz4", "zstd"))
    snapshots_kept: int = _s(2, "snapshots kept (the log is kept back to the oldest)")
    tokens_file: str = _s("", "TOML file of hashed tokens with scopes (abstream token makes entries); "
                              "empty: no authentication, loopback only")
    insecure: bool = _s(False, "listen on a non-loopback address without tokens (anyone reaching it may do anything)")
    reflection: bool = _s(True, "gRPC server reflection (for grpcurl and buf curl)")
    tls_cert: str = _s("", "PEM certificate: with --tls-key, serve TLS")
    tls_key: str = _s("", "PEM private key of --tls-cert")
    tls_client_ca: str = _s("", "PEM CA: require client certificates it signed (mutual TLS)")
    max_batch_events: int = _s(100_000, "most events one batch may hold (more: INVALID_ARGUMENT)")
    max_ingest_streams: int = _s(64, "most IngestEvents streams open at once")
    memory_high_water_bytes: int = _s(-1, "refuse ingest (RESOURCE_EXHAUSTED) above this resident size; -1: 80%% of "
                                          "the memory the process may use (its cgroup's limit or the RAM); 0: off")
    max_ingest_bytes: int = _s(256 << 20, "ingest in flight, as charged from a request's arrival to its ack "
                                          "(docs/operations.md: what a request may cost)")
    max_query_seconds: float = _s(60.0, "longest a query runs, for callers that give no deadline (HTTP, the "
                                        "results page, gRPC calls without one) or a longer one; 0: no limit")
    max_queries: int = _s(64, "queries running or waiting for a query thread at once, over every transport; past it "
                              "RESOURCE_EXHAUSTED (HTTP 429) with a retry delay")
    metrics_addr: str = _s("", "host:port for Prometheus metrics at /metrics; empty: off")
    http_addr: str = _s("", "where the HTTP API listens (the tutorial's platform's API: docs/http.md); empty: off",
                        serve_default="127.0.0.1:7181")
    http_max_body_bytes: int = _s(16 << 20, "largest HTTP request body taken whole (an Events API request), "
                                            "compressed or not")
    http_cors_origins: str = _s("*", "web pages (origins, comma-separated, e.g. https://dash.example.com) whose "
                                     "scripts may call the HTTP API with a token, as the tutorial's platform lets "
                                     "any; '*': any page with a token (without a tokens file, none but those "
                                     "listed); empty: none")
    http_max_upload_bytes: int = _s(4 << 30, "largest file a Data Sources API append streams in, compressed or not")
    http_body_idle_seconds: float = _s(30.0, "an HTTP request body that sends nothing for this long is answered 408 "
                                             "(batches stored before it stay stored): a body being read holds one "
                                             "of --max-ingest-streams readers; 0: no limit")
    retention_days: float = _s(0.0, "keep events this many days (fractions allowed; per test: SetRetention); 0: for "
                                    "ever. Older ones stop being visible at once and are removed by a sweep")
    retention_sweep_seconds: float = _s(60.0, "how often events past their retention (and quarantined events "
                                              "received before it) are removed")
    import_endpoints: str = _s("", "S3 endpoints (http[s]://host[:port], comma-separated) an ImportEvents request "
                                   "may name besides the server's own AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; "
                                   "empty: only that one")
    import_root: str = _s("", "the server directory under which ImportEvents (abstream import) may read local "
                              "files; empty: only s3:// imports")
    kafka_bootstrap: str = _s("", "HOST:PORT[,...] of Kafka brokers to consume events from (README: Kafka)")
    kafka_topic: str = _s("", "the topic(s) to consume, comma-separated; each message a JSON event or NDJSON")
    kafka_group: str = _s("", "the Kafka consumer group (default abstream): processes in one group share the "
                              "partitions")
    kafka_session_timeout_ms: int = _s(10_000, "the consumer group's session timeout")
    kafka_config: str = _s("", "a TOML file whose [kafka] section has bootstrap, topics, group and [kafka.client] "
                               "librdkafka properties (security, SASL, ...)")
    log_format: str = _s("json", "json lines, or text for people", ("json", "text"))
    engine: str = _s("embedded", "embedded: this process and its data directory; clickhouse: a stateless gateway "
                                 "over a ClickHouse cluster (docs/scale.md)", ("embedded", "clickhouse"))
    clickhouse: str = _s("", "host:port[,host:port...] of some of the cluster's servers (native protocol)")
    clickhouse_cluster: str = _s("", "the cluster's name in their remote_servers")
    clickhouse_database: str = _s("ab", "the database `abstream clickhouse init` created")
    clickhouse_insert_quorum: int = _s(2, "replicas of each shard a batch is on before its ack (the same on every "
                                          "gateway)")
    clickhouse_user: str = _s("default", "the ClickHouse user the gateway connects as")
    clickhouse_password: str = field(default="", repr=False, metadata={
        "help": "its password: better in ABSTREAM_CLICKHOUSE_PASSWORD (a flag shows in the process list)",
        "choices": (), "serve_default": None})
    clickhouse_timeout_seconds: float = _s(30.0, "the longest a ClickHouse server may stay silent before the next "
                                                 "replica is tried (a hung server still accepts connections)")

    def __post_init__(self) -> None:
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {', '.join(allowed)}, not {getattr(self, f.name)!r}")
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # nan or inf: no duration, share or count
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
        for name in _POSITIVE + _NOT_NEGATIVE:
            value = getattr(self, name)
            if value < 0 or (value == 0 and name in _POSITIVE):
                raise ValueError(f"--{name.replace('_', '-')} must be {'more than' if name in _POSITIVE else 'at least'} "
                                 f"0, not {value}")
        if self.memory_high_water_bytes < -1:
            raise ValueError(f"--memory-high-water-bytes must be -1 (the default share), 0 (off) or a size, not "
                             f"{self.memory_high_water_bytes}")
        if self.engine == "clickhouse" and not (self.clickhouse and self.clickhouse_cluster):
            raise ValueError("--engine clickhouse needs --clickhouse HOST:PORT[,...] and --clickhouse-cluster NAME")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get("ABSTREAM_" + f.name.upper())
            if raw is not None:
                try:
                    values[f.name] = _parse(f.default, raw)
                except ValueError:
                    kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(type(f.default), "text")
                    raise ValueError(f"ABSTREAM_{f.name.upper()}={raw[:64]!r} is not {kind}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Flags for every setting; each defaults to its ABSTREAM_* variable, then to the default."""
        for f in fields(cls):
            default = f.default if f.metadata["serve_default"] is None else f.metadata["serve_default"]
            flag = "--" + f.name.replace("_", "-")
            help = f"{f.metadata['help']} (env ABSTREAM_{f.name.upper()}, default {default!r})"
            if isinstance(default, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            else:
                parser.add_argument(flag, type=type(default), default=None, help=help,
                                    choices=f.metadata["choices"] or None)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
        """What `abstream serve` runs with: its flags, else their variables, else its defaults."""
        environ = os.environ if environ is None else environ
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        for f in fields(cls):
            if f.metadata["serve_default"] is not None and values[f.name] is None \
                    and "ABSTREAM_" + f.name.upper() not in environ:
                values[f.name] = f.metadata["serve_default"]
        return cls.from_env(environ, **values)


#: Settings a value of 0 or less would leave the server refusing everything or misbehaving.
_POSITIVE = ("max_message_bytes", "max_batch_events", "max_ingest_streams", "max_ingest_bytes", "max_queries",
             "http_max_body_bytes", "http_max_upload_bytes", "fsync_interval_ms", "snapshots_kept", "retention_sweep_seconds",
             "kafka_session_timeout_ms", "clickhouse_insert_quorum",
             "clickhouse_timeout_seconds")
#: Settings where 0 means none (or never) and less means nothing.
_NOT_NEGATIVE = ("grace_seconds", "quarantine_limit", "snapshot_every_events", "snapshot_log_ratio",
                 "snapshot_every_seconds", "http_body_idle_seconds", "retention_days", "max_query_seconds")


def _parse(default, raw: str):
    if isinstance(default, bool):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return type(default)(raw)
