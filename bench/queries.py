"""The benchmark's queries, each asked four ways: abstream over gRPC, abstream in-process, DuckDB,
and ClickHouse (chDB) in its own SQL.

Every way returns rows as tuples of plain values in the same order, so the answers can be
compared before any of their times is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from abstream.core import analysis
from abstream.core.types import AnalysisOptions
from abstream.store import Dimension, EventStore, Interval, SegmentsQuery, SummaryQuery, TimeseriesQuery
from abstream.v1 import analytics_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

NS = 1_000_000_000
_METRICS_SQL = """count(DISTINCT user_id), count(*) FILTER (WHERE conversion = 1), sum(revenue), count(*),
    count(DISTINCT user_id) FILTER (WHERE conversion = 1)"""
#: The same metrics in ClickHouse's SQL; exact distinct counts, as abstream's and DuckDB's are.
_CH_METRICS = ("uniqExact(user_id), countIf(conversion = 1), sum(revenue), count(), "
               "uniqExactIf(user_id, conversion = 1)")
_DIMENSIONS = {"device": (Dimension.DEVICE, pb.DIMENSION_DEVICE), "country": (Dimension.COUNTRY, pb.DIMENSION_COUNTRY),
               "event_type": (Dimension.EVENT_TYPE, pb.DIMENSION_EVENT_TYPE)}
_INTERVALS = {"hour": (Interval.HOUR, pb.INTERVAL_HOUR), "day": (Interval.DAY, pb.INTERVAL_DAY)}


@dataclass(frozen=True)
class Query:
    name: str
    test_id: str
    grpc: Callable[[Any], list[tuple]]
    local: Callable[[EventStore], list[tuple]]
    sql: str
    run: Callable[[EventStore], Any]  # the store's call alone, without turning its result into tuples
    rpc: Callable[[Any], Any]  # the RPC alone, without turning its response into tuples
    clickhouse: str  # the same question in ClickHouse's SQL


def _m(m) -> tuple:
    return (m.users, m.conversions, m.total_revenue, m.events, m.converted_users)


def _ts(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // NS, nanos=ns % NS)


#: An instant from microseconds since the epoch, in DuckDB's SQL and in ClickHouse's.
_MICROS = {"duckdb": "make_timestamp({})", "clickhouse": "fromUnixTimestamp64Micro(toInt64({}), 'UTC')"}


def _where(test_id: str, start_ns: int | None, end_ns: int | None, dialect: str = "duckdb") -> str:
    clauses = [f"test_id = '{test_id}'"]
    if start_ns is not None:
        clauses.append(f"timestamp >= {_MICROS[dialect].format(start_ns // 1000)}")
    if end_ns is not None:
        clauses.append(f"timestamp <= {_MICROS[dialect].format(end_ns // 1000)}")
    return " AND ".join(clauses)


def summary(test_id: str, start_ns: int | None = None, end_ns: int | None = None, name: str = "summary") -> Query:
    request = pb.SummaryRequest(test_id=test_id)
    if start_ns is not None:
        request.start_time.CopyFrom(_ts(start_ns))
    if end_ns is not None:
        request.end_time.CopyFrom(_ts(end_ns))

    def rpc(stub):
        return stub.Summary(request, timeout=60)

    def grpc_call(stub):
        return [(r.variant, *_m(r.metrics)) for r in rpc(stub).rows]

    def local(store):
        return [(r.variant, *_m(r.metrics)) for r in run(store).rows()]

    def run(store):  # with the analysis, as the server answers
        q = SummaryQuery(test_id, start_ns, end_ns)
        return analysis.summary(q, store.summary(q))

    sql = (f"SELECT variant, {_METRICS_SQL} FROM ab_test_events WHERE {_where(test_id, start_ns, end_ns)} "
           "GROUP BY variant ORDER BY variant")
    clickhouse = (f"SELECT variant, {_CH_METRICS} FROM ab_test_events "
                  f"WHERE {_where(test_id, start_ns, end_ns, 'clickhouse')} GROUP BY variant ORDER BY variant")
    return Query(name, test_id, grpc_call, local, sql, run, rpc, clickhouse)


def segments(test_id: str, dimension: str) -> Query:
    dim, pb_dim = _DIMENSIONS[dimension]

    def rpc(stub):
        return stub.Segments(pb.SegmentsRequest(test_id=test_id, dimension=pb_dim), timeout=60)

    def grpc_call(stub):
        return [(r.variant, r.segment, *_m(r.metrics)) for r in rpc(stub).rows]

    def local(store):
        return [(r.variant, r.segment, *_m(r.metrics)) for r in run(store).rows()]

    def run(store):
        q = SegmentsQuery(test_id, dim)
        return analysis.segments(q, store.segments(q))

    sql = (f"SELECT variant, {dimension}, {_METRICS_SQL} FROM ab_test_events WHERE {_where(test_id, None, None)} "
           f"GROUP BY variant, {dimension} ORDER BY variant, {dimension}")
    clickhouse = (f"SELECT variant, {dimension}, {_CH_METRICS} FROM ab_test_events "
                  f"WHERE {_where(test_id, None, None, 'clickhouse')} "
                  f"GROUP BY variant, {dimension} ORDER BY variant, {dimension}")
    return Query(f"segments_{dimension}", test_id, grpc_call, local, sql, run, rpc, clickhouse)


def timeseries(test_id: str, interval: str, cumulative: bool = False) -> Query:
    iv, pb_iv = _INTERVALS[interval]

    def rpc(stub):
        return stub.Timeseries(pb.TimeseriesRequest(test_id=test_id, interval=pb_iv, cumulative=cumulative),
                               timeout=60)

    def grpc_call(stub):
        return [(r.bucket_start.ToNanoseconds(), r.variant, *_m(r.metrics)) for r in rpc(stub).rows]

    def local(store):
        return [(r.bucket_start_ns, r.variant, *_m(r.metrics)) for r in run(store).rows()]

    def run(store):
        return store.timeseries(TimeseriesQuery(test_id, iv, cumulative=cumulative))

    trunc = f"date_trunc('{interval}', timestamp)"
    where = _where(test_id, None, None)
    if cumulative:
        # Each user counts in the bucket of their first event (first conversion); window sums
        # over buckets then give running distinct counts, as an analyst would write it.
        sql = f"""
            WITH ev AS (SELECT variant, user_id, conversion, revenue, {trunc} AS b FROM ab_test_events WHERE {where}),
            per AS (SELECT b, variant, count(*) AS events, count(*) FILTER (WHERE conversion = 1) AS conversions,
                           sum(revenue) AS revenue FROM ev GROUP BY b, variant),
            firsts AS (SELECT b, variant, count(*) AS users FROM
                         (SELECT variant, user_id, min(b) AS b FROM ev GROUP BY variant, user_id) GROUP BY b, variant),
            conv AS (SELECT b, variant, count(*) AS converted FROM
                       (SELECT variant, user_id, min(b) AS b FROM ev WHERE conversion = 1 GROUP BY variant, user_id)
                     GROUP BY b, variant),
            grid AS (SELECT bs.b, vs.variant FROM (SELECT DISTINCT b FROM ev) bs, (SELECT DISTINCT variant FROM ev) vs),
            running AS (
              SELECT grid.b, grid.variant,
                sum(coalesce(firsts.users, 0)) OVER w AS users,
                sum(coalesce(per.conversions, 0)) OVER w AS conversions,
                sum(coalesce(per.revenue, 0)) OVER w AS revenue,
                sum(coalesce(per.events, 0)) OVER w AS events,
                sum(coalesce(conv.converted, 0)) OVER w AS converted
              FROM grid LEFT JOIN per USING (b, variant) LEFT JOIN firsts USING (b, variant)
                LEFT JOIN conv USING (b, variant)
              WINDOW w AS (PARTITION BY grid.variant ORDER BY grid.b ROWS UNBOUNDED PRECEDING))
            SELECT epoch_ns(b) AS bucket, variant, users::BIGINT, conversions::BIGINT, revenue, events::BIGINT,
                   converted::BIGINT
            FROM running WHERE events > 0 ORDER BY bucket, variant"""
    start = {"hour": "toStartOfHour", "day": "toStartOfDay"}[interval]
    ch_where = _where(test_id, None, None, "clickhouse")
    if cumulative:
        # The same in ClickHouse's SQL (its LEFT JOIN gives 0 where nothing matches).
        clickhouse = f"""
            WITH ev AS (SELECT variant, user_id, conversion, revenue, {start}(timestamp) AS b
                        FROM ab_test_events WHERE {ch_where}),
            per AS (SELECT b, variant, count() AS n_events, countIf(conversion = 1) AS n_conversions,
                           sum(revenue) AS n_revenue FROM ev GROUP BY b, variant),
            firsts AS (SELECT first_b AS b, variant, count() AS n_users FROM
                         (SELECT variant, user_id, min(b) AS first_b FROM ev GROUP BY variant, user_id)
                       GROUP BY b, variant),
            conv AS (SELECT first_b AS b, variant, count() AS n_converted FROM
                       (SELECT variant, user_id, min(b) AS first_b FROM ev WHERE conversion = 1
                        GROUP BY variant, user_id)
                     GROUP BY b, variant),
            grid AS (SELECT b, variant
                     FROM (SELECT DISTINCT b FROM ev) AS bs CROSS JOIN (SELECT DISTINCT variant FROM ev) AS vs),
            running AS (
              SELECT b, variant, sum(n_users) OVER w AS users, sum(n_conversions) OVER w AS conversions,
                     sum(n_revenue) OVER w AS revenue, sum(n_events) OVER w AS events,
                     sum(n_converted) OVER w AS converted
              FROM grid LEFT JOIN per USING (b, variant) LEFT JOIN firsts USING (b, variant)
                LEFT JOIN conv USING (b, variant)
              WINDOW w AS (PARTITION BY variant ORDER BY b ROWS UNBOUNDED PRECEDING))
            SELECT toInt64(toUnixTimestamp(b)) * 1000000000 AS bucket, variant, toInt64(users), toInt64(conversions),
                   revenue, toInt64(events), toInt64(converted)
            FROM running WHERE events > 0 ORDER BY bucket, variant"""
    else:
        sql = (f"SELECT epoch_ns({trunc}) AS bucket, variant, {_METRICS_SQL} FROM ab_test_events WHERE {where} "
               f"GROUP BY bucket, variant ORDER BY bucket, variant")
        clickhouse = (f"SELECT toInt64(toUnixTimestamp({start}(timestamp))) * 1000000000 AS bucket, variant, "
                      f"{_CH_METRICS} FROM ab_test_events WHERE {ch_where} "
                      "GROUP BY bucket, variant ORDER BY bucket, variant")
    return Query(f"timeseries_{interval}{'_cumulative' if cumulative else ''}", test_id, grpc_call, local, sql, run,
                 rpc, clickhouse)


def _means(analysis, metric) -> list[tuple]:
    """(variant, mean of `metric`) for the control and each treatment, from an analysis's
    comparisons: the server's message (`metric` its enum) or the core's (`metric` its name)."""
    out = []
    for c in analysis.comparisons:
        if c.metric == metric:
            result = getattr(c, "result", c)
            if not out:
                out.append((analysis.control_variant, result.control_mean))
            out.append((c.variant, result.treatment_mean))
    return sorted(out)


def summary_sessions(test_id: str) -> Query:
    """Summary with conversions and events per session: every event's session id is read."""
    request = pb.SummaryRequest(test_id=test_id, analysis=pb.AnalysisOptions(session_metrics=True))

    def rpc(stub):
        return stub.Summary(request, timeout=60)

    def pairs(a, conversions, events):
        return [(v, c, e) for (v, c), (_, e) in zip(_means(a, conversions), _means(a, events))]

    def grpc_call(stub):
        return pairs(rpc(stub).analysis, pb.METRIC_CONVERSIONS_PER_SESSION, pb.METRIC_EVENTS_PER_SESSION)

    def local(store):
        return pairs(run(store).analysis, "conversions_per_session", "events_per_session")

    def run(store):
        q = SummaryQuery(test_id, analysis=AnalysisOptions(session_metrics=True))
        return analysis.summary(q, store.summary(q))

    # Ratios of per-user sums, as the delta method's means are.
    sql = f"""
        WITH u AS (SELECT variant, user_id, count(*) FILTER (WHERE conversion = 1) AS c, count(*) AS e,
                          count(DISTINCT session_id) AS s
                   FROM ab_test_events WHERE {_where(test_id, None, None)} GROUP BY variant, user_id)
        SELECT variant, sum(c) / sum(s), sum(e) / sum(s) FROM u GROUP BY variant ORDER BY variant"""
    clickhouse = f"""
        WITH u AS (SELECT variant, user_id, countIf(conversion = 1) AS c, count() AS e, uniqExact(session_id) AS s
                   FROM ab_test_events WHERE {_where(test_id, None, None, 'clickhouse')} GROUP BY variant, user_id)
        SELECT variant, sum(c) / sum(s), sum(e) / sum(s) FROM u GROUP BY variant ORDER BY variant"""
    return Query("summary_sessions", test_id, grpc_call, local, sql, run, rpc, clickhouse)


