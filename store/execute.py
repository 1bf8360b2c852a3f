"""Query execution over the published view: per-group metrics and per-user moments, no lock.

Every query of one test starts the same way (`Queries._scope`): capture the view, find the
test's code, binary-search each of its parts for the time range, scan the tails, apply the
filters, and check the caller's deadline. Then it groups with numpy kernels (kernels.py). The
analysis of the groups is the core's, not the engine's (core/analysis.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
from abstream.core import timezones
from abstream.core.errors import in_time
from abstream.core.events import EVENT_SCHEMA, string_buffers
from abstream.core.types import (
    CapApplied,
    Filters,
    GroupStats,
    Interval,
    MetricColumns,
    QueryStats,
    RevenueCap,
    SegmentsQuery,
    SummaryQuery,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
    UserMoments,
)
from abstream.store import kernels
from abstream.store.dictionary import Dictionary
from abstream.store.ingest import Ingest
from abstream.store.partition import NUMERIC, PartitionView, no_rows, rows_of
from abstream.store.rollup import COLUMNS as ROLLUP_COLUMNS
from abstream.store.rollup import HOUR_NS, HOURLY, Moments, Rollup, VariantTotals

_NO_START = np.iinfo(np.int64).min
_NO_END = np.iinfo(np.int64).max


@dataclass(frozen=True)
class _Scope:
    """The columns a query reads, of its test's events in range that pass its filters."""

    cols: dict[str, np.ndarray]
    scanned: int  # events in range, before the filters
    started_ns: int

    def stats(self) -> QueryStats:
        return QueryStats(self.scanned, time.perf_counter_ns() - self.started_ns)


def _rolled_up_stats(groups: list[Moments]) -> tuple[MetricColumns, UserMoments]:
    """The metrics and user moments of groups, from their rolled-up moments, in order."""
    (users, converted, conversions, revenue, m2_revenue, m2_conversions, comoment,
     events) = (np.array(column) for column in zip(*groups))
    return (MetricColumns(events=events, conversions=conversions, total_revenue=revenue, users=users,
                          converted_users=converted),
            UserMoments.of(users, converted, revenue, conversions, m2_revenue, m2_conversions, comoment))


