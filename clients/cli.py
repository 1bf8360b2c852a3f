"""The `abstream` command: one entry point, one subcommand per job.

Every command fails with one line saying what went wrong, where, and what to do, and a non-zero
exit: never a traceback for a user's mistake. The server's commands (`serve`, `token`,
`clickhouse`, `migrate`) live with the service (service/cli.py): this module hands them over
without importing the server.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import datetime
import io
import json
import math
import os
import queue
import re
import sys
import threading
import time
from dataclasses import asdict, fields
from typing import Any, Callable, Iterable

#: Commands of the server side (service/cli.py).
SERVER_COMMANDS = {"serve": "run the server (abstream serve --help lists every setting)",
                   "token": "make a token: prints it once, and the entry for the tokens file",
                   "clickhouse": "the ClickHouse cluster engine: `abstream clickhouse init` creates its schema",
                   "migrate": "copy an embedded data directory into a ClickHouse cluster"}

EXAMPLES = {
    None: """\
examples:
  abstream serve                                     # 127.0.0.1:50051, data in ./data
  abstream ingest events.ndjson                      # one JSON event per line, as users send them
  abstream tests
  abstream summary homepage_redesign --start 2023-01-01 --end 2023-12-31
  abstream segments homepage_redesign country --format csv

Every client command takes --addr (ABSTREAM_ADDR), --token (ABSTREAM_TOKEN) and, for TLS,
--tls / --ca / --cert / --key. `abstream COMMAND --help` shows each command's options.""",
    "ingest": """\
examples:
  abstream ingest events.ndjson                      # sent exactly once: a re-run stores nothing twice
  abstream ingest events.csv events.parquet
  cat events.ndjson | abstream ingest --producer-id nightly-2025-04-28 -
  abstream ingest --allow-duplicates events.ndjson   # store it again (at-least-once)""",
    "summary": """\
examples:
  abstream summary checkout --start 2025-04-01 --end 2025-04-30   # --end of a day includes that whole day
  abstream summary checkout --control control --confidence 0.99 --correction holm
  abstream summary checkout --sequential --device mobile --format json
  abstream summary checkout --comparisons --format csv           # lift, interval, p-value per treatment and metric""",
    "segments": """\
examples:
  abstream segments checkout country
  abstream segments checkout device --control control --format csv
  abstream segments checkout country --comparisons --format ndjson""",
    "timeseries": """\
examples:
  abstream timeseries checkout --interval hour --cumulative
  abstream timeseries checkout --interval day --time-zone Europe/Madrid --format csv""",
    "tests": """\
examples:
  abstream tests
  abstream tests --format json | jq '.rows[].test_id'""",
    "quarantine": """\
examples:
  abstream quarantine                                 # the newest 100 rejected events, and why
  abstream quarantine --test-id checkout --limit 10 --format ndjson""",
    "import": """\
examples:
  abstream import s3://experiments/events/            # every object under the prefix not imported before
  abstream import s3://experiments/events/ --watch    # and then new ones as they land, every 30 s
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 abstream import s3://bucket/events/ --format parquet
  abstream import /data/exports/                      # a directory under the server's --import-root

The server reads the objects with its own AWS_* environment (credentials, region, endpoint);
--endpoint-url and --region override the last two (an endpoint only if it is the server's own or
one listed with its --import-endpoints). Each object is imported once: re-running, or
restarting the server mid-import, stores nothing twice.""",
    "snapshot": """\
examples:
  abstream snapshot --token "$ADMIN_TOKEN"            # before a backup, or to shorten recovery""",
    "experiment": """\
examples:
  abstream experiment create checkout --control control --split control=50,treatment=50 \\
      --start 2025-04-28 --hypothesis "the one-page checkout converts more"
  abstream experiment list
  abstream experiment stop checkout""",
    "power": """\
examples:
  abstream power checkout --mde 0.05                  # users per variant to detect +5%
  abstream power checkout --mde 0.02 --power 0.9 --alpha 0.01""",
}


#: The --timeout of the commands that write a snapshot and remove files (snapshot, delete-test,
#: erase-user), which may take minutes on a large store: the client's own default for them.
LONG_CALL = 3600.0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("abstream")
    except PackageNotFoundError:
        return "unknown"


def _time(end: bool = False):
    """The text of an instant, checked: the Client reads it (an end parsed here, then again as a
    datetime, was widened twice: '18:42:22.000Z' took in that whole second)."""
    def parse(text: str) -> str:
        from abstream.clients.client import parse_time

        try:
            parse_time(text, end=end)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    return parse


def _whole(least: int, most: int):
    """A whole number from `least` to `most`, or a usage error saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{text[:32]!r}: a whole number from {least:,} to {most:,}")
        return value
    return parse


def _seconds(text: str) -> float:
    """A duration in seconds: a finite number above 0, or a usage error saying so."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a number of seconds above 0")
    return value


def _split(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        try:
            out[name.strip()] = float(share)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: a split is variant=share[,variant=share...], "
                                             "e.g. control=50,treatment=50") from None
    return out


