"""Every statement the cluster engine sends, as pure functions of the query: the schema, the inserts'
targets, and the per-shard aggregations.

Written in the subset that ClickHouse 18.16 (Debian's) and current ClickHouse (chDB, which the
tests run every statement on as well) both accept: no CTEs, window functions, DateTime64, TTL or
`startsWith`; `varPopStable` rather than `varPop`, which cancels catastrophically. Values are
inlined as literals (`literal`), so that one text runs on both.

Every aggregation runs on each shard's local table and returns partial results that the gateway
combines (engine.py). Events are sharded by `cityHash64(user_id)`, so each user's events live on
one shard: a per-user aggregation is shard-local, and distinct users of a group are the sum of
each shard's.
"""

from __future__ import annotations

import struct
from typing import Iterator

from abstream.core.timezones import Offsets
from abstream.core.types import Filters, Interval

EVENTS = "events"
QUARANTINE = "quarantine"
PRODUCERS = "producers"
EXPERIMENTS = "experiments"
#: Blocks a replica remembers to recognise a retried insert (ClickHouse's default is 100).
DEDUPLICATION_WINDOW = 10_000

_EVENT_COLUMNS = """
    ns Int64,
    ts DateTime DEFAULT toDateTime(intDiv(ns, 1000000000)),
    test_id String,
    variant String,
    user_id String,
    event_type String,
    conversion UInt8,
    revenue Float64,
    session_id String,
    device String,
    country String,
    batch String"""
_QUARANTINE_COLUMNS = """
    received_ns Int64,
    ts DateTime DEFAULT toDateTime(intDiv(received_ns, 1000000000)),
    idx Int64,
    field String,
    message String,
    timestamp Nullable(Int64),
    user_id String,
    test_id String,
    variant String,
    event_type String,
    conversion Int64,
    revenue Float64,
    session_id String,
    device String,
    country String,
    batch String"""
_PRODUCER_COLUMNS = """
    producer_id String,
    sequence UInt64"""
_EXPERIMENT_COLUMNS = """
    test_id String,
    definition String,
    updated_ns Int64"""

#: Local table -> (columns, engine arguments after the path, partition, order, sharding key).
TABLES = {
    EVENTS: (_EVENT_COLUMNS, "", "toYYYYMM(ts)", "(test_id, ns)", "cityHash64(user_id)"),
    QUARANTINE: (_QUARANTINE_COLUMNS, "", "toYYYYMM(ts)", "(received_ns, idx)", "cityHash64(batch)"),
    PRODUCERS: (_PRODUCER_COLUMNS, ", sequence", "tuple()", "producer_id", "cityHash64(producer_id)"),
    # every shard holds every plan (ClickHouseEngine.put_experiment): its sharding key is unused
    EXPERIMENTS: (_EXPERIMENT_COLUMNS, ", updated_ns", "tuple()", "test_id", "cityHash64(test_id)"),
}
#: Column names of each table, in order.
COLUMNS = {name: [line.split()[0] for line in spec[0].strip().splitlines()] for name, spec in TABLES.items()}


