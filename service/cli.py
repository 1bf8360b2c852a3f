"""The server's side of the `abstream` command: `serve` and `token` (clients/cli.py dispatches here)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from abstream.core.settings import Settings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="abstream")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server")
    Settings.add_arguments(serve)
    token = commands.add_parser("token", help="make a token: prints it once, and the entry for the tokens file")
    token.add_argument("name", help="who uses it (shows in logs, never the token)")
    token.add_argument("--scopes", default="ingest,query", help="comma-separated: ingest, query, admin")
    token.add_argument("--test-prefix", default="", help="only tests whose id starts with this")
    token.add_argument("--ingest-rate", type=float, default=0, help="events per second; 0: unlimited")
    args = parser.parse_args(argv)
    if args.command == "token":
        return _token(args)
    try:
        settings = Settings.from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return _serve(settings)


def _serve(settings) -> int:
    from abstream.core.errors import RecoveryError
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