def lift(test_id: str, interval: str) -> Query:
    """The cumulative lift per bucket: its rows are cumulative Timeseries' (checked against
    DuckDB's), and each bucket's conversion means must be those rows' converted users / users."""
    iv, pb_iv = _INTERVALS[interval]
    cumulative = timeseries(test_id, interval, cumulative=True)

    def rpc(stub):
        return stub.Timeseries(pb.TimeseriesRequest(test_id=test_id, interval=pb_iv, cumulative=True, lift=True),
                               timeout=60)

    def checked(rows: list[tuple], lifts: list[tuple[int, list[tuple]]]) -> list[tuple]:
        rate = {(b, v): converted / users for b, v, users, _, _, _, converted in rows}
        agree = [b for b, means in lifts if all(abs(rate[(b, v)] - m) <= 1e-12 for v, m in means)]
        return rows if len(agree) == len({r[0] for r in rows}) else []

    def grpc_call(stub):
        r = rpc(stub)
        return checked([(x.bucket_start.ToNanoseconds(), x.variant, *_m(x.metrics)) for x in r.rows],
                       [(x.bucket_start.ToNanoseconds(), _means(x.analysis, pb.METRIC_CONVERSION)) for x in r.lifts])

    def local(store):
        r = run(store)
        return checked([(x.bucket_start_ns, x.variant, *_m(x.metrics)) for x in r.rows()],
                       [(b, _means(a, "conversion")) for b, a in r.lifts])

    def run(store):
        q = TimeseriesQuery(test_id, iv, cumulative=True, lift=AnalysisOptions())
        return analysis.lift(q, store.timeseries(q))

    return Query(f"lift_{interval}", test_id, grpc_call, local, cumulative.sql, run, rpc, cumulative.clickhouse)