def literal(value: str | int | float) -> str:
    """A value as a ClickHouse literal; strings quoted with every backslash and quote escaped."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a literal: {value!r}")
    return repr(value)


def schema(database: str, cluster: str | None) -> list[str]:
    """The statements that create the schema: on a cluster, replicated local tables partitioned by
    month and a Distributed table over each; on one server (`cluster` None, as chDB), plain
    MergeTree tables and views in place of the Distributed ones."""
    on = f" ON CLUSTER {cluster}" if cluster else ""
    statements = [f"CREATE DATABASE IF NOT EXISTS {database}{on}"]
    for name, (columns, extra, partition, order, key) in TABLES.items():
        replacing = "Replacing" if name in (PRODUCERS, EXPERIMENTS) else ""
        if cluster:
            engine = (f"Replicated{replacing}MergeTree('/clickhouse/tables/{{shard}}/{database}/{name}_local', "
                      f"'{{replica}}'{extra})")
            settings = f" SETTINGS replicated_deduplication_window = {DEDUPLICATION_WINDOW}"
        else:
            engine, settings = f"{replacing}MergeTree({extra.lstrip(', ')})", ""
        statements.append(f"CREATE TABLE IF NOT EXISTS {database}.{name}_local{on} ({columns}\n) ENGINE = {engine} "
                          f"PARTITION BY {partition} ORDER BY {order}{settings}")
        if cluster:
            statements.append(f"CREATE TABLE IF NOT EXISTS {database}.{name}{on} AS {database}.{name}_local "
                              f"ENGINE = Distributed({cluster}, {database}, {name}_local, {key})")
        else:
            statements.append(f"CREATE VIEW IF NOT EXISTS {database}.{name} AS SELECT * FROM {database}.{name}_local")
    return statements


def _where(test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None = None) -> str:
    clauses = [f"test_id = {literal(test_id)}"]
    if start_ns is not None:
        clauses.append(f"ns >= {int(start_ns)}")
    if end_ns is not None:
        clauses.append(f"ns <= {int(end_ns)}")
    for name, value in (filters.items() if filters else []):
        clauses.append(f"{name} = {literal(value)}")
    return " AND ".join(clauses)


#: Per group: users, events, conversions, revenue, converted users, the population variance of
#: each user's revenue and conversions (their centered sums of squares once multiplied by users),
#: and the population covariance of the two (revenue per conversion's delta method).
_PER_GROUP = ("count() AS users, sum(e) AS events, sum(c) AS conversions, sum(r) AS revenue, "
              "countIf(c > 0) AS converted_users, varPopStable(r) AS revenue_var, varPopStable(c) AS conversions_var, "
              "covarPopStable(r, c) AS revenue_conversions_cov")
_PER_USER = "count() AS e, countIf(conversion = 1) AS c, sum(revenue) AS r"


def _per_user(event_type: str) -> str:
    """Per user: events, and conversions and revenue (of `event_type` only, if given)."""
    if not event_type:
        return _PER_USER
    t = literal(event_type)
    return f"count() AS e, countIf(conversion = 1 AND event_type = {t}) AS c, sumIf(revenue, event_type = {t}) AS r"


def _users(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None, keys: str,
           without_multi_variant_users: bool, metric_event_type: str, sessions: bool = False) -> str:
    """One shard's users per group (`keys`), with their events e, conversions c and revenue r
    (and with `sessions`, their distinct session ids s)."""
    where = _where(test_id, start_ns, end_ns, filters)
    if without_multi_variant_users:  # a user's events are all on one shard: the subquery is shard-local
        where += (f" AND user_id NOT IN (SELECT user_id FROM {local} WHERE {where} GROUP BY user_id "
                  "HAVING uniqExact(variant) > 1)")
    per_user = _per_user(metric_event_type) + (", uniqExact(session_id) AS s" if sessions else "")
    return f"SELECT {keys}, user_id, {per_user} FROM {local} WHERE {where} GROUP BY {keys}, user_id"


def group_stats(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                dimension: str | None, without_multi_variant_users: bool = False, metric_event_type: str = "") -> str:
    """Per variant (and segment value): the per-user sufficient statistics of one shard."""
    keys = "variant" + (f", {dimension}" if dimension else "")
    outer = "variant" + (f", {dimension} AS segment" if dimension else "")
    users = _users(local, test_id, start_ns, end_ns, filters, keys, without_multi_variant_users, metric_event_type)
    return f"SELECT {outer}, {_PER_GROUP} FROM ({users}) GROUP BY {keys}"


def session_stats(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                  dimension: str | None, without_multi_variant_users: bool = False, metric_event_type: str = "") -> str:
    """Per variant (and segment value) on one shard: users, the sums of each user's events,
    sessions and conversions, the population variances of events and sessions per user and the
    covariances of conversions and of events with sessions (the session metrics' delta method)."""
    keys = "variant" + (f", {dimension}" if dimension else "")
    outer = "variant" + (f", {dimension} AS segment" if dimension else "")
    users = _users(local, test_id, start_ns, end_ns, filters, keys, without_multi_variant_users, metric_event_type,
                   sessions=True)
    return (f"SELECT {outer}, count(), sum(e), sum(s), sum(c), varPopStable(e), varPopStable(s), "
            f"covarPopStable(c, s), covarPopStable(e, s) FROM ({users}) GROUP BY {keys}")


def exact_float(value: float) -> str:
    """A float64 as ClickHouse reads it back bit for bit (its decimal parser may round)."""
    return f"reinterpretAsFloat64(unhex('{struct.pack('<d', value).hex()}'))"


def revenue_counts(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                   without_multi_variant_users: bool, metric_event_type: str) -> str:
    """One shard's users per variant pooled: how many, with revenue, with negative revenue."""
    users = _users(local, test_id, start_ns, end_ns, filters, "variant", without_multi_variant_users, metric_event_type)
    return f"SELECT count(), countIf(r != 0), countIf(r < 0) FROM ({users})"


def revenue_extremes(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                     without_multi_variant_users: bool, metric_event_type: str, largest: bool, limit: int) -> str:
    """One shard's `limit` largest positive (or smallest negative) revenues per user."""
    users = _users(local, test_id, start_ns, end_ns, filters, "variant", without_multi_variant_users, metric_event_type)
    return (f"SELECT r FROM ({users}) WHERE r {'>' if largest else '<'} 0 ORDER BY r {'DESC' if largest else 'ASC'} "
            f"LIMIT {int(limit)}")


def capped_stats(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                 without_multi_variant_users: bool, metric_event_type: str, threshold: float) -> str:
    """Per variant on one shard: users, and the sum and variance of revenue per user capped at
    `threshold`, and the users above it."""
    users = _users(local, test_id, start_ns, end_ns, filters, "variant", without_multi_variant_users, metric_event_type)
    t = exact_float(threshold)
    return (f"SELECT variant, count(), sum(least(r, {t})), varPopStable(least(r, {t})), countIf(r > {t}) "
            f"FROM ({users}) GROUP BY variant")


def users_across_variants(local: str, test_id: str, start_ns: int | None, end_ns: int | None,
                          filters: Filters | None) -> str:
    """One shard's distinct users in range, and how many of them are in more than one variant."""
    return (f"SELECT count(), countIf(v > 1) FROM (SELECT user_id, uniqExact(variant) AS v FROM {local} "
            f"WHERE {_where(test_id, start_ns, end_ns, filters)} GROUP BY user_id)")


def scanned(local: str, test_id: str, start_ns: int | None, end_ns: int | None) -> str:
    """Events of the test in the range, before any filter (what a query reports it scanned)."""
    return f"SELECT count() FROM {local} WHERE {_where(test_id, start_ns, end_ns)}"


def _bucket(interval: Interval, offsets: Offsets | None = None) -> str:
    """A bucket's index, by fixed width from the interval's origin: of the UTC instant, or, in a
    time zone, of its wall-clock time (the instant plus the offsets the gateway computed)."""
    ns = "ns"
    if offsets is not None:
        cases = "".join(f"ns < {change}, {offset}, " for change, offset in zip(offsets.changes, offsets.offsets))
        ns = f"(ns + multiIf({cases}{offsets.offsets[-1]}))" if offsets.changes else f"(ns + {offsets.offsets[0]})"
    return f"intDiv({ns} - ({interval.origin_ns}), {interval.width_ns})"


def time_span(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None) -> str:
    """The first and last event in range, and how many there are."""
    return f"SELECT min(ns), max(ns), count() FROM {local} WHERE {_where(test_id, start_ns, end_ns, filters)}"


def buckets(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
            interval: Interval, offsets: Offsets | None = None) -> str:
    """Per (bucket, variant): events, conversions, revenue, distinct users and converted users."""
    return (f"SELECT {_bucket(interval, offsets)} AS bucket, variant, count() AS events, countIf(conversion = 1) AS conversions, "
            f"sum(revenue) AS revenue, uniqExact(user_id) AS users, uniqExactIf(user_id, conversion = 1) AS converted "
            f"FROM {local} WHERE {_where(test_id, start_ns, end_ns, filters)} GROUP BY bucket, variant")


def first_buckets(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                  interval: Interval, converted: bool, offsets: Offsets | None = None) -> str:
    """Per (bucket, variant): users whose first event (or first conversion) falls in the bucket,
    which running sums turn into running distinct counts."""
    where = _where(test_id, start_ns, end_ns, filters) + (" AND conversion = 1" if converted else "")
    return (f"SELECT first, variant, count() AS users FROM (SELECT variant, user_id, min({_bucket(interval, offsets)}) "
            f"AS first FROM {local} WHERE {where} GROUP BY variant, user_id) GROUP BY first, variant")


def cumulative_squares(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                       interval: Interval, offsets: Offsets | None, centers: dict[str, tuple[float, float]]) -> str:
    """Per (bucket, variant) on one shard: what the (user, bucket)s with revenue or a conversion
    change of sum((x - c)^2), sum((y - d)^2) and sum((x - c)(y - d)) over users' running totals
    of revenue x and conversions y (c, d: the variant's `centers`), from each user's total before
    the bucket to after it."""
    names = "[" + ", ".join(literal(v) for v in centers) + "]"
    c = f"transform(variant, {names}, [{', '.join(exact_float(x) for x, _ in centers.values())}], 0.)"
    d = f"transform(variant, {names}, [{', '.join(exact_float(y) for _, y in centers.values())}], 0.)"
    where = _where(test_id, start_ns, end_ns, filters) + " AND (conversion = 1 OR revenue != 0)"
    per_bucket = (f"SELECT variant, user_id, {_bucket(interval, offsets)} AS bucket, sum(revenue) AS dx, "
                  f"countIf(conversion = 1) AS dy FROM {local} WHERE {where} GROUP BY variant, user_id, bucket")
    per_user = (f"SELECT variant, arraySort(groupArray((bucket, dx, dy))) AS steps FROM ({per_bucket}) "
                "GROUP BY variant, user_id")
    steps = (f"SELECT variant, tupleElement(step, 1) AS b, after_x - {c} AS ax, after_x - tupleElement(step, 2) - {c} "
             f"AS bx, after_y - {d} AS ay, after_y - tupleElement(step, 3) - {d} AS by FROM ({per_user}) "
             "ARRAY JOIN steps AS step, arrayCumSum(arrayMap(s -> tupleElement(s, 2), steps)) AS after_x, "
             "arrayCumSum(arrayMap(s -> tupleElement(s, 3), steps)) AS after_y")
    return (f"SELECT b, variant, sum(ax * ax - bx * bx), sum(ay * ay - by * by), sum(ax * ay - bx * by) "
            f"FROM ({steps}) GROUP BY b, variant")


def _firsts(local: str, where: str) -> str:
    return f"SELECT variant, user_id, min(ns) AS first FROM {local} WHERE {where} GROUP BY variant, user_id"


def exposure_ages(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                  width_ns: int, until_ns: int) -> str:
    """Per variant and age (whole widths from a user's first event to `until_ns`): users."""
    firsts = _firsts(local, _where(test_id, start_ns, end_ns, filters))
    return f"SELECT variant, intDiv({int(until_ns)} - first, {int(width_ns)}) AS age, count() FROM ({firsts}) GROUP BY variant, age"


def exposure_stats(local: str, test_id: str, start_ns: int | None, end_ns: int | None, filters: Filters | None,
                   width_ns: int) -> str:
    """Per age k and variant: the per-user sufficient statistics of the users' events at age k
    (the users with any), as group_stats has them."""
    where = _where(test_id, start_ns, end_ns, filters)
    per_user = (f"SELECT variant, user_id, intDiv(ns - first, {int(width_ns)}) AS k, {_PER_USER} FROM {local} "
                f"ANY INNER JOIN ({_firsts(local, where)}) AS firsts USING (variant, user_id) WHERE {where} "
                "GROUP BY variant, user_id, k")
    return f"SELECT k, variant, {_PER_GROUP} FROM ({per_user}) GROUP BY k, variant"


def tests(local: str) -> str:
    """Per test: its variants, events, distinct users, first and last event."""
    return (f"SELECT test_id, groupUniqArray(variant) AS variants, count() AS events, uniqExact(user_id) AS users, "
            f"min(ns) AS first, max(ns) AS last FROM {local} WHERE batch != {literal(MARK)} GROUP BY test_id")


def _quarantine_where(test_id: str, test_prefix: str) -> str:
    clauses = [f"batch != {literal(MARK)}"]
    if test_id:
        clauses.append(f"test_id = {literal(test_id)}")
    if test_prefix:
        clauses.append(f"substring(test_id, 1, {len(test_prefix.encode())}) = {literal(test_prefix)}")
    return " AND ".join(clauses)


def quarantine(table: str, test_id: str, test_prefix: str, limit: int) -> str:
    """The newest rejected events (of a test, of tests with a prefix), newest first; an event of
    a batch sent again (its first try stored its rejected events, not its sequence) once: its
    rows differ by when each try was received, so ClickHouse stored both."""
    columns = ", ".join(c for c in COLUMNS[QUARANTINE] if c not in ("ts", "batch"))
    return (f"SELECT {columns} FROM {table} WHERE {_quarantine_where(test_id, test_prefix)} "
            f"ORDER BY received_ns DESC, idx DESC LIMIT 1 BY batch, idx LIMIT {int(limit)}")


def quarantine_count(table: str, test_id: str, test_prefix: str) -> str:
    return f"SELECT uniqExact(batch, idx) FROM {table} WHERE {_quarantine_where(test_id, test_prefix)}"


def last_sequence(table: str, producer_id: str) -> str:
    """Whether a producer has applied a batch, and its last sequence."""
    return f"SELECT count(), max(sequence) FROM {table} WHERE producer_id = {literal(producer_id)}"


def experiments(table: str) -> str:
    """Each test's latest plan (JSON), and its version."""
    return f"SELECT test_id, argMax(definition, updated_ns), max(updated_ns) FROM {table} GROUP BY test_id"


# ---- removals ------------------------------------------------------------------------------

#: The batch of the one row a removal adds to each partition it rewrites, after it: ClickHouse
#: 18.16 leaves a partition's last part inserted with a quorum out of every mutation until another
#: part follows it, so a removal would never finish. The rows have no test (no query sees them);
#: the next removal deletes them with its own rows.
MARK = "abstream:mark"


def test_rows(test_id: str) -> str:
    return f"test_id = {literal(test_id)}"


def user_rows(user_id: str, tests: list[str] | None) -> list[str]:
    """The user's rows (of `tests`), as conditions of at most MOST_CONDITION_BYTES each."""
    if not tests:
        return [f"user_id = {literal(user_id)}"]
    return [f"user_id = {literal(user_id)} AND test_id IN ({names})" for names in _in_pieces(map(literal, tests), ", ")]


def old_rows(horizons: dict[str, int], time_column: str = "ns") -> list[str]:
    """Each test's rows before its horizon (ns), as conditions of at most MOST_CONDITION_BYTES each."""
    return list(_in_pieces((f"(test_id = {literal(t)} AND {time_column} < {int(h)})"
                            for t, h in sorted(horizons.items())), " OR "))


def tests_received_before(table: str, ns: int) -> str:
    """The tests of the quarantined rows received before `ns`."""
    return f"SELECT DISTINCT test_id FROM {table} WHERE received_ns < {int(ns)} AND batch != {literal(MARK)}"


#: A removal's condition is cut into pieces of at most this many bytes, one statement each: a
#: retention sweep over thousands of tests made one statement past what a server parses.
MOST_CONDITION_BYTES = 1 << 20


def _in_pieces(terms, joiner: str) -> Iterator[str]:
    piece: list[str] = []
    size = 0
    for term in terms:
        if piece and size + len(term) + len(joiner) > MOST_CONDITION_BYTES:
            yield joiner.join(piece)
            piece, size = [], 0
        piece.append(term)
        size += len(term) + len(joiner)
    if piece:
        yield joiner.join(piece)


def count_rows(table: str, condition: str) -> str:
    return f"SELECT count() FROM {table} WHERE ({condition}) AND batch != {literal(MARK)}"


def delete_rows(table: str, condition: str) -> str:
    """The rows, and the marks earlier removals left, deleted (a mutation: applied in the background)."""
    return f"ALTER TABLE {table} DELETE WHERE ({condition}) OR batch = {literal(MARK)}"


def partitions(database: str, table: str) -> str:
    """The partitions of a local table's active parts on one replica."""
    return (f"SELECT DISTINCT partition FROM system.parts WHERE database = {literal(database)} "
            f"AND table = {literal(table)} AND active")


def mutations_pending(database: str, table: str) -> str:
    return (f"SELECT count() FROM system.mutations WHERE database = {literal(database)} AND table = {literal(table)} "
            "AND is_done = 0")


#: The stored columns an export gives, in the Event's field names (timestamp for ns).
EXPORTED = ("ns", "user_id", "test_id", "variant", "event_type", "conversion", "revenue", "session_id", "device",
            "country")


def export(local: str, test_id: str, start_ns: int | None, end_ns: int | None) -> str:
    """A test's events in range on one shard, in time order."""
    return f"SELECT {', '.join(EXPORTED)} FROM {local} WHERE {_where(test_id, start_ns, end_ns)} ORDER BY ns"