class Queries:
    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest

    def summary(self, q: SummaryQuery) -> GroupStats:
        rolled = self._rolled_up(q)
        if rolled is not None:
            return rolled
        scope = self._scope(q.test_id, q.start_ns, q.end_ns, ["variant", "user_id", "conversion", "revenue"]
                            + (["event_type"] if q.analysis.metric_event_type else [])
                            + (["session_id"] if q.analysis.session_metrics else []), q.filters, q.deadline)
        cols = self._of_event_type(scope.cols, q.analysis.metric_event_type)
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        across: list = []  # distinct users, and those in several variants
        totals = kernels.group_totals(variant_id, cols["user_id"], cols["conversion"], cols["revenue"],
                                      len(variant_codes), across)
        users, several = across
        if q.analysis.exclude_multi_variant_users and len(several):
            keep = ~np.isin(cols["user_id"], several)
            cols = {c: rows_of(a, keep) for c, a in cols.items()}
            variant_id, variant_codes = self._rank("variant", cols["variant"])
            totals = kernels.group_totals(variant_id, cols["user_id"], cols["conversion"], cols["revenue"],
                                          len(variant_codes))
        in_time(q.deadline)
        moments = user_moments(variant_id, cols["user_id"], cols["conversion"], cols["revenue"], self._n_users(),
                               totals)
        cap = None
        if q.analysis.revenue_cap is not None:
            moments, cap = capped_moments(moments, variant_id, cols["user_id"], cols["revenue"], self._n_users(),
                                          q.analysis.revenue_cap)
        if q.analysis.session_metrics:
            moments = session_moments(moments, variant_id, cols, self._n_users())
        return GroupStats(self._ingest.dicts["variant"].decode(variant_codes), None, MetricColumns(**totals), moments,
                          scope.stats(), users, len(several), cap)

    def _rolled_up(self, q: SummaryQuery) -> GroupStats | None:
        """Summary from the test's rollup and its rows in the tail, when no option needs the
        events themselves (None: scan)."""
        a = q.analysis
        if (q.filters and q.filters.items()) or a.metric_event_type or a.revenue_cap is not None or a.session_metrics:
            return None
        started = time.perf_counter_ns()
        found = self._rollup(q.test_id, q.start_ns, q.end_ns)
        if found is None:
            return None
        rollup = found[0].merged(found[1], kept=False)
        if a.exclude_multi_variant_users and rollup.several:
            return None
        in_time(q.deadline)
        codes = self._name_order("variant", rollup.variants)
        metrics, moments = _rolled_up_stats([rollup.variants[c].moments() for c in codes.tolist()])
        return GroupStats(self._ingest.dicts["variant"].decode(codes), None, metrics, moments,
                          QueryStats(int(metrics.events.sum()), time.perf_counter_ns() - started), rollup.users,
                          rollup.several)

    def _rolled_up_series(self, q: TimeseriesQuery) -> TimeseriesResult | None:
        """Cumulative UTC hour, day or week buckets from the test's rollup and its rows in the
        tail: users count from the bucket of their first hour, converted users from that of
        their first conversion, events, conversions and revenue from each hour's (None: scan)."""
        if (not q.cumulative or q.lift is not None or q.since_first_exposure or q.time_zone
                or q.interval is Interval.MINUTE or (q.filters and q.filters.items())):
            return None
        started = time.perf_counter_ns()
        found = self._rollup(q.test_id, q.start_ns, q.end_ns, frozenset([HOURLY]))
        if found is None:
            return None
        rollup, tail = found
        width, origin = q.interval.width_ns, q.interval.origin_ns

        def bucket(hours: np.ndarray) -> np.ndarray:
            return (hours.astype(np.int64) * HOUR_NS - origin) // width

        codes = self._name_order("variant", set(rollup.variants) | set(np.unique(tail["variant"]).tolist()))
        series = []
        for code in codes.tolist():
            rows = np.flatnonzero(tail["variant"] == code)
            series.append(rollup.variants.get(code, VariantTotals()).series(
                *(tail[c][rows] for c in ("timestamp", "user_id", "conversion", "revenue")), bucket))
        buckets = kernels.distinct_values(np.concatenate([b for b, _ in series])) if series else np.zeros(0, np.int64)
        n_b, n_v = len(buckets), len(series)
        q.check_points(n_b, n_v)
        totals = {name: np.zeros((n_b, n_v), dtype=np.float64 if name == "total_revenue" else np.int64)
                  for name in ("events", "conversions", "total_revenue", "users", "converted_users")}
        for j, (own, values) in enumerate(series):
            at = np.searchsorted(buckets, own)
            for name, a in values.items():
                totals[name][at, j] = a
        totals = {name: np.cumsum(a, axis=0).reshape(-1) for name, a in totals.items()}
        keep = np.flatnonzero(totals["events"])
        b, v = np.divmod(keep, max(n_v, 1))
        return TimeseriesResult(test_id=q.test_id, interval=q.interval, cumulative=True,
                                bucket_start_ns=buckets[b] * width + origin,
                                variants=self._ingest.dicts["variant"].decode(codes[v]),
                                metrics=MetricColumns(**totals).take(keep),
                                stats=QueryStats(int(totals["events"][-n_v:].sum()) if n_b else 0,
                                                 time.perf_counter_ns() - started))

    def _rollup(self, test_id: str, start_ns: int | None, end_ns: int | None, holds: frozenset[str] = frozenset()
                ) -> tuple[Rollup, dict[str, np.ndarray]] | None:
        """The test's rollup and its rows in the tail (ROLLUP_COLUMNS), when the range holds all
        its sealed events; None when it does not, or when the test keeps no rollup holding
        `holds` yet (one is then asked for: whole-test answers are wanted)."""
        view = self._ingest.view
        test = self._ingest.tests.code(test_id)
        if test is None:
            return None
        partition = view.partitions.get(test)
        if partition is None:  # nothing sealed yet: asked for whole, it keeps one from a seal on
            if start_ns is None and end_ns is None:
                self._ingest.want_rollup(test, holds)
            return None
        start = _NO_START if start_ns is None else start_ns
        end = _NO_END if end_ns is None else end_ns
        if partition.first_ns < start or partition.last_ns > end:
            return None
        if partition.rollup is None or not holds <= partition.rollup.holds:
            self._ingest.want_rollup(test, holds)
            return None
        pieces = [[tail[c][at] for c in ROLLUP_COLUMNS] for tail in view.tails if len(tail["timestamp"])
                  for at in [np.flatnonzero((tail["test"] == test) & (tail["timestamp"] >= start)
                                            & (tail["timestamp"] <= end))]]
        return partition.rollup, {c: np.concatenate([piece[i] for piece in pieces]) if pieces else
                                  np.zeros(0, np.int64) for i, c in enumerate(ROLLUP_COLUMNS)}

    def _name_order(self, name: str, codes) -> np.ndarray:
        """One column's codes, in the order of their strings."""
        return self._rank(name, np.array(sorted(codes), dtype=np.int64))[1]

    def _of_event_type(self, cols: dict[str, np.ndarray], event_type: str) -> dict[str, np.ndarray]:
        """Conversions and revenue kept only on events of `event_type` (every event is kept: its
        user counts whatever the event's type)."""
        if not event_type:
            return cols
        code = self._ingest.dicts["event_type"].code(event_type)
        of_type = np.zeros(len(cols["event_type"]), dtype=bool) if code is None else cols["event_type"] == code
        return {**cols, "conversion": np.where(of_type, cols["conversion"], 0).astype(cols["conversion"].dtype),
                "revenue": np.where(of_type, cols["revenue"], 0.0)}

    def count_events(self, test_id: str, start_ns: int | None, end_ns: int | None) -> int:
        """Events of a test in range (the health checks' events before the start, after now)."""
        return self._scope(test_id, start_ns, end_ns, ["conversion"], None, None).scanned

    def segments(self, q: SegmentsQuery) -> GroupStats:
        rolled = self._rolled_up_segments(q)
        if rolled is not None:
            return rolled
        dim = q.dimension.value
        scope = self._scope(q.test_id, q.start_ns, q.end_ns, list(dict.fromkeys(
            ["variant", "user_id", "conversion", "revenue", dim]
            + (["event_type"] if q.analysis.metric_event_type else [])
            + (["session_id"] if q.analysis.session_metrics else []))), q.filters, q.deadline)
        cols = self._of_event_type(scope.cols, q.analysis.metric_event_type)
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        segment_id, segment_codes = self._rank(dim, cols[dim])
        n_seg = len(segment_codes)
        q.check_groups(n_seg, len(variant_codes))
        group = variant_id * n_seg + segment_id
        totals = kernels.group_totals(group, cols["user_id"], cols["conversion"], cols["revenue"],
                                      len(variant_codes) * n_seg)
        in_time(q.deadline)
        moments = user_moments(group, cols["user_id"], cols["conversion"], cols["revenue"], self._n_users(), totals)
        if q.analysis.session_metrics:
            moments = session_moments(moments, group, cols, self._n_users())
        keep = np.flatnonzero(totals["events"])
        v, s = np.divmod(keep, max(n_seg, 1))
        return GroupStats(self._ingest.dicts["variant"].decode(variant_codes[v]),
                          self._ingest.dicts[dim].decode(segment_codes[s]), MetricColumns(**totals).take(keep),
                          moments.take(keep), scope.stats())

    def _rolled_up_segments(self, q: SegmentsQuery) -> GroupStats | None:
        """Segments from the test's per-(variant, segment) totals and its rows in the tail, when
        no option needs the events themselves (None: scan)."""
        a = q.analysis
        if (q.filters and q.filters.items()) or a.metric_event_type or a.session_metrics:
            return None
        started = time.perf_counter_ns()
        dim = q.dimension.value
        found = self._rollup(q.test_id, q.start_ns, q.end_ns, frozenset([dim]))
        if found is None:
            return None
        groups = found[0].segment_moments(dim, found[1])
        in_time(q.deadline)
        variant_codes = self._name_order("variant", {v for v, _ in groups})
        segment_codes = self._name_order(dim, {s for _, s in groups})
        q.check_groups(len(segment_codes), len(variant_codes))
        keys = [(v, s) for v in variant_codes.tolist() for s in segment_codes.tolist() if (v, s) in groups]
        if not keys:
            return None
        metrics, moments = _rolled_up_stats([groups[k] for k in keys])
        return GroupStats(self._ingest.dicts["variant"].decode(np.array([v for v, _ in keys], dtype=np.int64)),
                          self._ingest.dicts[dim].decode(np.array([s for _, s in keys], dtype=np.int64)),
                          metrics, moments, QueryStats(int(metrics.events.sum()), time.perf_counter_ns() - started))

    def timeseries(self, q: TimeseriesQuery) -> TimeseriesResult:
        if q.since_first_exposure:
            return self._by_exposure(q)
        rolled = self._rolled_up_series(q)
        if rolled is not None:
            return rolled
        scope = self._scope(q.test_id, q.start_ns, q.end_ns, ["timestamp", "variant", "user_id", "conversion",
                                                               "revenue"], q.filters, q.deadline)
        cols = scope.cols
        interval = q.interval
        ts = cols["timestamp"]
        if q.time_zone and len(ts):
            local = timezones.offsets(q.time_zone, int(ts.min()), int(ts.max())).local_ns(ts)
            bucket_id, buckets = kernels.dense_ids(timezones.bucket_index(local, interval))
            starts = timezones.bucket_starts(q.time_zone, interval, buckets)
        else:
            bucket_id, buckets = kernels.dense_ids(kernels.bucket_index(ts, interval.origin_ns, interval.width_ns))
            starts = buckets * interval.width_ns + interval.origin_ns
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        n_b, n_v = len(buckets), len(variant_codes)
        q.check_points(n_b, n_v)
        moments = None
        if q.cumulative:
            totals = kernels.cumulative_totals(bucket_id, variant_id, cols["user_id"], cols["conversion"],
                                               cols["revenue"], n_b, n_v, self._n_users())
            if q.lift is not None and n_b:
                moments = cumulative_moments(bucket_id, variant_id, cols["user_id"], cols["conversion"],
                                             cols["revenue"], self._n_users(), totals)
            totals = {name: a.reshape(-1) for name, a in totals.items()}
        else:
            totals = kernels.group_totals(bucket_id * n_v + variant_id, cols["user_id"], cols["conversion"],
                                          cols["revenue"], n_b * n_v)
        keep = np.flatnonzero(totals["events"])
        b, v = np.divmod(keep, max(n_v, 1))
        return TimeseriesResult(
            test_id=q.test_id,
            interval=interval,
            cumulative=q.cumulative,
            bucket_start_ns=starts[b],
            variants=self._ingest.dicts["variant"].decode(variant_codes[v]),
            metrics=MetricColumns(**totals).take(keep),
            stats=scope.stats(),
            moments=moments.take(keep) if moments is not None else None,
        )

    def _by_exposure(self, q: TimeseriesQuery) -> TimeseriesResult:
        """Per age k (k widths since a user's first event in the variant) and variant: the users
        old enough to have an age k by the end of the range, and their day-k metrics (zero for
        those without events then), with the moments the lift needs."""
        scope = self._scope(q.test_id, q.start_ns, q.end_ns, ["timestamp", "variant", "user_id", "conversion",
                                                               "revenue"], q.filters, q.deadline)
        cols, width = scope.cols, q.interval.width_ns
        ts = cols["timestamp"]
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        n_v, n_users = len(variant_codes), self._n_users()
        unit_of, first, unit_variant = kernels.first_per_key(variant_id * n_users + cols["user_id"], ts, n_users)
        age = ((q.end_ns if q.end_ns is not None else int(ts.max()) if len(ts) else 0) - first) // width
        k = (ts - first[unit_of]) // width
        n_k = int(k.max()) + 1 if len(k) else 0
        q.check_points(n_k, n_v)
        eligible = np.bincount(np.minimum(age, n_k - 1) * n_v + unit_variant, minlength=n_k * n_v).reshape(n_k, n_v)
        users = np.cumsum(eligible[::-1], axis=0)[::-1].reshape(-1)  # old enough for age k: age >= k
        group = k * n_v + variant_id
        totals = kernels.group_totals(group, cols["user_id"], cols["conversion"], cols["revenue"], n_k * n_v)
        totals["users"] = users
        in_time(q.deadline)
        moments = user_moments(group, cols["user_id"], cols["conversion"], cols["revenue"], n_users, totals)
        keep = np.flatnonzero(users)
        ages, v = np.divmod(keep, max(n_v, 1))
        return TimeseriesResult(test_id=q.test_id, interval=q.interval, cumulative=False,
                                bucket_start_ns=ages * width, variants=self._ingest.dicts["variant"].decode(
                                    variant_codes[v]), metrics=MetricColumns(**totals).take(keep),
                                stats=scope.stats(), moments=moments.take(keep), since_first_exposure=True)

    def list_tests(self) -> list[TestInfo]:
        """Every test with its variants, events, distinct users and first and last event time, from
        the counters kept per part; only the tail's rows are read."""
        ingest = self._ingest
        view = ingest.view
        tail = view.tail
        order = np.argsort(tail["test"], kind="stable")
        tail_tests = tail["test"][order]
        bounds = np.flatnonzero(np.diff(tail_tests)) + 1
        in_tail = {int(tail_tests[lo]): order[lo:hi] for lo, hi in
                   zip([0, *bounds.tolist()], [*bounds.tolist(), len(tail_tests)]) if hi > lo}
        codes = sorted(set(view.partitions) | set(in_tail))
        names = ingest.tests.decode(np.array(codes, dtype=np.int64))
        variant_names = ingest.dicts["variant"]
        tests = []
        for code, name in zip(codes, names):
            p = view.partitions.get(code, PartitionView())
            events, users, first, last, variants = p.events, p.users, p.first_ns, p.last_ns, set(p.variants)
            rows = in_tail.get(code)
            if rows is not None:
                ts = tail["timestamp"][rows]
                tail_users = kernels.distinct_values(tail["user_id"][rows])
                events += len(rows)
                users += int(np.count_nonzero(~p.has_users(tail_users)))
                first, last = min(first, int(ts.min())), max(last, int(ts.max()))
                variants |= set(kernels.distinct_values(tail["variant"][rows]).tolist())
            decoded = variant_names.decode(np.array(sorted(variants), dtype=np.int64))
            tests.append(TestInfo(name, sorted(decoded), events, users, first, last))
        return sorted(tests, key=lambda t: t.test_id)

    def export(self, test_id: str, start_ns: int | None = None, end_ns: int | None = None,
               rows: int = 100_000) -> Iterator[pa.Table]:
        """A test's events as stored (event field names, strings decoded), `rows` at a time: part
        by part (each in time order), then the unsorted tail, so that no more than `rows` events are
        decoded at once (and the dictionaries' packed values they name unpacked once, for the
        whole export). A consistent cut: the parts and a copy of the tail are taken under the
        ingest lock (for as long as copying the tail takes)."""
        ingest = self._ingest
        with ingest.lock:
            ingest.wait_sealed()
            view = ingest.view
            tail_tests, tail = ingest.tail.copy()
        test = ingest.tests.code(test_id)
        if test is None:
            return
        start = _NO_START if start_ns is None else start_ns
        end = _NO_END if end_ns is None else end_ns
        partition = view.partitions.get(test)
        unpacked: dict[Dictionary, dict[int, pa.Array]] = {}  # at most every value of each, once
        for part in partition.parts if partition else ():
            if part.last_ns < start or part.first_ns > end:
                continue
            span = part.time_slice(start, end)
            for lo in range(span.start, span.stop, rows):
                piece = slice(lo, min(lo + rows, span.stop))
                yield self._decoded(test_id, {c: part.column(c, piece) for c in NUMERIC},
                                    part.strings("session_id", piece), unpacked)
        ts = tail["timestamp"]
        picked = np.flatnonzero((tail_tests == test) & (ts >= start) & (ts <= end))
        for lo in range(0, len(picked), rows):
            at = picked[lo:lo + rows]
            yield self._decoded(test_id, {c: tail[c][at] for c in NUMERIC},
                                tail["session_id"].take(pa.array(at, pa.int64())), unpacked)

    def _decoded(self, test_id: str, cols: dict[str, np.ndarray], sessions: pa.Array,
                 unpacked: dict[Dictionary, dict[int, pa.Array]]) -> pa.Table:
        """One page of events as sent; `unpacked`: dictionary chunks unpacked for earlier pages
        (by dictionary: an erasure meanwhile replaces the user ids' one)."""
        dicts = self._ingest.dicts
        n = len(cols["timestamp"])
        columns = {
            "timestamp": pa.array(cols["timestamp"], pa.int64()),
            **{name: dicts[name].take(cols[name], unpacked.setdefault(dicts[name], {})) for name in
               ("user_id", "variant", "event_type", "device", "country")},
            "test_id": pa.array([test_id] * n, pa.string()),
            "conversion": pa.array(cols["conversion"].astype(np.int64)),
            "revenue": pa.array(cols["revenue"]),
            "session_id": sessions,
        }
        return pa.table([columns[f.name] for f in EVENT_SCHEMA], schema=EVENT_SCHEMA)

    # ---- the shared setup -------------------------------------------------------------------

    def _scope(self, test_id: str, start_ns: int | None, end_ns: int | None, names: list[str],
               filters: Filters | None, deadline: float | None) -> _Scope:
        started = time.perf_counter_ns()
        ingest = self._ingest
        view = ingest.view  # captured before the lookup: codes it holds are already in the dictionary
        test = ingest.tests.code(test_id)
        start = _NO_START if start_ns is None else start_ns
        end = _NO_END if end_ns is None else end_ns
        filter_names = [name for name, _ in filters.items()] if filters else []
        wanted = list(dict.fromkeys(names + filter_names))
        if test is None:
            cols = no_rows(wanted)
        else:
            cols = view.select(test, start, end, wanted)
        scanned = len(cols[wanted[0]])
        if filter_names:
            mask = np.ones(scanned, dtype=bool)
            for name, value in filters.items():
                code = ingest.dicts[name].code(value)
                mask &= False if code is None else cols[name] == code
            cols = {c: rows_of(cols[c], mask) for c in names}
        in_time(deadline)
        return _Scope(cols, scanned, started)

    def _rank(self, name: str, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense ids for one column's codes, ordered by the decoded strings."""
        d = self._ingest.dicts[name]

        def by_name(present: np.ndarray) -> np.ndarray:
            names = d.decode(present)
            return np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)

        return kernels.ranked_codes(codes.astype(np.int64), len(d), by_name)

    def _n_users(self) -> int:
        return max(len(self._ingest.dicts["user_id"]), 1)




