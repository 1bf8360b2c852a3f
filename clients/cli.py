"""The `abstream` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import defaultdict
from typing import Any, Iterable, Iterator

EXAMPLES = """\
examples:
  abstream serve                                    # 127.0.0.1:50051, data in ./data
  abstream ingest events.ndjson                     # one JSON event per line, as users send them
  cat events.csv | abstream ingest --input-format csv -
  abstream tests
  abstream summary homepage_redesign --start "2023-01-01" --end "2023-12-31 23:59:59"
  abstream segments homepage_redesign country --format csv
  abstream timeseries homepage_redesign --interval hour --cumulative --format json
  abstream quarantine --limit 20
  abstream token checkout-team --scopes ingest,query --test-prefix checkout_ >> tokens.toml

Every command takes --addr (ABSTREAM_ADDR) and --token (ABSTREAM_TOKEN).
"""


#: Commands of the server side (service/cli.py).
SERVER_COMMANDS = {"serve": "run the server", "token": "make a token: prints it once, and the entry for the tokens file",
                   "clickhouse": "the ClickHouse cluster engine: `abstream clickhouse init` creates its schema",
                   "migrate": "copy an embedded data directory into a ClickHouse cluster"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abstream", description="Real-time A/B testing analytics over gRPC.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help in SERVER_COMMANDS.items():  # listed here, parsed by the service's own command
        commands.add_parser(name, help=help, add_help=False)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--addr", default=os.environ.get("ABSTREAM_ADDR", "127.0.0.1:50051"),
                       help="server address (env ABSTREAM_ADDR)")
        p.add_argument("--token", default=os.environ.get("ABSTREAM_TOKEN"), help="bearer token (env ABSTREAM_TOKEN)")
        p.add_argument("--timeout", type=float, default=60.0, help="deadline per call, seconds")
        return p

    ingest = client_command("ingest", "send events from NDJSON or CSV files (or - for standard input)")
    ingest.add_argument("files", nargs="+", metavar="FILE")
    ingest.add_argument("--input-format", choices=["auto", "ndjson", "csv"], default="auto",
                        help="auto: .csv files are CSV, everything else NDJSON")
    ingest.add_argument("--batch-size", type=int, default=1000)
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")

    def query_command(name: str, help: str) -> argparse.ArgumentParser:
        p = client_command(name, help)
        p.add_argument("--format", choices=["table", "json", "csv", "ndjson"], default="table")
        return p

    def ranged(p: argparse.ArgumentParser) -> None:
        p.add_argument("test_id")
        p.add_argument("--start", help="inclusive; 'YYYY-MM-DD[ HH:MM:SS]' or RFC 3339, UTC")
        p.add_argument("--end", help="inclusive; 'YYYY-MM-DD[ HH:MM:SS]' or RFC 3339, UTC")

    def filtered(p: argparse.ArgumentParser) -> None:
        for name in ("device", "country", "event_type"):
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"only events with this {name}")

    summary = query_command("summary", "per-variant results of a test, with comparisons to the control")
    ranged(summary)
    summary.add_argument("--control", default="", help="the control variant (default: 'control' or the first)")
    summary.add_argument("--sequential", action="store_true", help="confidence sequences (safe to peek)")
    segments = query_command("segments", "results per variant and device, country or event type")
    ranged(segments)
    segments.add_argument("dimension", choices=["device", "country", "event_type"])
    filtered(segments)
    timeseries = query_command("timeseries", "results per time bucket and variant")
    ranged(timeseries)
    timeseries.add_argument("--interval", choices=["minute", "hour", "day", "week"], default="day")
    timeseries.add_argument("--cumulative", action="store_true")
    filtered(timeseries)
    query_command("tests", "every test with its variants, events and users")
    quarantine = query_command("quarantine", "rejected events and why, newest first")
    quarantine.add_argument("--test-id", default="")
    quarantine.add_argument("--limit", type=int, default=100)
    client_command("snapshot", "write a snapshot now (admin)")

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVER_COMMANDS:  # the server starts from the service, not from here
        from abstream.service.cli import main as service_main

        return service_main(argv)
    args = parser.parse_args(argv)
    import grpc

    try:
        return COMMANDS[args.command](args)
    except grpc.RpcError as error:
        print(f"abstream {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2


# ---- ingest ----------------------------------------------------------------------------------

def _records(path: str, fmt: str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, event or None, why it could not be read) for every record of a file."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8", newline="")
    if fmt == "auto":
        fmt = "csv" if path.lower().endswith(".csv") else "ndjson"
    with stream:
        if fmt == "csv":
            reader = csv.DictReader(stream)
            for row in reader:
                yield reader.line_num, _typed(row), ""
            return
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, None, f"not valid JSON: {error.msg}"
                continue
            yield (number, event, "") if isinstance(event, dict) else (number, None, "not a JSON object")


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row with the numeric fields as numbers where they parse (the server judges the rest)."""
    event: dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
    for name, kind in (("conversion", int), ("revenue", float)):
        if name in event:
            try:
                event[name] = kind(float(event[name])) if kind is int and float(event[name]).is_integer() \
                    else kind(event[name])
            except ValueError:
                pass
    return event


