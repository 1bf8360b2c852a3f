"""The server's side of the `abstream` command: `serve`, `token`, `clickhouse init` and `migrate`
(clients/cli.py dispatches these here)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from abstream.core.settings import Settings

SERVE_EXAMPLES = """\
examples:
  abstream serve                                          # 127.0.0.1:50051, data in ./data
  abstream serve --addr 0.0.0.0:50051 --tokens-file tokens.toml --tls-cert server.pem --tls-key server.key
  abstream serve --data-dir '' --fsync interval           # memory only, for trying things
  abstream serve --engine clickhouse --clickhouse ch1:9000 --clickhouse-cluster prod"""


def _batch_rows(text: str) -> int:
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if not 1 <= rows <= 10_000_000:
        raise argparse.ArgumentTypeError(f"must be a whole number of events from 1 to 10,000,000, not {text!r}")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="abstream")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server", description="Serve gRPC until SIGTERM or SIGINT, "
                                "then stop gracefully. Every setting also reads its ABSTREAM_* variable.",
                                epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    Settings.add_arguments(serve)
    token = commands.add_parser("token", help="make a token: prints it once, and the entry for the tokens file")
    token.add_argument("name", help="who uses it (shows in logs, never the token)")
    token.add_argument("--scopes", default="ingest,query", help="comma-separated: ingest, query, admin")
    token.add_argument("--test-prefix", default="", help="only tests whose id starts with this")
    token.add_argument("--ingest-rate", type=float, default=0, help="events per second; 0: unlimited")
    clickhouse = commands.add_parser("clickhouse", help="the ClickHouse cluster engine")
    actions = clickhouse.add_subparsers(dest="action", required=True, metavar="ACTION")
    _cluster_arguments(actions.add_parser("init", help="create the schema on a cluster (ON CLUSTER)"))
    migrate = commands.add_parser("migrate", help="copy an embedded data directory into a ClickHouse cluster "
                                                  "(stop its server first; re-running resumes)")
    migrate.add_argument("--data-dir", required=True, help="the embedded engine's data directory")
    migrate.add_argument("--batch-rows", type=_batch_rows, default=100_000,
                         help="events per batch sent (default 100,000; a re-run may use another)")
    _cluster_arguments(migrate, "--to-clickhouse")
    args = parser.parse_args(argv)
    if args.command == "token":
        return _token(args)
    if args.command in ("clickhouse", "migrate"):
        return _on_cluster(args)
    try:
        settings = Settings.from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return _serve(settings)


def _cluster_arguments(p: argparse.ArgumentParser, flag: str = "--clickhouse") -> None:
    # Their variables only: the parser is built for every command, and another setting's variable
    # that does not parse is for `serve` to refuse, by name.
    hosts, cluster = os.environ.get("ABSTREAM_CLICKHOUSE", ""), os.environ.get("ABSTREAM_CLICKHOUSE_CLUSTER", "")
    database = os.environ.get("ABSTREAM_CLICKHOUSE_DATABASE", Settings.clickhouse_database)
    p.add_argument(flag, dest="clickhouse", default=hosts or None, required=not hosts,
                   help="host:port[,host:port...] of the cluster's servers (env ABSTREAM_CLICKHOUSE)")
    p.add_argument("--clickhouse-cluster", default=cluster or None, required=not cluster,
                   help="the cluster's name (env ABSTREAM_CLICKHOUSE_CLUSTER)")
    p.add_argument("--clickhouse-user", default=os.environ.get("ABSTREAM_CLICKHOUSE_USER", "default"),
                   help="the user to connect as (env ABSTREAM_CLICKHOUSE_USER, default 'default')")
    p.add_argument("--clickhouse-password", default=os.environ.get("ABSTREAM_CLICKHOUSE_PASSWORD", ""),
                   help="its password: better in ABSTREAM_CLICKHOUSE_PASSWORD (a flag shows in the process list)")
    p.add_argument("--clickhouse-database", default=database,
                   help=f"(env ABSTREAM_CLICKHOUSE_DATABASE, default {database!r})")


def _on_cluster(args) -> int:
    from abstream.clickhouse.backend import Cluster
    from abstream.clickhouse.engine import ClickHouseEngine
    from abstream.core.errors import AbstreamError

    try:
        # Schema changes ON CLUSTER wait for every server, silently: not the gateway's timeout.
        backend = Cluster(args.clickhouse.split(","), args.clickhouse_cluster, args.clickhouse_database, timeout=300,
                          user=args.clickhouse_user, password=args.clickhouse_password)
        engine = ClickHouseEngine(backend)
        try:
            if args.command == "clickhouse":
                engine.init_schema()
                print(f"schema {args.clickhouse_database} ready on cluster {args.clickhouse_cluster} "
                      f"({len(backend.shards)} shards)")
                return 0
            from abstream.clickhouse.migrate import migrate

            return migrate(args.data_dir, ClickHouseEngine.opened(backend), rows=args.batch_rows)
        finally:
            engine.close()
    except AbstreamError as error:
        print(f"abstream {args.command}: {error}", file=sys.stderr)
        return 1


def _serve(settings) -> int:
    from abstream.core.errors import AbstreamError, RecoveryError
    from abstream.core.logs import configure
    from abstream.service.server import BindError, ConfigError, serve

    configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (BindError, ConfigError) as error:
        print(f"abstream: {error}", file=sys.stderr)
        return 1
    except RecoveryError as error:
        print(f"abstream: refusing to start: {error}", file=sys.stderr)
        return 2
    except AbstreamError as error:
        print(f"abstream: cannot open the {settings.engine} engine: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a data directory that cannot be made or written, say
        where = error.filename or settings.data_dir
        print(f"abstream: cannot use {where}: {error.strerror or error} (--data-dir, ABSTREAM_DATA_DIR)",
              file=sys.stderr)
        return 1
    return 0


def _token(args) -> int:
    from abstream.core.auth import SCOPES, hash_token, new_token

    scopes = [x.strip() for x in args.scopes.split(",") if x.strip()]
    if not scopes or any(x not in SCOPES for x in scopes):
        print(f"abstream token: --scopes must be some of {', '.join(SCOPES)}", file=sys.stderr)
        return 2
    secret = new_token()
    print(f"# token for {args.name} (shown once; the server keeps only its hash):", file=sys.stderr)
    print(f"#   {secret}", file=sys.stderr)
    print("[[token]]")
    print(f"name = {json.dumps(args.name)}")
    print(f'sha256 = "{hash_token(secret)}"')
    print(f"scopes = {json.dumps(scopes)}")
    if args.test_prefix:
        print(f"test_prefix = {json.dumps(args.test_prefix)}")
    if args.ingest_rate:
        print(f"ingest_rate = {args.ingest_rate:g}")
    return 0