def user_moments(group: np.ndarray, user: np.ndarray, conversion: np.ndarray, revenue: np.ndarray,
                 n_users_total: int, totals: dict[str, np.ndarray]) -> UserMoments:
    """Moments of the per-user metrics per group, from the rows that carry a value only (a
    conversion or revenue: few, and found in a bool mask, the fast case of nonzero)."""
    active = np.flatnonzero(conversion.astype(bool) | (revenue != 0))
    m2 = kernels.centered_user_moments(
        group[active], user[active], revenue[active], conversion[active].astype(bool), n_users_total, totals["users"],
        totals["total_revenue"].astype(np.float64), totals["conversions"].astype(np.float64))
    return UserMoments.of(totals["users"], totals["converted_users"], totals["total_revenue"], totals["conversions"], *m2)


def capped_moments(moments: UserMoments, group: np.ndarray, user: np.ndarray, revenue: np.ndarray,
                   n_users_total: int, cap: RevenueCap) -> tuple[UserMoments, CapApplied]:
    """The moments with revenue per user capped beside them: at the cap's value, or at its
    percentile of every group's users pooled (RevenueCap.rank)."""
    rows = np.flatnonzero(revenue != 0)
    group_of, total = kernels.user_sums(group[rows], user[rows], revenue[rows], n_users_total)
    nonzero = total[total != 0]
    pooled = len(nonzero) if cap.nonzero_only else int(moments.users.sum())
    if cap.value:
        threshold = cap.value
    elif pooled:
        threshold = kernels.kth_smallest(nonzero, 0 if cap.nonzero_only else pooled - len(nonzero), cap.rank(pooled))
    else:
        return moments, CapApplied(cap, math.nan, 0, 0)
    sums, m2, lowered = kernels.capped_user_moments(group_of, total, moments.users, threshold)
    return moments.capped(sums, m2), CapApplied(cap, threshold, pooled, lowered)


def session_moments(moments: UserMoments, group: np.ndarray, cols: dict, n_users_total: int) -> UserMoments:
    """The moments with each group's per-user events and sessions beside them (SESSION_METRICS):
    sessions are the distinct session ids of each user's events here."""
    sessions = string_buffers(cols["session_id"])
    return moments.with_sessions(*kernels.session_user_moments(group, cols["user_id"], sessions, cols["conversion"],
                                                               n_users_total, len(moments.users)))


def cumulative_moments(bucket: np.ndarray, variant: np.ndarray, user: np.ndarray, conversion: np.ndarray,
                       revenue: np.ndarray, n_users_total: int, totals: dict[str, np.ndarray]) -> UserMoments:
    """Per (bucket, variant), flattened, the user moments of everything up to the bucket's end."""
    active = np.flatnonzero(conversion.astype(bool) | (revenue != 0))
    m2 = kernels.cumulative_user_moments(
        bucket[active], variant[active], user[active], revenue[active], conversion[active].astype(bool),
        n_users_total, totals["users"], totals["total_revenue"], totals["conversions"].astype(np.float64))
    return UserMoments.of(totals["users"], totals["converted_users"], totals["total_revenue"], totals["conversions"], *m2)