def _ingest(args) -> int:
    from abstream.clients.producer import Delivery, Producer

    total_lines = sum(_count_lines(f) for f in args.files) if not args.quiet else 0
    show_progress = not args.quiet and total_lines > 10_000 and sys.stderr.isatty() or os.environ.get(
        "ABSTREAM_PROGRESS") == "1"
    futures: list[tuple[str, int, Any]] = []
    local_errors: list[tuple[str, int, str, str]] = []
    with Producer(args.addr, token=args.token, batch_size=args.batch_size, timeout=args.timeout) as producer:
        for path in args.files:
            for number, event, why in _records(path, args.input_format):
                if event is None:
                    local_errors.append((path, number, "line", why))
                    continue
                try:
                    futures.append((path, number, producer.send(event)))
                except (ValueError, TypeError) as error:
                    field = "timestamp" if "isoformat" in str(error) or "time" in str(error) else "line"
                    local_errors.append((path, number, field, str(error)))
                if show_progress and len(futures) % 10_000 == 0:
                    print(f"\r{len(futures):,} / {total_lines:,} events sent", end="", file=sys.stderr)
        producer.flush()
    if show_progress:
        print(file=sys.stderr)
    accepted = 0
    reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path, number, field, why in local_errors:
        reasons[(field, why)].append(f"{path}:{number}")
    for path, number, future in futures:
        try:
            delivery: Delivery = future.result()
        except Exception as error:  # noqa: BLE001 - reported with the others
            reasons[("send", str(error))].append(f"{path}:{number}")
            continue
        if delivery.accepted:
            accepted += 1
        else:
            reasons[(delivery.field, delivery.message)].append(f"{path}:{number}")
    rejected = sum(len(v) for v in reasons.values())
    print(f"accepted {accepted:,}, rejected {rejected:,}")
    for (field, why), where in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(where[:3]) + (f", … {len(where) - 3} more" if len(where) > 3 else "")
        print(f"  {len(where):,} × {field}: {why}  ({shown})")
    return 1 if rejected else 0


def _count_lines(path: str) -> int:
    if path == "-":
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# ---- queries ---------------------------------------------------------------------------------

def _client(args):
    from abstream.clients.client import Client

    return Client(args.addr, token=args.token, timeout=args.timeout)


def _flat(rows: Iterable) -> list[dict[str, Any]]:
    from dataclasses import asdict

    out = []
    for row in rows:
        record: dict[str, Any] = {}
        for key, value in asdict(row).items():
            if isinstance(value, dict) and key == "metrics":
                record.update(value)
            else:
                record[key] = value.isoformat() if hasattr(value, "isoformat") else value
        out.append(record)
    return out


def _emit(rows: list[dict[str, Any]], fmt: str, extra: dict[str, Any] | None = None) -> None:
    if fmt == "json":
        print(json.dumps({"rows": rows, **(extra or {})}, indent=2, ensure_ascii=False, default=str))
    elif fmt == "ndjson":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False, default=str))
    elif fmt == "csv":
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in r.items()}
                             for r in rows)
        print(buffer.getvalue(), end="")
    else:
        print(_table(rows))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]
    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _comparisons(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"variant": c.get("variant", ""), "metric": c.get("metric", "").replace("METRIC_", "").lower(),
             "control": c.get("control_mean", 0.0), "treatment": c.get("treatment_mean", 0.0),
             "lift": c.get("relative", {}).get("estimate", 0.0),
             "ci_low": c.get("relative", {}).get("ci_low", 0.0), "ci_high": c.get("relative", {}).get("ci_high", 0.0),
             "p_value": c.get("relative", {}).get("p_value", 1.0), "chance_to_win": c.get("chance_to_win", 0.0),
             "status": c.get("status", "").replace("COMPARISON_STATUS_", "").lower()}
            for c in analysis.get("comparisons", [])]


def _summary(args) -> int:
    options = {"control_variant": args.control, "sequential": args.sequential}
    with _client(args) as client:
        result = client.summary(args.test_id, args.start, args.end, analysis=options)
    rows = _flat(result.rows)
    if args.format != "table":
        _emit(rows, args.format, {"test_id": result.test_id, "analysis": result.analysis})
        return 0
    print(_table(rows))
    a = result.analysis
    if a.get("comparisons"):
        srm = "MISMATCH" if a.get("sample_ratio_mismatch") else "ok"
        print(f"\ncompared with {a.get('control_variant')!r} (relative lift; sample ratio {srm}, "
              f"p = {a.get('srm_p_value', 1.0):.4g}):")
        print(_table(_comparisons(a)))
    return 0


def _segments(args) -> int:
    with _client(args) as client:
        result = client.segments(args.test_id, args.dimension, args.start, args.end, device=args.device,
                                 country=args.country, event_type=args.event_type)
    _emit(_flat(result.rows), args.format, {"test_id": result.test_id, "analyses": result.analyses})
    return 0


def _timeseries(args) -> int:
    with _client(args) as client:
        result = client.timeseries(args.test_id, args.interval, args.start, args.end, cumulative=args.cumulative,
                                   device=args.device, country=args.country, event_type=args.event_type)
    _emit(_flat(result.rows), args.format)
    return 0


def _tests(args) -> int:
    with _client(args) as client:
        _emit(_flat(client.list_tests().rows), args.format)
    return 0


def _quarantine(args) -> int:
    with _client(args) as client:
        result = client.quarantine(args.test_id, args.limit)
    rows = _flat(result.rows)
    if args.format == "table":
        rows = [{k: (json.dumps(v, ensure_ascii=False) if k == "event" else v) for k, v in r.items()} for r in rows]
        print(_table(rows))
        print(f"\n{result.total:,} rejected events in quarantine")
    else:
        _emit(rows, args.format, {"total": result.total})
    return 0


def _snapshot(args) -> int:
    with _client(args) as client:
        response = client.snapshot()
    print(f"snapshot {response.path}: {response.events:,} events in {response.elapsed.ToTimedelta()}")
    return 0


COMMANDS = {"ingest": _ingest, "summary": _summary, "segments": _segments, "timeseries": _timeseries,
            "tests": _tests, "quarantine": _quarantine, "snapshot": _snapshot}

if __name__ == "__main__":
    sys.exit(main())
