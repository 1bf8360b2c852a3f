"""The benchmark's queries, each asked three ways: abstream over gRPC, abstream in-process, DuckDB.

Every way returns rows as tuples of plain values in the same order, so the three answers can be
compared before any of their times is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from abstream.core import analysis
from abstream.store import Dimension, EventStore, Interval, SegmentsQuery, SummaryQuery, TimeseriesQuery
from abstream.v1 import analytics_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

NS = 1_000_000_000
_METRICS_SQL = """count(DISTINCT user_id), count(*) FILTER (WHERE conversion = 1), sum(revenue), count(*),
    count(DISTINCT user_id) FILTER (WHERE conversion = 1)"""
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


def _m(m) -> tuple:
    return (m.users, m.conversions, m.total_revenue, m.events, m.converted_users)


def _ts(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // NS, nanos=ns % NS)


def _where(test_id: str, start_ns: int | None, end_ns: int | None) -> str:
    clauses = [f"test_id = '{test_id}'"]
    if start_ns is not None:
        clauses.append(f"timestamp >= make_timestamp({start_ns // 1000})")
    if end_ns is not None:
        clauses.append(f"timestamp <= make_timestamp({end_ns // 1000})")
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
    return Query(name, test_id, grpc_call, local, sql, run, rpc)


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
    return Query(f"segments_{dimension}", test_id, grpc_call, local, sql, run, rpc)


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
    else:
        sql = (f"SELECT epoch_ns({trunc}) AS bucket, variant, {_METRICS_SQL} FROM ab_test_events WHERE {where} "
               f"GROUP BY bucket, variant ORDER BY bucket, variant")
    return Query(f"timeseries_{interval}{'_cumulative' if cumulative else ''}", test_id, grpc_call, local, sql, run,
                 rpc)


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
    return Query("list_tests", "*", grpc_call, local, sql, run, rpc)


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
