"""The `abstream` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

EXAMPLES = """\
examples:
  abstream serve                                  # 127.0.0.1:50051, data in ./data
  abstream serve --addr 127.0.0.1:6000 --data-dir /var/lib/abstream
  ABSTREAM_ADDR=127.0.0.1:6000 abstream serve
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abstream", description="Real-time A/B testing analytics over gRPC.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from abstream.service.settings import Settings

    Settings.add_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = Settings.from_args(args)
        except ValueError as error:
            parser.error(str(error))
        return _serve(settings)
    return 2


def _serve(settings) -> int:
    from abstream.service.server import BindError, serve
    from abstream.store import RecoveryError

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(serve(settings))
    except BindError as error:
        print(f"abstream: {error}", file=sys.stderr)
        return 1
    except RecoveryError as error:
        print(f"abstream: refusing to start: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