def _guardrails(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, margin = part.partition("=")
        try:
            out[name.strip()] = float(margin.strip().removesuffix("%")) / (100 if margin.strip().endswith("%") else 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: guardrails are metric=margin[,metric=margin...], e.g. "
                                             "revenue_per_user=2%,conversion=0.01") from None
    return out


def _prior(text: str) -> tuple[float, float]:
    try:
        mean, variance = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a prior is MEAN,VARIANCE of the relative lift, "
                                         "e.g. 0,0.01") from None
    return mean, variance


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abstream", description="Real-time A/B testing analytics over gRPC.",
                                     epilog=EXAMPLES[None], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"abstream {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in SERVER_COMMANDS.items():  # listed here, parsed by the service's own command
        commands.add_parser(name, help=help, add_help=False)

    def command(name: str, help: str, timeout: float = 60.0) -> argparse.ArgumentParser:
        return _subcommand(commands, name, help, timeout)

    def compared(p: argparse.ArgumentParser) -> None:
        p.add_argument("--comparisons", action="store_true",
                       help="print the comparisons with the control (each treatment, metric by metric: lift, its "
                            "interval, p-value, chance to win), a row each, instead of the per-variant results: "
                            "with --format csv or ndjson, the analysis as a table programs read")

    def formatted(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=["table", "json", "csv", "ndjson"], default="table",
                       help="output format (default %(default)s)")

    def ranged(p: argparse.ArgumentParser) -> None:
        p.add_argument("test_id", help="the test")
        p.add_argument("--start", type=_time(), help="from this instant, inclusive: 'YYYY-MM-DD', "
                                                     "'YYYY-MM-DD HH:MM:SS' (UTC) or RFC 3339")
        p.add_argument("--end", type=_time(end=True), help="up to this instant, inclusive: a date means the end of "
                                                           "that day, a time to the second the end of that second")

    def filtered(p: argparse.ArgumentParser) -> None:
        for name in ("device", "country", "event_type"):
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"only events with this {name}")

    def analysed(p: argparse.ArgumentParser, over_time: bool = False) -> None:
        """The analysis options; `over_time` (the lift): without those of a whole test's answer."""
        a = p.add_argument_group("analysis")
        a.add_argument("--control", default="", help="the control variant (default: the experiment's, else "
                                                     "'control', else the first)")
        a.add_argument("--confidence", type=float, help="confidence level of the intervals (default 0.95)")
        a.add_argument("--sequential", action="store_true", help="confidence sequences: valid however often you look")
        a.add_argument("--correction", choices=["none", "holm", "benjamini_hochberg"], default="",
                       help="adjust p-values across treatments")
        a.add_argument("--expected-weights", type=_split, metavar="V=W,...",
                       help="planned split for the sample ratio check (default: the experiment's, else equal)")
        a.add_argument("--prior", type=_prior, metavar="MEAN,VARIANCE",
                       help="normal prior on the relative lift for chance to win (default: flat)")
        a.add_argument("--relative-interval", choices=["delta", "fieller"], default="",
                       help="the relative lift's interval: delta method (default) or Fieller's, which holds "
                            "where the control's mean is uncertain (heavy-tailed revenue)")
        if over_time:
            return
        a.add_argument("--guardrails", type=_guardrails, metavar="METRIC=MARGIN,...",
                       help="guardrail metrics with their non-inferiority margins, relative (revenue_per_user=2%%: "
                            "at most 2%% worse), each tested one-sided")
        a.add_argument("--metric-event-type", default="", metavar="TYPE",
                       help="count conversions and revenue from events of this type only (purchase, say), every "
                            "user kept; --event-type instead keeps only the users with such events")
        a.add_argument("--session-metrics", action="store_true",
                       help="compare conversions per session and events per session too (each user's distinct "
                            "session ids; reads every event's session id)")

    ingest = command("ingest", "send events from files: NDJSON, CSV, Parquet or Arrow (- for standard input)")
    ingest.add_argument("files", nargs="+", metavar="FILE")
    ingest.add_argument("--input-format", choices=["auto", "ndjson", "csv", "parquet", "arrow"], default="auto",
                        help="auto (default): by the file's extension; .csv, .parquet, .arrow, anything else NDJSON")
    ingest.add_argument("--batch-size", type=_whole(1, 2**31 - 1), default=20_000,
                        help="events per batch (default %(default)s); a re-run is recognised with the same size")
    ingest.add_argument("--producer-id", help="the id that makes a re-run store nothing twice (default: one "
                                              "derived from each file's content)")
    ingest.add_argument("--allow-duplicates", action="store_true",
                        help="send as new events even if this file was sent before")
    ingest.add_argument("--quiet", action="store_true", help="no progress on standard error")

    summary = command("summary", "per-variant results of a test, with comparisons to the control")
    ranged(summary)
    filtered(summary)
    analysed(summary)
    summary.add_argument("--exclude-multi-variant-users", action="store_true",
                         help="leave out users seen in more than one variant (an assignment bug the health line "
                              "reports)")
    capping = summary.add_mutually_exclusive_group()
    capping.add_argument("--cap-percentile", type=float, metavar="P",
                         help="compare revenue per user capped at this percentile (99: the top 1%% count as the 99th "
                              "percentile) of every arm's users pooled")
    capping.add_argument("--cap-value", type=float, metavar="AMOUNT",
                         help="compare revenue per user capped at this fixed amount")
    summary.add_argument("--cap-nonzero-only", action="store_true",
                         help="take --cap-percentile over the users with revenue only (where most users buy nothing)")
    compared(summary)
    formatted(summary)
    segments = command("segments", "results per variant and device, country or event type")
    ranged(segments)
    segments.add_argument("dimension", choices=["device", "country", "event_type"], help="what to split by")
    filtered(segments)
    analysed(segments)
    compared(segments)
    formatted(segments)
    timeseries = command("timeseries", "results per time bucket and variant")
    ranged(timeseries)
    timeseries.add_argument("--interval", choices=["minute", "hour", "day", "week"], default="day",
                            help="bucket width (default %(default)s)")
    timeseries.add_argument("--cumulative", action="store_true", help="each bucket counts everything up to it")
    timeseries.add_argument("--time-zone", default="", help="day and week buckets start at this zone's midnight "
                                                            "(an IANA name, e.g. Europe/Madrid; default UTC)")
    filtered(timeseries)
    formatted(timeseries)
    lift = command("lift", "each treatment's cumulative lift over the control at the end of each bucket, its "
                           "intervals confidence sequences (valid over the whole curve at once)")
    ranged(lift)
    lift.add_argument("--interval", choices=["hour", "day", "week"], default="day",
                      help="bucket width (default %(default)s)")
    lift.add_argument("--time-zone", default="", help="day and week buckets start at this zone's midnight")
    lift.add_argument("--since-first-exposure", action="store_true",
                      help="buckets are ages since each user's first event (novelty effects), not dates")
    filtered(lift)
    analysed(lift, over_time=True)
    formatted(lift)
    tests = command("tests", "every test with its variants, events, users and plan")
    formatted(tests)
    quarantine = command("quarantine", "rejected events and why, newest first")
    quarantine.add_argument("--test-id", default="", help="only this test's")
    quarantine.add_argument("--limit", type=_whole(1, 2**32 - 1), default=100, help="at most this many (default %(default)s)")
    formatted(quarantine)
    power = command("power", "users each variant needs to detect a lift, from the test's own baseline")
    power.add_argument("test_id", help="the test whose control is the baseline")
    power.add_argument("--mde", type=float, required=True, help="the smallest relative lift worth detecting (0.05: 5%%)")
    power.add_argument("--power", type=float, default=0.8, help="chance of detecting it (default %(default)s)")
    power.add_argument("--alpha", type=float, default=0.05, help="significance level (default %(default)s)")
    power.add_argument("--control", default="", help="the control variant")
    power.add_argument("--users", type=_whole(0, 2**63 - 1), default=0, dest="users_per_variant",
                       help="users per variant for the detectable lift and the power (default: the control's so far)")
    formatted(power)
    imports = command("import", "import every new object under an S3 prefix or a server path, exactly once (admin)")
    imports.add_argument("uri", help="s3://bucket/prefix/, s3://bucket/key, or a path on the server")
    imports.add_argument("--format", choices=["parquet", "arrow", "csv", "ndjson"], default=None,
                         help="the objects' format (default: from each object's name; .gz is inflated)")
    imports.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3")
                         or os.environ.get("AWS_ENDPOINT_URL", ""),
                         help="S3 endpoint, for S3-compatible stores (env AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)")
    imports.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", ""),
                         help="the bucket's region (env AWS_REGION, AWS_DEFAULT_REGION; default us-east-1)")
    imports.add_argument("--watch", action="store_true", help="keep importing new objects as they land, until "
                                                              "interrupted")
    imports.add_argument("--interval", type=_seconds, default=30.0, help="with --watch, seconds between looks "
                                                                      "(default %(default)s)")
    imports.add_argument("--quiet", action="store_true", help="no progress on standard error")
    delete = command("delete-test", "remove a test's events, quarantined events and plan (admin)", LONG_CALL)
    delete.add_argument("test_id")
    delete.add_argument("--yes", action="store_true", help="yes, remove them (required: it cannot be undone)")
    erase = command("erase-user", "remove every event of a user, from queries and from the server's disk (admin)",
                    LONG_CALL)
    erase.add_argument("user_id")
    erase.add_argument("--test", action="append", default=[], dest="tests", metavar="TEST_ID",
                       help="only from this test (repeatable; default: every test)")
    erase.add_argument("--yes", action="store_true", help="yes, erase them (required: it cannot be undone)")
    retention = command("retention", "keep a test's events so many days (admin); 0: the server's --retention-days")
    retention.add_argument("test_id")
    retention.add_argument("days", type=float)
    export = command("export", "a test's events as stored, to a file or standard output (admin)")
    ranged(export)
    export.add_argument("--format", choices=["parquet", "csv", "ndjson"], default=None,
                        help="default: from --output's extension, else ndjson")
    export.add_argument("--output", "-o", default="-", help="the file (default: standard output; not for parquet)")
    command("snapshot", "write a snapshot now (admin scope)", LONG_CALL)
    experiment = commands.add_parser("experiment", help="a test's plan: control, split, start, hypothesis (admin)",
                                     epilog=EXAMPLES["experiment"], formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = experiment.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (("create", "define a test's plan"), ("update", "change what a plan's options set")):
        p = _subcommand(actions, action, help)
        p.add_argument("test_id")
        p.add_argument("--control", default="", help="the control variant")
        p.add_argument("--split", type=_split, default={}, metavar="V=W,...", help="planned share of users per variant")
        p.add_argument("--start", type=_time(), help="when it starts ('YYYY-MM-DD[ HH:MM:SS]' UTC, RFC 3339)")
        p.add_argument("--hypothesis", default="", help="what it tests, in words")
        formatted(p)
    stop = _subcommand(actions, "stop", "record that a test's experiment has stopped")
    stop.add_argument("test_id")
    stop.add_argument("--at", type=_time(), help="when (default: now)")
    formatted(stop)
    formatted(_subcommand(actions, "list", "every plan"))
    return parser


def _subcommand(commands, name: str, help: str, timeout: float = 60.0) -> argparse.ArgumentParser:
    """A client command, with its examples and the options every client command takes."""
    p = commands.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    connection = p.add_argument_group("connection")
    connection.add_argument("--addr", default=os.environ.get("ABSTREAM_ADDR", "127.0.0.1:50051"),
                            help="the server's host:port (env ABSTREAM_ADDR; default %(default)s)")
    connection.add_argument("--token", default=os.environ.get("ABSTREAM_TOKEN"),
                            help="bearer token, when the server has a tokens file (env ABSTREAM_TOKEN)")
    connection.add_argument("--timeout", type=_seconds, default=timeout,
                            help="seconds each call, and all retries of an ingest, may take (default %(default)s)")
    connection.add_argument("--tls", action="store_true", help="TLS, trusting the system's certificates")
    connection.add_argument("--ca", help="TLS, trusting this CA certificate (PEM file)")
    connection.add_argument("--cert", help="client certificate (PEM file) for mutual TLS; with --key")
    connection.add_argument("--key", help="its private key (PEM file)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # gRPC's own C-core lines would land between ours; errors only, unless asked otherwise.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if argv and argv[0] in SERVER_COMMANDS:  # the server starts from the service, not from here
        from abstream.service.cli import main as service_main

        return service_main(argv)
    args = build_parser().parse_args(argv)
    name = args.command + (f" {args.action}" if getattr(args, "action", None) else "")
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"abstream {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error a user can cause gets one line
        line = explain(error, args)
        if line is None:
            raise
        print(f"abstream {name}: {line}", file=sys.stderr)
        return 2


def _first_line(details: str) -> str:
    """gRPC's reason, to its first line: OpenSSL's reason name where it gave one (it comes last)."""
    if match := re.search(r"OPENSSL_internal:([A-Z_]+)", details):
        return f"TLS: {match.group(1)}"
    return details.splitlines()[0][:160]


def _tls_hint(lowered: str, args) -> str:
    """What to change, by what the handshake said and what was asked."""
    tls = args.ca or args.tls or args.cert
    if "wrong_version_number" in lowered:
        return "it does not seem to serve TLS: drop --tls, --ca, --cert and --key"
    if "certificate_verify_failed" in lowered:
        return ("its certificate is not signed by the CA given with --ca" if args.ca else
                "its certificate is not signed by a CA this system trusts: pass --ca with the one that signed it")
    if "security handshaker" in lowered and args.cert:
        return "the client certificate and key given do not go together (--cert and --key)"
    if tls and not args.cert:
        return "it may require a client certificate: --cert and --key"
    if tls:
        return "it may not trust the client certificate given (--cert)"
    return "if it serves TLS, pass --tls or --ca (and --cert and --key if it requires client certificates)"


def explain(error: BaseException, args) -> str | None:
    """One readable line for an error a user can cause or fix; None for a bug (shown in full)."""
    import grpc
    from abstream.clients.files import FileProblem
    from abstream.clients.producer import too_large

    if isinstance(error, grpc.RpcError):
        code, details = error.code(), error.details() or ""
        where = f"the server at {args.addr}"
        lowered = details.lower()
        if code == grpc.StatusCode.UNAVAILABLE and not _answered(error):  # the connection's words, not the server's
            if any(w in lowered for w in _TLS_WORDS):
                return f"{where} closed the connection ({_first_line(details)}): {_tls_hint(lowered, args)}"
            if "keepalive" in lowered or "ping timeout" in lowered:
                return (f"{where} stopped answering (its connection did not answer a ping within 10 s): is it stopped "
                        "or overloaded? What it acknowledged before is stored")
            if any(w in lowered for w in ("connect", "refused", "dns", "unavailable")):
                return (f"cannot reach {where} ({details.splitlines()[0][:160]}): is it running? Start one with "
                        "`abstream serve`, or point --addr (ABSTREAM_ADDR) at it")
        if too_large(error) and getattr(args, "batch_size", None):
            return (f"{where} takes smaller requests than --batch-size {args.batch_size:,} made "
                    f"({_first_line(details)}): lower --batch-size; what was acked before is stored")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if args.token:
                return f"{where} did not accept the token given by --token or ABSTREAM_TOKEN"
            return f"{where} needs a token: pass --token or set ABSTREAM_TOKEN"
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return f"{where} refused: {details}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{where} did not answer within {args.timeout:g}s (--timeout)"
        return f"{where} answered {code.name}: {details}"
    if isinstance(error, FileProblem):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"no such file: {error.filename}"
    if isinstance(error, (PermissionError, IsADirectoryError)):
        return f"cannot read {error.filename}: {error.strerror}"
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, ValueError):
        return str(error)
    return None


def _client(args):
    from abstream.clients.client import Client

    _check_connection_args(args)
    return Client(args.addr, token=args.token, timeout=args.timeout, **_tls(args))


def _check_connection_args(args) -> None:
    """What gRPC would refuse with its own multi-line log: said in one line, for every command."""
    if not args.addr.strip():
        raise ValueError("--addr (ABSTREAM_ADDR) is empty: give the server's HOST:PORT")
    if args.token is not None and not (args.token.isprintable() and args.token.isascii()):
        raise ValueError("--token (ABSTREAM_TOKEN) holds a line break, a control character or a character other than "
                         "ASCII: give the token alone, as it was made")


def _tls(args) -> dict:
    def read(option: str, path: str | None, holds: bytes) -> bytes | None:
        """The PEM file's bytes, checked here: gRPC would print its own log lines and fail the
        call as UNAVAILABLE, and an empty CA file meant the system's CAs."""
        if not path:
            return None
        with open(path, "rb") as f:
            pem = f.read()
        if not re.search(rb"-----BEGIN [A-Z ]*" + holds + rb"-----", pem):
            raise ValueError(f"{option} {path}: not a PEM file holding a {holds.decode().lower()} (no '-----BEGIN "
                             f"{holds.decode()}-----' line)")
        return pem

    ca = read("--ca", args.ca, b"CERTIFICATE")
    return {"tls": ca if ca else (True if args.tls or args.cert else None),
            "cert": read("--cert", args.cert, b"CERTIFICATE"), "key": read("--key", args.key, b"PRIVATE KEY")}


# ---- ingest ----------------------------------------------------------------------------------

class Report:
    """What became of every line of every file: stored, already stored, or rejected (by whom, why)."""

    def __init__(self) -> None:
        self.accepted = self.duplicates = 0
        self.by_server: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        self.not_sent: dict[tuple[str, str], list[str]] = collections.defaultdict(list)

    def unsendable(self, path: str, problems) -> None:
        for line, field, why in problems:
            self.not_sent[(field, why)].append(f"{path}:{line}")

    def acked(self, path: str, chunk, ack) -> None:
        if ack.duplicate:
            self.duplicates += chunk.table.num_rows
            return
        self.accepted += ack.accepted
        for r in ack.rejections:
            self.by_server[(r.field, r.message)].append(f"{path}:{int(chunk.lines[r.index])}")

    def print(self) -> int:
        server, local = sum(map(len, self.by_server.values())), sum(map(len, self.not_sent.values()))
        line = f"accepted {self.accepted:,}, rejected {server + local:,}"
        if server and local:
            line += f" ({server:,} by the server, kept in its quarantine; {local:,} not sent)"
        elif local:
            line += " (not sent: not readable as events)"
        if self.duplicates:
            line += (f"; {self.duplicates:,} already stored (sent before: nothing was stored twice; removed since? "
                     "--allow-duplicates sends them again)")
        print(line)
        merged = [(k, v, "") for k, v in self.by_server.items()] + [(k, v, "not sent: ") for k, v in self.not_sent.items()]
        for (field, why), where, label in sorted(merged, key=lambda m: -len(m[1])):
            shown = ", ".join(where[:3]) + (f", … {len(where) - 3:,} more" if len(where) > 3 else "")
            print(f"  {len(where):,} × {label}{field}: {why}  ({shown})")
        return 1 if server + local else 0


def content_id(path: str) -> str:
    """A name for a file's content (BLAKE3 of its bytes, 128 bits): the producer id that makes
    re-sending it a no-op, whatever it is called. BLAKE3 rather than SHA-256: as hard to collide,
    four times as fast here (0.04 s for a 240 MB file), and the hash runs beside the parsing."""
    import mmap

    import blake3

    digest = blake3.blake3(max_threads=1)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                digest.update(view)
    return digest.hexdigest(length=16)


def _ingest(args) -> int:
    # Files are hashed from the start: while grpc, pyarrow and numpy load, and the first chunks are parsed.
    hashing = concurrent.futures.ThreadPoolExecutor(1)
    producers = []
    for path in args.files:
        if path != "-" and os.path.isdir(path):
            raise IsADirectoryError(21, "is a directory: give the files in it", path)
        if path != "-" and not os.path.exists(path):
            raise FileNotFoundError(2, "No such file", path)
        streamed = path == "-" or not os.path.isfile(path)  # standard input, a pipe (<(zcat ...)): read once
        producer = None
        if not args.allow_duplicates:
            if args.producer_id:
                producer = args.producer_id + (f":{path}" if len(args.files) > 1 else "")
            elif not streamed:
                producer = hashing.submit(lambda p=path: f"file:{content_id(p)}:{args.batch_size}")
            else:
                print(f"abstream ingest: {'standard input' if path == '-' else path} is read as it comes, and sent at "
                      "least once; give --producer-id to send it exactly once", file=sys.stderr)
        producers.append(producer)
    from abstream.clients import files
    from abstream.clients.columnar import arrow_ipc

    plan = [(path, files.format_of(path, args.input_format), producer)
            for path, producer in zip(args.files, producers)]
    for path, fmt, _ in plan:
        if fmt in ("parquet", "arrow") and (path == "-" or not os.path.isfile(path)):
            raise files.FileProblem(f"{path}: {fmt} is read from a file, not as it comes (standard input, a pipe): "
                                    "write it to a file first, or send NDJSON or CSV")

    def reading(path: str, fmt: str):
        """Reading and encoding on threads of their own, well ahead while the file is hashed; a row
        no request could carry (`files.sendable`) is kept back, lest the server refuse its batch."""
        return _ahead(_encoded(map(files.sendable, _ahead(files.read(path, fmt, args.batch_size))), arrow_ipc), 8)

    first = reading(*plan[0][:2]) if plan else None  # started before grpc is even loaded
    import grpc
    from abstream.clients.client import channel_for
    from abstream.v1 import analytics_pb2 as pb
    from abstream.v1 import analytics_pb2_grpc as pb_grpc

    _check_connection_args(args)
    report = Report()
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    progress = Progress(args, plan)
    try:
        with channel_for(args.addr, **_tls(args)) as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            for k, (path, fmt, producer) in enumerate(plan):
                def request(chunk, producer=producer):
                    if isinstance(producer, concurrent.futures.Future):
                        producer = producer.result()
                    return pb.IngestEventsRequest(arrow_ipc=chunk.ipc, producer_id=producer or "",
                                                  sequence=chunk.last if producer else 0)
                _send(stub, first if k == 0 else reading(path, fmt), request, metadata, args.timeout, report, path,
                      progress, grpc)
    except BaseException:
        # A file that failed (or Ctrl-C) ends the command, but what the ones before it stored is said,
        # lest it be sent again as if nothing had been.
        if report.accepted or report.duplicates or report.by_server or report.not_sent:
            progress.done()
            report.print()
        raise
    hashing.shutdown(wait=False)
    progress.done()
    return report.print()


def _encoded(chunks, arrow_ipc):
    for chunk in chunks:
        if chunk.table.num_rows:
            chunk.ipc = arrow_ipc(chunk.table)
        yield chunk


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _ahead(items, depth: int = 2):
    """`items` made by a thread of their own, up to `depth` ahead: reading, parsing and encoding
    the next chunks overlaps sending this one (the readers and Arrow's encoders release the GIL)."""
    made: queue.Queue = queue.Queue(depth)

    def make() -> None:
        try:
            for item in items:
                made.put(item)
            made.put(StopIteration)
        except Exception as error:  # noqa: BLE001 - raised again where the items are taken
            made.put(_Failed(error))

    threading.Thread(target=make, name="abstream-read", daemon=True).start()  # now, not at the first item
    return _taken(made)


def _taken(made: queue.Queue):
    while True:
        item = made.get()
        if item is StopIteration:
            return
        if isinstance(item, _Failed):
            raise item.error
        yield item


def _send(stub, chunks, request, metadata, timeout: float, report: Report, path: str, progress, grpc) -> None:
    """Streams a file's chunks on one call, many in flight; acks come back in order. A call that
    fails for a reason worth retrying (the server away, busy, draining) resumes with what was not
    acked, until --timeout has passed: exactly once when sent with a producer id."""
    pending: collections.deque = collections.deque()  # sent, not yet acked, oldest first
    source = iter(chunks)
    unreadable: list[BaseException] = []  # where the file could not be read: whichever call read that far
    lock = threading.Lock()  # the queue and the calls' counts
    # The file, read by one call's request thread at a time: a failed call's may still be reading
    # (standard input may wait for a line) when the next call starts, and it must not hold up
    # the main thread, which takes `lock`, meanwhile.
    reading = threading.Lock()
    from abstream.clients.producer import retry_delay, too_large

    deadline, backoff, answered = None, 0.1, False
    retriable = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    while True:
        attempt = _Attempt()

        def requests(attempt=attempt):
            while True:
                with lock:
                    if not attempt.live:
                        return
                    at = attempt.sent - attempt.acked
                    chunk = pending[at] if at < len(pending) else None  # resend what the last call left unacked
                    if chunk is not None:
                        attempt.sent += 1
                if chunk is None:
                    with reading:  # read and queued in the file's order
                        with lock:
                            if attempt.sent - attempt.acked < len(pending):  # queued by the call before: first
                                continue
                        if unreadable:  # the reader stopped there: not the end of the file
                            return
                        try:
                            chunk = next(source, None)
                        except Exception as error:  # noqa: BLE001 - raised again on the main thread
                            unreadable.append(error)  # gRPC would only say "Exception iterating requests!"
                            return
                        if chunk is None:
                            return
                        report.unsendable(path, chunk.problems)
                        if not chunk.table.num_rows:
                            progress.add(chunk)
                            continue
                        with lock:
                            pending.append(chunk)
                            if not attempt.live:  # ended while this was read: the next call sends it
                                return
                            attempt.sent += 1
                try:
                    message = request(chunk)
                except Exception as error:  # noqa: BLE001 - as above
                    attempt.error = error
                    return
                yield message

        call = stub.IngestEvents(requests(), metadata=metadata)
        watchdog = _Watchdog(call, timeout, lambda attempt=attempt: attempt.sent > attempt.acked)
        try:
            for ack in call:
                watchdog.progress()
                answered = True
                with lock:
                    chunk = pending.popleft()
                    attempt.acked += 1
                report.acked(path, chunk, ack)
                progress.add(chunk)
                deadline, backoff = None, 0.1
            if attempt.error is not None or unreadable:  # what came before the unreadable part is stored
                raise attempt.error or unreadable[0]
            return
        except grpc.RpcError as error:
            if watchdog.fired:
                raise _Stalled(timeout) from None
            answered = answered or not _unreached(error, grpc)  # a server draining, say: it restarts
            if error.code() not in retriable or not answered or too_large(error):
                raise  # nothing there, not speaking TLS as we do, a batch too large: not something waiting fixes
            deadline = deadline or time.monotonic() + timeout
            wait = max(backoff, retry_delay(error))  # never sooner than the server asked
            if time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            backoff = min(backoff * 2, 5.0)
        finally:
            watchdog.stop()
            with lock:
                attempt.live = False


class _Attempt:
    """One call's view of the shared queue: how many chunks it sent and how many were acked."""

    def __init__(self) -> None:
        self.sent = self.acked = 0
        self.live = True
        self.error: Exception | None = None


class _Stalled(ValueError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"the server acknowledged nothing for {timeout:g}s (--timeout); what was acked is stored, "
                         "and running the same command again sends the rest")


#: What gRPC's UNAVAILABLE says when the two sides do not speak TLS alike (`explain`).
_TLS_WORDS = ("socket closed", "ssl", "handshake", "certificate", "tls")


def _unreached(error, grpc) -> bool:
    """The call failed before reaching a server: none listens, or it does not speak as we do."""
    lowered = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE and not _answered(error) and any(
        w in lowered for w in ("failed to connect", "connection refused", "dns", *_TLS_WORDS))


def _answered(error) -> bool:
    """The error is a server's answer (its words may name a database it could not reach): the
    server names each call it answers in the trailing metadata."""
    trailing = getattr(error, "trailing_metadata", lambda: None)()
    return any(key == "x-request-id" for key, _ in trailing or ())


class _Watchdog:
    """Cancels a call that makes no progress (no ack) for `timeout` seconds while it has sent
    something to ack (`waiting`): input that is slow to come is not the server's stall."""

    def __init__(self, call, timeout: float, waiting: Callable[[], bool] = lambda: True) -> None:
        self.fired = False
        self._call, self._timeout, self._waiting = call, timeout, waiting
        self._last = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if not self._waiting():
                self._last = time.monotonic()
            elif time.monotonic() - self._last > self._timeout:
                self.fired = True
                self._call.cancel()
                return

    def progress(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()


class Progress:
    """Lines acked so far, on standard error when it is a terminal (or ABSTREAM_PROGRESS=1)."""

    def __init__(self, args, plan) -> None:
        self.shown = (not args.quiet and sys.stderr.isatty()) or os.environ.get("ABSTREAM_PROGRESS") == "1"
        self.total = sum(_count_lines(path) for path, fmt, _ in plan if fmt in ("ndjson", "csv")) if self.shown else 0
        self.done_lines = 0

    def add(self, chunk) -> None:
        if self.shown:
            self.done_lines = max(self.done_lines, int(chunk.last))
            print(f"\r{self.done_lines:,} / {self.total:,} lines", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _count_lines(path: str) -> int:
    if path == "-" or not os.path.isfile(path):  # standard input, a pipe: read once, by the sender
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# ---- output ----------------------------------------------------------------------------------

def _flat(rows: Iterable, columns: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        record: dict[str, Any] = {}
        for key, value in asdict(row).items():
            if key == "metrics" and isinstance(value, dict):
                record.update(value)
            elif key == "experiment":
                record["experiment"] = _plan_text(value) if value else ""
            else:
                record[key] = value.isoformat() if hasattr(value, "isoformat") else value
        out.append(record)
    return out


def _plan_text(plan: dict) -> str:
    split = ",".join(f"{k}={v:g}" for k, v in sorted(plan.get("split", {}).items()))
    return " ".join(x for x in (f"control={plan['control_variant']}" if plan.get("control_variant") else "",
                                f"split={split}" if split else "",
                                "stopped" if plan.get("stop_time") else "running") if x)


def _columns_of(row_type) -> list[str]:
    """A result's column names, known without rows (for the header of an empty CSV)."""
    from abstream.clients.client import Metrics

    out = []
    for f in fields(row_type):
        if f.name == "metrics":
            out += [m.name for m in fields(Metrics)]
        else:
            out.append(f.name)
    return out


def _iso(ns: int) -> str:
    """A time in nanoseconds as ISO 8601 in UTC, its fraction as precise as it is (pyarrow
    gives nanosecond times to Python only through pandas, which is not a dependency)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    text = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += f".{fraction // 1000:06d}" if fraction % 1000 == 0 else f".{fraction:09d}"
    return text + "Z"


def _emit(rows: list[dict[str, Any]], fmt: str, columns: list[str], extra: dict[str, Any] | None = None) -> None:
    from abstream.clients import files

    if fmt == "json":
        print(json.dumps(files.finite({"rows": rows, **(extra or {})}), indent=2, ensure_ascii=False, default=str,
                         allow_nan=False))
    elif fmt == "ndjson":
        for row in rows:
            print(json.dumps(files.finite(row), ensure_ascii=False, default=str, allow_nan=False))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else
                              json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v) for k, v in r.items()}
                         for r in rows)
        print(buffer.getvalue(), end="")
    else:
        print(_table(rows, columns))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return _printable(", ".join(map(str, value)))
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return _printable(str(value))


def _printable(text: str) -> str:
    """Text as a table shows it: a character that is not printable (a newline, a terminal's
    escape sequence in a test id) as its escape, so that it neither splits a row nor acts on the
    terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    columns = [_printable(c) for c in columns]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _comparisons(analysis) -> list[dict[str, Any]]:
    """The comparisons for people: a lift with its interval, or, when it could not be computed,
    why (the status), never zeros that read as 'no difference'."""
    out = []
    for c in analysis.comparisons:
        lift = c.relative
        if lift.status == "ok":
            shown = {"lift": f"{lift.estimate:+.2%}", "interval": f"{lift.ci_low:+.2%} .. {lift.ci_high:+.2%}",
                     "p_value": f"{lift.p_value:.4f}", "chance_to_win": f"{c.chance_to_win:.1%}"}
        elif c.absolute.status == "ok":
            shown = {"lift": f"{c.absolute.estimate:+.4g} (absolute)",
                     "interval": f"{c.absolute.ci_low:+.4g} .. {c.absolute.ci_high:+.4g}",
                     "p_value": f"{c.absolute.p_value:.4f}", "chance_to_win": lift.status_message}
        else:
            shown = {"lift": "-", "interval": "-", "p_value": "-", "chance_to_win": c.status_message}
        row = {"variant": c.variant, "metric": c.metric, "control": c.control_mean, "treatment": c.treatment_mean,
               **shown}
        if any(x.guardrail for x in analysis.comparisons):
            g = c.guardrail
            row["guardrail"] = ("" if g is None else g.status_message if g.status != "ok" else
                                f"{'non-inferior' if g.non_inferior else 'NOT shown non-inferior'} at -{g.margin:.2%} "
                                f"(bound {g.lower_bound:+.2%}, p {g.p_value:.4f})")
        out.append(row)
    return out


def _analysis_text(analysis, heading: str) -> str:
    srm = "MISMATCH: the split of users is not the planned one" if analysis.sample_ratio_mismatch else "ok"
    return (f"\n{heading} compared with {analysis.control_variant!r} (sample ratio {srm}, p = "
            f"{analysis.srm_p_value:.4g}):\n" + _table(_comparisons(analysis),
                                                       ["variant", "metric", "control", "treatment", "lift", "interval",
                                                        "p_value", "chance_to_win"]
                                                       + (["guardrail"] if any(c.guardrail for c in
                                                                               analysis.comparisons) else [])))


def _health_text(health) -> str:
    """The health line first: the status, then each reason on its own line."""
    return "\n".join([f"health: {health.status}"] + [f"  - {reason}" for reason in health.reasons])


def _options(args) -> dict[str, Any]:
    return {"control": args.control, "confidence": args.confidence, "sequential": args.sequential,
            "correction": args.correction, "expected_weights": args.expected_weights, "prior": args.prior,
            "relative_interval": args.relative_interval, "guardrails": getattr(args, "guardrails", None),
            "metric_event_type": getattr(args, "metric_event_type", ""),
            "session_metrics": getattr(args, "session_metrics", False)}


def _empty(result_rows, args, client) -> None:
    """Says why an answer has no rows: a test the server does not know, or what the question
    narrowed it to (a range, filters, the window of its experiment's plan)."""
    if result_rows:
        return
    known = {t.test_id: t for t in client.list_tests(timeout=args.timeout).rows}
    if args.test_id not in known:
        print(f"abstream {args.command}: there is no test {args.test_id!r}; `abstream tests` lists every test",
              file=sys.stderr)
        return
    narrowed = [what for what, given in (("in that range", args.start or args.end),
                                        ("with those filters", args.device or args.country or args.event_type))
                if given]
    if known[args.test_id].experiment is not None:
        narrowed.append("within its experiment's start and stop (`abstream tests` shows them)")
    why = " and ".join(narrowed) or "to answer this"
    print(f"abstream {args.command}: no events of test {args.test_id!r} {why}", file=sys.stderr)


def _summary(args) -> int:
    from abstream.clients.client import SummaryRow

    with _client(args) as client:
        cap = None
        if args.cap_percentile is not None or args.cap_value is not None or args.cap_nonzero_only:
            cap = {"percentile": args.cap_percentile or 0, "value": args.cap_value or 0,
                   "nonzero_only": args.cap_nonzero_only}
        result = client.summary(args.test_id, args.start, args.end, device=args.device, country=args.country,
                                event_type=args.event_type, exclude_multi_variant_users=args.exclude_multi_variant_users,
                                revenue_cap=cap, **_options(args))
        _empty(result.rows, args, client)
    if args.comparisons:  # for people, the health line before them, and the cap after, as below
        if args.format == "table" and result.rows:
            print(_health_text(result.health))
        a = result.analysis
        _emit_comparisons(args.format, "", [("", a)], {"test_id": result.test_id, "control_variant": a.control_variant,
                                                        "sample_ratio_mismatch": a.sample_ratio_mismatch,
                                                        "health": asdict(result.health)})
        if args.format == "table" and result.analysis.revenue_cap is not None:
            print(_cap_text(result.analysis.revenue_cap))
        return 0
    rows, columns = _flat(result.rows), _columns_of(SummaryRow)
    if args.format != "table":
        _emit(rows, args.format, columns, {"test_id": result.test_id, "analysis": asdict(result.analysis),
                                           "health": asdict(result.health)})
        return 0
    if result.rows:
        print(_health_text(result.health))
    print(_table(rows, columns))
    if result.analysis.comparisons:
        print(_analysis_text(result.analysis, "each variant"))
    if result.analysis.revenue_cap is not None:
        print(_cap_text(result.analysis.revenue_cap))
    return 0


def _cap_text(cap) -> str:
    where = (f"a fixed {cap.value:g}" if cap.value else
             f"the {cap.percentile:g}th percentile of {cap.pooled_users:,} {'paying ' if cap.nonzero_only else ''}users")
    return (f"\nrevenue_per_user compared capped at {cap.threshold:,.2f} ({where}); {cap.capped_users:,} users were "
            "above it")


def _segments(args) -> int:
    from abstream.clients.client import SegmentRow

    with _client(args) as client:
        result = client.segments(args.test_id, args.dimension, args.start, args.end, device=args.device,
                                 country=args.country, event_type=args.event_type, **_options(args))
        _empty(result.rows, args, client)
    if args.comparisons:
        _emit_comparisons(args.format, "segment", list(result.analyses.items()), {"test_id": result.test_id})
        return 0
    rows, columns = _flat(result.rows), _columns_of(SegmentRow)
    if args.format != "table":
        _emit(rows, args.format, columns, {"test_id": result.test_id,
                                           "analyses": {k: asdict(v) for k, v in result.analyses.items()}})
        return 0
    print(_table(rows, columns))
    for segment, analysis in result.analyses.items():
        if analysis.comparisons:
            print(_analysis_text(analysis, f"{args.dimension} {segment!r}:"))
    return 0


def _timeseries(args) -> int:
    from abstream.clients.client import TimeseriesRow

    with _client(args) as client:
        result = client.timeseries(args.test_id, args.interval, args.start, args.end, cumulative=args.cumulative,
                                   device=args.device, country=args.country, event_type=args.event_type,
                                   time_zone=args.time_zone)
        _empty(result.rows, args, client)
    _emit(_flat(result.rows), args.format, _columns_of(TimeseriesRow))
    return 0


def _lift(args) -> int:
    with _client(args) as client:
        result = client.timeseries(args.test_id, args.interval, args.start, args.end,
                                   cumulative=not args.since_first_exposure, lift=True,
                                   since_first_exposure=args.since_first_exposure, device=args.device,
                                   country=args.country, event_type=args.event_type, time_zone=args.time_zone,
                                   **_options(args))
        _empty(result.lifts, args, client)
    head = "age" if args.since_first_exposure else "bucket"
    _emit_comparisons(args.format, head, [(str(start) if args.format == "table" or not hasattr(start, "isoformat")
                                           else start.isoformat(), analysis)  # ages: timedeltas
                                          for start, analysis in result.lifts])
    return 0


def _emit_comparisons(fmt: str, head: str, analyses: list[tuple[str, Any]], extra: dict[str, Any] | None = None
                      ) -> None:
    """Comparisons with the control, a row each, under what each analysis is of (`head`: a
    bucket, an age, a segment; none for a whole test): as text for people, as numbers and a
    status for programs (`extra` beside the rows in JSON)."""
    heads = [head] if head else []
    shown = _comparisons if fmt == "table" else _comparison_values
    rows = [{**({head: of} if head else {}), **row} for of, analysis in analyses for row in shown(analysis)]
    if fmt == "table":
        guarded = ["guardrail"] if any("guardrail" in row for row in rows) else []
        _emit(rows, fmt, [*heads, "variant", "metric", "control", "treatment", "lift", "interval", "p_value",
                          "chance_to_win", *guarded])
    else:
        _emit(rows, fmt, [*heads, "variant", "metric", "control", "treatment", "lift", "ci_low", "ci_high",
                          "p_value", "chance_to_win", "status"], extra)


def _comparison_values(analysis) -> list[dict[str, Any]]:
    """The comparisons for programs (json, csv, ndjson): the relative lift and its interval as
    numbers, none where it could not be computed, and why (its status) then."""
    out = []
    for c in analysis.comparisons:
        lift = c.relative
        ok = lift.status == "ok"
        out.append({"variant": c.variant, "metric": c.metric, "control": c.control_mean, "treatment": c.treatment_mean,
                    "lift": lift.estimate if ok else None, "ci_low": lift.ci_low if ok else None,
                    "ci_high": lift.ci_high if ok else None, "p_value": lift.p_value if ok else None,
                    "chance_to_win": c.chance_to_win if ok else None,
                    "status": lift.status if ok else (lift.status_message or c.status_message or lift.status)})
    return out


def _tests(args) -> int:
    from abstream.clients.client import TestInfo

    with _client(args) as client:
        _emit(_flat(client.list_tests().rows), args.format, _columns_of(TestInfo))
    return 0


def _quarantine(args) -> int:
    from abstream.clients.client import QuarantinedEvent

    with _client(args) as client:
        result = client.quarantine(args.test_id, args.limit)
    rows = _flat(result.rows)
    if args.format == "table":
        rows = [{k: (json.dumps(v, ensure_ascii=False) if k == "event" else v) for k, v in r.items()} for r in rows]
        print(_table(rows, _columns_of(QuarantinedEvent)))
        print(f"\n{result.total:,} rejected events in quarantine")
    else:
        _emit(rows, args.format, _columns_of(QuarantinedEvent), {"total": result.total})
    return 0


def _power(args) -> int:
    from abstream.clients.client import MetricPower

    with _client(args) as client:
        result = client.power(args.test_id, args.mde, power=args.power, alpha=args.alpha, control=args.control,
                              users_per_variant=args.users_per_variant)
    rows = _flat(result.rows)
    if args.format == "table":
        print(f"to detect a {args.mde:+.1%} relative lift with power {args.power:g} at alpha {args.alpha:g}, "
              f"baseline {result.control_variant!r}:")
        for r in rows:
            r["users_per_variant"] = r["users_per_variant"] or r.pop("status_message")
            r.pop("status_message", None)
    _emit(rows, args.format, [c for c in _columns_of(MetricPower) if args.format != "table" or c != "status_message"])
    return 0


def _import(args) -> int:
    """One line per object on standard output; a progress line on standard error while it runs.
    Watching, a round the server says it cannot do now (the store unreachable, the server
    stopping: it asks to be retried) is said on standard error and tried again at the next; a
    server that does not answer ends the watch, saying so."""
    import time

    import grpc
    from abstream.clients.producer import retry_delay

    progress = sys.stderr.isatty() and not args.quiet
    failed = 0
    first = True
    with _client(args) as client:
        while True:
            done = None
            try:
                for p in _imported(client, args, progress):
                    done = p
                    failed += p.state == "failed"
                    if p.state == "skipped" and not first:
                        continue  # watching: said once
                    what = {"imported": f"{p.accepted:,} stored, {p.quarantined:,} quarantined"
                                        + (f", {p.already_stored:,} stored before" if p.already_stored else ""),
                            "skipped": "imported before", "failed": f"FAILED: {p.error}"}[p.state]
                    print(f"{p.uri}: {what}", flush=True)
            except grpc.RpcError as error:
                if progress:
                    print("\r\033[K", end="", file=sys.stderr)
                if not args.watch or not retry_delay(error):
                    raise
                wait = max(args.interval, retry_delay(error))
                print(f"abstream import: {explain(error, args) or error.details()}; trying again in {wait:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(wait)
                continue
            if done is None:
                print(f"{args.uri}: nothing to import", flush=True) if not args.watch else None
            elif not args.watch or done.total_accepted or done.total_quarantined:
                print(f"{done.objects_total:,} objects: {done.total_accepted:,} events stored, "
                      f"{done.total_quarantined:,} quarantined", flush=True)
            if not args.watch:
                return 1 if failed else 0
            first = False
            time.sleep(args.interval)


def _imported(client, args, progress: bool):
    """Each object's end, as the server says it (its start on the progress line)."""
    for p in client.import_events(args.uri, format=args.format or "", endpoint_url=args.endpoint_url,
                                  region=args.region):
        if p.state == "started":
            if progress:
                print(f"\r[{p.objects_done}/{p.objects_total}] {p.uri} ({p.size:,} bytes) ...",
                      end="", file=sys.stderr, flush=True)
            continue
        if progress:
            print("\r\033[K", end="", file=sys.stderr)
        yield p


def _delete_test(args) -> int:
    if not args.yes:
        raise ValueError(f"this removes every event of {args.test_id!r} for good: add --yes")
    with _client(args) as client:
        print(f"{args.test_id}: {client.delete_test(args.test_id, timeout=args.timeout):,} events removed")
    return 0


def _erase_user(args) -> int:
    if not args.yes:
        raise ValueError("this removes every event of the user for good: add --yes")
    with _client(args) as client:
        removed = client.erase_user(args.user_id, args.tests, timeout=args.timeout)
    where = f"from {', '.join(args.tests)}" if args.tests else "from every test and from the server's disk"
    print(f"{removed:,} events erased {where}")
    return 0


def _retention(args) -> int:
    with _client(args) as client:
        plan = client.set_retention(args.test_id, args.days)
    kept = f"{plan.retention_days:g} days" if plan.retention_days else "the server's --retention-days"
    print(f"{plan.test_id}: events kept {kept}")
    return 0


def _export(args) -> int:
    """Streams the pieces to the file as they come: a large test is never held whole. The file is
    written under another name beside it and renamed once whole: a failed export (the server
    away, a deadline) leaves what the file held, a previous export, as it was."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fmt = args.format or next((f for f in ("parquet", "csv", "ndjson") if args.output.endswith("." + f)), "ndjson")
    if fmt == "parquet" and args.output == "-":
        raise ValueError("a Parquet export needs --output FILE")
    out, partial = (sys.stdout.buffer, None) if args.output == "-" else _beside(args.output)
    writer = None
    events = 0
    try:
        with _client(args) as client:
            for piece in client.export(args.test_id, args.start, args.end):
                events += piece.num_rows
                if fmt == "parquet":
                    writer = writer or pq.ParquetWriter(out, piece.schema)
                    writer.write_table(piece)
                elif fmt == "csv":
                    writer = writer or pacsv.CSVWriter(out, piece.schema)
                    writer.write_table(piece)
                else:
                    times = [_iso(ns) for ns in piece.column("timestamp").cast(pa.int64()).to_pylist()]
                    for row, at in zip(piece.drop_columns(["timestamp"]).to_pylist(), times):
                        out.write(json.dumps({"timestamp": at, **row}).encode() + b"\n")
        if writer is not None:
            writer.close()
        if partial is not None:
            out.close()
            os.replace(partial, os.path.realpath(args.output))
            partial = None
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        if partial is not None:
            os.unlink(partial)
    if args.output != "-":
        print(f"{args.test_id}: {events:,} events to {args.output}", file=sys.stderr)
    return 0


def _beside(path: str):
    """(the file to write, its temporary name, None when it is written as it is): a new file in
    `path`'s directory, as a file made there would be, or `path` itself when it is no regular
    file (/dev/null, a pipe)."""
    import tempfile

    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        return open(path, "wb"), None
    directory, name = os.path.split(target)
    try:
        fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    except OSError as error:  # named by the file asked for, not the temporary one
        raise type(error)(error.errno, error.strerror, path) from None
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp's are the owner's alone
    return os.fdopen(fd, "wb"), partial


def _snapshot(args) -> int:
    with _client(args) as client:
        s = client.snapshot(timeout=args.timeout)
    print(f"snapshot {s.path}: {s.events:,} events in {s.elapsed}")
    return 0


def _experiment(args) -> int:
    from abstream.clients.client import Experiment

    with _client(args) as client:
        if args.action == "list":
            plans = client.list_experiments()
        elif args.action == "stop":
            plans = [client.stop_experiment(args.test_id, at=args.at)]
        else:
            call = client.create_experiment if args.action == "create" else client.update_experiment
            plans = [call(args.test_id, control=args.control, split=args.split, start=args.start,
                          hypothesis=args.hypothesis)]
    _emit(_flat(plans), args.format, [f.name for f in fields(Experiment)])
    return 0


COMMANDS = {"ingest": _ingest, "summary": _summary, "segments": _segments, "timeseries": _timeseries, "lift": _lift,
            "tests": _tests, "quarantine": _quarantine, "snapshot": _snapshot, "power": _power,
            "experiment": _experiment, "import": _import, "delete-test": _delete_test, "erase-user": _erase_user,
            "retention": _retention, "export": _export}

def run() -> None:
    """The `abstream` command: main(), then out without the interpreter's teardown (collecting
    what a large ingest allocated, joining finished threads), once everything is written."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