def lift_by_exposure(test_id: str, interval: str) -> Query:
    """The lift by age since each user's first event: per age k, the conversion of the users old
    enough to have one (the range's last event at least k widths after their first), up to the
    oldest age any event has."""
    iv, pb_iv = _INTERVALS[interval]
    width = iv.width_ns

    def rpc(stub):
        return stub.Timeseries(pb.TimeseriesRequest(test_id=test_id, interval=pb_iv, lift=True,
                                                    since_first_exposure=True), timeout=60)

    def grpc_call(stub):
        return [(x.exposure.ToNanoseconds(), v, m) for x in rpc(stub).lifts
                for v, m in _means(x.analysis, pb.METRIC_CONVERSION)]

    def local(store):
        return [(b, v, m) for b, a in run(store).lifts for v, m in _means(a, "conversion")]

    def run(store):
        q = TimeseriesQuery(test_id, iv, lift=AnalysisOptions(), since_first_exposure=True)
        return analysis.lift(q, store.timeseries(q))

    sql = f"""
        WITH ev AS (SELECT variant, user_id, epoch_ns(timestamp) AS t, conversion FROM ab_test_events
                    WHERE {_where(test_id, None, None)}),
        f AS (SELECT variant, user_id, min(t) AS first FROM ev GROUP BY variant, user_id),
        old AS (SELECT variant, user_id, first, ((SELECT max(t) FROM ev) - first) // {width} AS age FROM f),
        aged AS (SELECT ev.variant, ev.user_id, ev.conversion, (ev.t - f.first) // {width} AS k
                 FROM ev JOIN f USING (variant, user_id)),
        conv AS (SELECT DISTINCT variant, user_id, k FROM aged WHERE conversion = 1),
        per AS (SELECT k.k, old.variant, count(*) AS users, count(conv.k) AS converted
                FROM old JOIN range(0, (SELECT max(k) FROM aged) + 1) AS k(k) ON k.k <= old.age
                LEFT JOIN conv ON conv.variant = old.variant AND conv.user_id = old.user_id AND conv.k = k.k
                GROUP BY k.k, old.variant)
        SELECT k * {width} AS age_ns, variant, converted / users FROM per ORDER BY age_ns, variant"""
    # The same in ClickHouse's SQL, without a row per user and age: the users old enough for age k
    # are a running sum of the users by age (capped at the oldest), from the oldest down.
    clickhouse = f"""
        WITH ev AS (SELECT variant, user_id, toUnixTimestamp64Nano(timestamp) AS t, conversion FROM ab_test_events
                    WHERE {_where(test_id, None, None, 'clickhouse')}),
        f AS (SELECT variant, user_id, min(t) AS first_t FROM ev GROUP BY variant, user_id),
        aged AS (SELECT variant, user_id, conversion, toUInt64(intDiv(t - first_t, {width})) AS k
                 FROM ev INNER JOIN f USING (variant, user_id)),
        conv AS (SELECT k, variant, count() AS converted
                 FROM (SELECT DISTINCT variant, user_id, k FROM aged WHERE conversion = 1) GROUP BY k, variant),
        ages AS (SELECT least(toUInt64(intDiv((SELECT max(t) FROM ev) - first_t, {width})), (SELECT max(k) FROM aged))
                          AS k, variant, count() AS n FROM f GROUP BY k, variant),
        grid AS (SELECT arrayJoin(range((SELECT max(k) FROM aged) + 1)) AS k, variant
                 FROM (SELECT DISTINCT variant FROM f)),
        per AS (SELECT k, variant, sum(n) OVER (PARTITION BY variant ORDER BY k DESC ROWS UNBOUNDED PRECEDING) AS users
                FROM grid LEFT JOIN ages USING (k, variant))
        SELECT toInt64(k) * {width} AS age_ns, variant, converted / users
        FROM per LEFT JOIN conv USING (k, variant) WHERE users > 0 ORDER BY age_ns, variant"""
    return Query(f"lift_{interval}_since_first_exposure", test_id, grpc_call, local, sql, run, rpc, clickhouse)


def list_tests() -> Query:
    def rpc(stub):
        return stub.ListTests(pb.ListTestsRequest(), timeout=60)

    def grpc_call(stub):
        return [(t.test_id, tuple(t.variants), t.events, t.users, t.first_event_time.ToNanoseconds(),
                 t.last_event_time.ToNanoseconds()) for t in rpc(stub).tests]

    def local(store):
        return [(t.test_id, tuple(t.variants), t.events, t.users, t.first_event_ns, t.last_event_ns)
                for t in run(store)]

    def run(store):
        return store.list_tests()

    sql = ("SELECT test_id, list_sort(list(DISTINCT variant)), count(*), count(DISTINCT user_id), "
           "epoch_ns(min(timestamp)), epoch_ns(max(timestamp)) FROM ab_test_events GROUP BY test_id ORDER BY test_id")
    clickhouse = ("SELECT test_id, arraySort(groupUniqArray(variant)), count(), uniqExact(user_id), "
                  "toUnixTimestamp64Nano(min(timestamp)), toUnixTimestamp64Nano(max(timestamp)) FROM ab_test_events "
                  "GROUP BY test_id ORDER BY test_id")
    return Query("list_tests", "*", grpc_call, local, sql, run, rpc, clickhouse)


def same(ours: list[tuple], theirs: list[tuple]) -> bool:
    """Exact for counts and keys; revenue (a float sum in another order) to 1e-9 relative."""
    if len(ours) != len(theirs):
        return False
    for a, b in zip(ours, theirs):
        if len(a) != len(b):
            return False
        for x, y in zip(a, b):
            if isinstance(x, float) or isinstance(y, float):
                if abs(float(x) - float(y)) > 1e-9 * max(1.0, abs(float(y))) + 1e-6:
                    return False
            elif isinstance(y, list):
                if tuple(y) != tuple(x):
                    return False
            elif x != y:
                return False
    return True
