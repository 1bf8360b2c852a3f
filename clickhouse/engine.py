"""The cluster engine: the same contract as the embedded one, served by stateless gateways over a
ClickHouse cluster (core/engine.py).

Ingest: the core has checked every event; a batch's valid events are inserted through the
Distributed table, sharded by user, and acknowledged once each shard's part is on a quorum of
replicas (`insert_quorum`); reads ask for sequential consistency, so an acked batch is seen by
the very next query through any gateway. Exactly once: a tagged batch is skipped when its
producer's last sequence (kept in the cluster) is not below it; a retry after a crash that came
before that sequence was recorded forms the same blocks again (the rows carry their batch's
producer and sequence, never anything random), and each shard's replicas drop blocks they have
seen among their last `DEDUPLICATION_WINDOW`. An untagged batch carries a random id, so that two
identical untagged batches are both stored, as the embedded engine does.

Queries: each shard computes per-(variant, user) statistics of its own users and reduces them to
per-variant sufficient statistics (counts, sums, centered sums of squares); the gateway merges
the shards' partials (Chan's formula for the squares) and the core runs the same analysis as for
the embedded engine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from abstream.clickhouse import sql
from abstream.clickhouse.backend import Cluster, Local
from abstream.core import timezones
from abstream.core.engine import Gauge
from abstream.core.errors import AbstreamError, Unavailable
from abstream.core.events import EVENT_SCHEMA, cut_to_limit
from abstream.core.types import (
    CapApplied,
    Experiment,
    GroupStats,
    IngestResult,
    MetricColumns,
    QuarantinedEvent,
    QueryStats,
    SegmentsQuery,
    SnapshotInfo,
    SummaryQuery,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
    UserMoments,
    ValidatedBatch,
    about_means,
)

#: How long a gateway uses the plans it read before reading them again.
PLANS_TTL_S = 1.0


@dataclass(frozen=True)
class PreparedInsert:
    events: dict[str, list]
    quarantine: dict[str, list]
    rejections: list
    producer_id: str
    sequence: int


#: How long a removal waits for every replica to have applied it.
REMOVAL_TIMEOUT_S = 600.0
_DAY_NS = 86_400 * 10**9


class ClickHouseEngine:
    name = "clickhouse"
    groups_producer_batches = False  # a retry must form the same blocks again: each request is its own
    remote_plans = True

    def __init__(self, backend: Cluster | Local) -> None:
        self._b = backend
        self._plans: tuple[float, dict[str, Experiment]] = (0.0, {})
        self._versions: dict[str, int] = {}  # the newest version of each test's plan, a deletion's too
        self._reading_plans = threading.Lock()
        self._written_at = 0.0  # time.monotonic() of this gateway's last write of a plan
        self._closed = threading.Event()  # a removal waiting for its replicas stops waiting

    @property
    def database(self) -> str:
        return self._b.database

    @classmethod
    def opened(cls, backend: Cluster | Local) -> ClickHouseEngine:
        """The engine over a backend whose schema exists (`abstream clickhouse init` makes it)."""
        (present,), = backend.query(f"EXISTS TABLE {backend.table(sql.EVENTS)}")
        if not present:
            backend.close()
            raise AbstreamError(f"{backend.table(sql.EVENTS)} does not exist: create the schema first with "
                                "`abstream clickhouse init` (the same --clickhouse, --clickhouse-cluster and "
                                "--clickhouse-database)")
        return cls(backend)

    def init_schema(self) -> None:
        """Creates what is missing of the schema (ON CLUSTER on a cluster)."""
        for statement in sql.schema(self._b.database, self._b.cluster):
            self._b.execute(statement)

    # ---- ingest ---------------------------------------------------------------------------

    def prepare(self, batch: ValidatedBatch) -> PreparedInsert:
        """The batch's valid events and its rejected ones as columns for their tables."""
        table, rejections = batch.table, batch.rejections
        tag = f"{batch.producer_id}:{batch.sequence}" if batch.producer_id else f"untagged:{uuid.uuid4()}"
        valid = np.flatnonzero(batch.valid)
        good = table.take(pa.array(valid)) if len(valid) < table.num_rows else table
        ns = good.column("timestamp").to_numpy()
        events = {
            "ns": ns.tolist(),
            **{name: _strings(good.column(name)) for name in ("test_id", "variant", "user_id", "event_type",
                                                              "session_id", "device", "country")},
            "conversion": good.column("conversion").to_numpy().astype(np.uint8).tolist(),
            "revenue": good.column("revenue").to_numpy().astype(np.float64).tolist(),
            "batch": [tag] * len(valid),
        }
        quarantine = {}
        if kept := [r for r in rejections if r.quarantined]:
            rejected = table.take(pa.array([r.index for r in kept], pa.int64()))
            n = len(kept)
            quarantine = {
                "received_ns": [batch.received_ns] * n,
                "idx": [r.index for r in kept], "field": [r.field for r in kept],
                "message": [r.message for r in kept],
                "timestamp": rejected.column("timestamp").to_pylist(),
                **{name: _strings(rejected.column(name), cut=True) for name in (
                    "user_id", "test_id", "variant", "event_type", "session_id", "device", "country")},
                "conversion": [int(v) for v in rejected.column("conversion").fill_null(0).to_pylist()],
                "revenue": [float(v) for v in rejected.column("revenue").fill_null(0.0).to_pylist()],
                "batch": [tag] * n,
            }
        return PreparedInsert(events, quarantine, list(rejections), batch.producer_id, batch.sequence)

    def apply(self, p: PreparedInsert) -> IngestResult:
        """Inserts the batch; returns once it is on a quorum of replicas of every shard."""
        if p.producer_id:
            (seen,), (last,) = self._b.query(sql.last_sequence(self._b.table(sql.PRODUCERS), p.producer_id))
            if seen and p.sequence <= last:
                return IngestResult(0, [], duplicate=True)
        accepted = len(p.events["ns"])
        if accepted:
            self._b.insert(sql.EVENTS, p.events)
        if p.quarantine:
            self._b.insert(sql.QUARANTINE, p.quarantine)
        if p.producer_id:
            self._b.insert(sql.PRODUCERS, {"producer_id": [p.producer_id], "sequence": [p.sequence]})
        return IngestResult(accepted, p.rejections)

    def commit(self, result: IngestResult) -> None:
        """Nothing left to wait for: `apply` returned once the quorum had the rows."""

    # ---- lifecycle ------------------------------------------------------------------------

    def delete_test(self, test_id: str) -> int:
        """Removes the test's events and rejected events from every replica, and its plan."""
        removed = self._remove(sql.EVENTS, sql.test_rows(test_id))
        self._remove(sql.QUARANTINE, sql.test_rows(test_id))
        # A newer version with no definition: no plan. Written whether or not this gateway knows
        # of a plan: its copy of the plans may be a second old, and another gateway's newer; and
        # newer than the plan read now, which a gateway whose clock is ahead may have written.
        self._written_plans()
        known = self.experiments().get(test_id)
        self._b.insert_everywhere(sql.EXPERIMENTS, {"test_id": [test_id], "definition": [""], "updated_ns": [
            max(time.time_ns(), known.updated_ns + 1 if known is not None else 0)]})
        self._written_plans()
        return removed

    def erase_user(self, user_id: str, tests=None) -> int:
        """Removes the user's events (of `tests`, or all) and rejected events from every replica
        before it returns. ClickHouse deletes the parts they were in once they are replaced
        (after its old_parts_lifetime, 8 minutes by default)."""
        rows = sql.user_rows(user_id, list(tests) if tests else None)
        removed = sum(self._remove(sql.EVENTS, condition) for condition in rows)
        for condition in rows:
            self._remove(sql.QUARANTINE, condition)
        return removed

    def retain(self, horizons: dict[str, int]) -> int:
        """Removes each test's events older than its horizon, rounded down to a day: a removal
        rewrites every part it touches, so the sweep does so at most once a day per test (the
        core hides what is older than the horizon itself meanwhile)."""
        days = {t: h // _DAY_NS * _DAY_NS for t, h in horizons.items()}
        return sum(self._remove(sql.EVENTS, condition) for condition in sql.old_rows(days)) if days else 0

    def retain_quarantine(self, horizons: dict[str, int], others: int | None) -> int:
        """Removes quarantined events received before their test's horizon, else before
        `others`, each rounded down to a day as `retain` does: the tests with any received
        before the latest of them are asked of each shard first (a short query when none is
        due), and only theirs are removed."""
        days = {t: h // _DAY_NS * _DAY_NS for t, h in horizons.items()}
        other_day = None if others is None else others // _DAY_NS * _DAY_NS
        latest = max([*days.values(), other_day or 0], default=0)
        if latest <= 0:
            return 0
        found, _ = self._b.each_shard(sql.tests_received_before(self._b.local(sql.QUARANTINE), latest))
        due = {t: h for columns in found for t in columns[0] if (h := days.get(t, other_day)) is not None and h > 0}
        return sum(self._remove(sql.QUARANTINE, c) for c in sql.old_rows(due, "received_ns")) if due else 0

    def _remove(self, table: str, condition: str) -> int:
        """Deletes the rows matching `condition` from each shard's local table, and returns the
        number removed once every replica has applied the deletion."""
        local = self._b.local(table)
        counted, _ = self._b.each_shard(sql.count_rows(local, condition))
        removed = int(sum(columns[0][0] for columns in counted))
        if not removed:
            return 0
        name = local.split(".", 1)[1]
        held, _ = self._b.each_shard(sql.partitions(self.database, name))
        self._b.each_shard(sql.delete_rows(local, condition))
        if self._b.cluster:  # every partition's last part is to be rewritten: a mark after each
            for partition in sorted({p for columns in held for p in columns[0]}):
                self._b.insert_everywhere(table, _mark(table, partition))
        deadline = time.monotonic() + REMOVAL_TIMEOUT_S
        while True:
            answers, missing = self._b.each_replica(sql.mutations_pending(self.database, name))
            waiting = sum(columns[0][0] for columns in answers)
            if not waiting and not missing:
                return removed
            if time.monotonic() > deadline or self._closed.wait(0.2):
                raise Unavailable(f"the removal from {table} is not applied yet on every replica "
                                  f"({', '.join(missing) or f'{waiting} mutations pending'}): each applies it when it "
                                  "can; calling again is safe")

    def export(self, test_id: str, start_ns: int | None = None, end_ns: int | None = None,
               rows: int = 100_000) -> Iterator[pa.Table]:
        """A test's events, shard by shard, each in time order, `rows` at a time."""
        statement = sql.export(self._b.local(sql.EVENTS), test_id, start_ns, end_ns)
        for columns in self._b.stream(statement, rows):
            named = dict(zip(sql.EXPORTED, columns))
            named["timestamp"] = named.pop("ns")
            yield pa.table({f.name: pa.array(named[f.name], f.type) for f in EVENT_SCHEMA}, schema=EVENT_SCHEMA)

    @property
    def identity(self) -> str:
        return f"clickhouse:{self._b.cluster}:{self.database}"

    def last_sequence(self, producer_id: str) -> int:
        (seen,), (last,) = self._b.query(sql.last_sequence(self._b.table(sql.PRODUCERS), producer_id))
        return int(last) if seen else 0

    # ---- queries --------------------------------------------------------------------------

    def _partials(self, statement: str, deadline: float | None) -> list[list[list]]:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        results, _ = self._b.each_shard(statement, timeout=timeout)
        return results

    def _scanned(self, test_id, start_ns, end_ns, filters, events: int | None, deadline: float | None) -> int:
        """Events in range before the filters: the events counted anyway, when no filter left any
        out (`events` None: something else did, as an exclusion of users or an event type)."""
        if events is not None and (not filters or not filters.items()):
            return events
        statement = sql.scanned(self._b.local(sql.EVENTS), test_id, start_ns, end_ns)
        return int(sum(columns[0][0] for columns in self._partials(statement, deadline)))

    def summary(self, q: SummaryQuery) -> GroupStats:
        across = sql.users_across_variants(self._b.local(sql.EVENTS), q.test_id, q.start_ns, q.end_ns, q.filters)
        counts = [columns for columns in self._partials(across, q.deadline)]
        g = self._groups(q.test_id, q.start_ns, q.end_ns, q.filters, None, q.deadline,
                         q.analysis.exclude_multi_variant_users, q.analysis.metric_event_type,
                         q.analysis.session_metrics)
        g = dataclasses.replace(g, users=int(sum(c[0][0] for c in counts)),
                                multi_variant_users=int(sum(c[1][0] for c in counts)))
        return g if q.analysis.revenue_cap is None else self._capped(q, g)

    def _capped(self, q: SummaryQuery, g: GroupStats) -> GroupStats:
        """Revenue per user capped (RevenueCap), beside it. A percentile's threshold is found from
        each shard's extremes: the k-th smallest of n pooled values is the (n - k + 1)-th largest,
        and a high percentile needs only the few largest of each shard."""
        cap = q.analysis.revenue_cap
        args = (self._b.local(sql.EVENTS), q.test_id, q.start_ns, q.end_ns, q.filters,
                q.analysis.exclude_multi_variant_users, q.analysis.metric_event_type)
        shards = [c for c in self._partials(sql.revenue_counts(*args), q.deadline)]
        units, nonzero, negative = (int(sum(c[k][0] for c in shards)) for k in range(3))
        pooled = nonzero if cap.nonzero_only else units
        if cap.value:
            threshold = cap.value
        elif not pooled:
            return dataclasses.replace(g, revenue_cap=CapApplied(cap, float("nan"), 0, 0))
        else:
            k, zeros = cap.rank(pooled), 0 if cap.nonzero_only else units - nonzero
            if k <= negative:
                smallest = sorted(r for c in self._partials(sql.revenue_extremes(*args, False, k), q.deadline)
                                  for r in c[0])
                threshold = float(smallest[k - 1])
            elif k <= negative + zeros:
                threshold = 0.0
            else:
                m = pooled - k + 1
                largest = sorted((r for c in self._partials(sql.revenue_extremes(*args, True, m), q.deadline)
                                  for r in c[0]), reverse=True)
                threshold = float(largest[m - 1])
        merged: dict[str, list[float]] = {}
        lowered = 0
        for variant, n, total, var, above in (row for c in self._partials(sql.capped_stats(*args, threshold), q.deadline)
                                              for row in zip(*c)):
            lowered += int(above)
            merged[variant] = _merge_moments(merged.get(variant), float(n), float(total), float(var) * float(n))
        at = [merged.get(v, [0.0, 0.0, 0.0]) for v in g.variants]
        moments = g.moments.capped(np.array([m[1] for m in at]), np.array([m[2] for m in at]))
        return dataclasses.replace(g, moments=moments, revenue_cap=CapApplied(cap, threshold, pooled, lowered))

    def segments(self, q: SegmentsQuery) -> GroupStats:
        return self._groups(q.test_id, q.start_ns, q.end_ns, q.filters, q.dimension.value, q.deadline,
                            metric_event_type=q.analysis.metric_event_type, sessions=q.analysis.session_metrics,
                            check_groups=q.check_groups)

    def count_events(self, test_id: str, start_ns: int | None, end_ns: int | None) -> int:
        statement = sql.scanned(self._b.local(sql.EVENTS), test_id, start_ns, end_ns)
        return int(sum(columns[0][0] for columns in self._partials(statement, None)))

    def _groups(self, test_id, start_ns, end_ns, filters, dimension, deadline, exclude: bool = False,
                metric_event_type: str = "", sessions: bool = False, check_groups=None) -> GroupStats:
        started = time.perf_counter_ns()
        args = (self._b.local(sql.EVENTS), test_id, start_ns, end_ns, filters, dimension, exclude, metric_event_type)
        merged = self._merged(sql.group_stats(*args), dimension, deadline, _merge)
        if check_groups is not None:  # (segments, variants), as the embedded engine counts them
            check_groups(len({k[1] for k in merged}), len({k[0] for k in merged}))
        order = sorted(merged)
        metrics, moments = _group_columns([merged[k] for k in order])
        if sessions:
            by_user = self._merged(sql.session_stats(*args), dimension, deadline, _merge_sessions)
            at = np.array([by_user[k] for k in order], dtype=np.float64).reshape(len(order), 8)
            n, events, session_sums, _, events_var, sessions_var, conversions_cov, events_cov = at.T
            moments = moments.with_sessions(events, session_sums, events_var * n, sessions_var * n,
                                            conversions_cov * n, events_cov * n)
        counted = None if exclude or metric_event_type else int(metrics.events.sum())
        scanned = self._scanned(test_id, start_ns, end_ns, filters, counted, deadline)
        return GroupStats([k[0] for k in order], [k[1] for k in order] if dimension else None, metrics, moments,
                          QueryStats(scanned, time.perf_counter_ns() - started))

    def _merged(self, statement: str, dimension: str | None, deadline, merge) -> dict[tuple, list[float]]:
        """Each group's (variant, and segment value) partials of every shard, merged."""
        merged: dict[tuple, list[float]] = {}
        for columns in self._partials(statement, deadline):
            keys = list(zip(*columns[:2])) if dimension else [(v,) for v in columns[0]]
            values = columns[2 if dimension else 1:]
            for i, key in enumerate(keys):
                merged[key] = merge(merged.get(key), [column[i] for column in values])
        return merged

    def _by_exposure(self, q: TimeseriesQuery) -> TimeseriesResult:
        """Per age and variant, what the embedded engine's _by_exposure gives: each shard's users
        by age and the statistics of those with events at each age, the others added as zeros."""
        started = time.perf_counter_ns()
        local, width = self._b.local(sql.EVENTS), q.interval.width_ns
        until = q.end_ns
        if until is None:
            spans = [c for c in self._partials(sql.time_span(local, q.test_id, q.start_ns, q.end_ns, q.filters),
                                               q.deadline) if c[2][0]]
            until = max((int(c[1][0]) for c in spans), default=0)
        ages: dict[str, dict[int, int]] = {}
        for columns in self._partials(sql.exposure_ages(local, q.test_id, q.start_ns, q.end_ns, q.filters, width,
                                                        until), q.deadline):
            for variant, age, users in zip(*columns):
                ages.setdefault(variant, {})[int(age)] = ages.get(variant, {}).get(int(age), 0) + int(users)
        merged: dict[tuple[int, str], list[float]] = {}
        for columns in self._partials(sql.exposure_stats(local, q.test_id, q.start_ns, q.end_ns, q.filters, width),
                                      q.deadline):
            for k, variant, *values in zip(*columns):
                merged[(int(k), variant)] = _merge(merged.get((int(k), variant)), values)
        variants = sorted(ages)
        n_k = max((k for k, _ in merged), default=-1) + 1
        q.check_points(n_k, len(variants))
        rows = []
        for k in range(n_k):
            for v in variants:
                eligible = sum(n for age, n in ages[v].items() if age >= k)
                if not eligible:
                    continue
                active = merged.get((k, v))
                zeros = eligible - (int(active[0]) if active else 0)
                rows.append((k, v, _merge(active, [zeros, 0, 0, 0.0, 0, 0.0, 0.0, 0.0]) if zeros else active))
        metrics, moments = _group_columns([r[2] for r in rows])
        return TimeseriesResult(test_id=q.test_id, interval=q.interval, cumulative=False,
                                bucket_start_ns=np.array([r[0] * width for r in rows], dtype=np.int64),
                                variants=[r[1] for r in rows], metrics=metrics,
                                stats=QueryStats(self._scanned(q.test_id, q.start_ns, q.end_ns, q.filters,
                                                               int(metrics.events.sum()), q.deadline),
                                                 time.perf_counter_ns() - started),
                                moments=moments, since_first_exposure=True)

    def timeseries(self, q: TimeseriesQuery) -> TimeseriesResult:
        if q.since_first_exposure:
            return self._by_exposure(q)
        started = time.perf_counter_ns()
        local = self._b.local(sql.EVENTS)
        offsets = self._zone_offsets(q)
        per_bucket: dict[tuple[int, str], np.ndarray] = {}
        for columns in self._partials(sql.buckets(local, q.test_id, q.start_ns, q.end_ns, q.filters, q.interval,
                                                  offsets), q.deadline):
            for bucket, variant, *values in zip(*columns):
                key = (int(bucket), variant)
                per_bucket[key] = per_bucket.get(key, 0) + np.array(values, dtype=np.float64)
        buckets = sorted({b for b, _ in per_bucket})
        variants = sorted({v for _, v in per_bucket})
        shape = (len(buckets), len(variants))
        q.check_points(*shape)
        b_at, v_at = {b: i for i, b in enumerate(buckets)}, {v: i for i, v in enumerate(variants)}
        grid = np.zeros((*shape, 5))
        for (b, v), values in per_bucket.items():
            grid[b_at[b], v_at[v]] = values
        events, conversions, revenue, users, converted = (grid[..., k] for k in range(5))
        moments = None
        if q.cumulative:
            events, conversions, revenue = (np.cumsum(a, axis=0) for a in (events, conversions, revenue))
            users, converted = (np.cumsum(self._first_seen(q, b_at, v_at, shape, flag, offsets), axis=0)
                                for flag in (False, True))
            if q.lift is not None and buckets:
                moments = self._cumulative_moments(q, offsets, b_at, variants, users, converted, revenue, conversions)
        keep = np.flatnonzero(events.reshape(-1))
        b, v = np.divmod(keep, max(len(variants), 1))
        index = np.array(buckets, dtype=np.int64)[b]
        starts = (timezones.bucket_starts(q.time_zone, q.interval, index) if offsets is not None
                  else index * q.interval.width_ns + q.interval.origin_ns)
        return TimeseriesResult(
            test_id=q.test_id, interval=q.interval, cumulative=q.cumulative, bucket_start_ns=starts,
            variants=[variants[i] for i in v.tolist()],
            metrics=MetricColumns(events=events.reshape(-1)[keep].astype(np.int64),
                                  conversions=conversions.reshape(-1)[keep].astype(np.int64),
                                  total_revenue=revenue.reshape(-1)[keep], users=users.reshape(-1)[keep].astype(np.int64),
                                  converted_users=converted.reshape(-1)[keep].astype(np.int64)),
            stats=QueryStats(self._scanned(q.test_id, q.start_ns, q.end_ns, q.filters, int(grid[..., 0].sum()),
                                           q.deadline), time.perf_counter_ns() - started),
            moments=moments.take(keep) if moments is not None else None)

    def _cumulative_moments(self, q: TimeseriesQuery, offsets, b_at: dict, variants: list[str], users: np.ndarray,
                            converted: np.ndarray, revenue: np.ndarray, conversions: np.ndarray) -> UserMoments:
        """Per (bucket, variant), flattened, the user moments of everything up to the bucket's end:
        each shard's changes of the squares about the variants' final means, added up in order
        (kernels.cumulative_user_moments is the same on one machine)."""
        n = users.astype(np.float64)
        cx = np.divide(revenue[-1], n[-1], out=np.zeros(len(variants)), where=n[-1] > 0)
        cy = np.divide(conversions[-1], n[-1], out=np.zeros(len(variants)), where=n[-1] > 0)
        n_new = np.diff(n, axis=0, prepend=np.zeros((1, len(variants))))
        q2 = np.stack([n_new * cx * cx, n_new * cy * cy, n_new * cx * cy])
        statement = sql.cumulative_squares(self._b.local(sql.EVENTS), q.test_id, q.start_ns, q.end_ns, q.filters,
                                           q.interval, offsets, {v: (cx[i], cy[i]) for i, v in enumerate(variants)})
        for columns in self._partials(statement, q.deadline):
            for bucket, variant, *deltas in zip(*columns):
                q2[:, b_at[int(bucket)], variants.index(variant)] += np.array(deltas, dtype=np.float64)
        m2 = about_means(n, revenue, conversions.astype(np.float64), *np.cumsum(q2, axis=1), cx, cy)
        return UserMoments.of(n, converted, revenue, conversions, *m2)

    def _zone_offsets(self, q: TimeseriesQuery) -> timezones.Offsets | None:
        """The time zone's offsets over the test's events in range (None in UTC)."""
        if not q.time_zone:
            return None
        statement = sql.time_span(self._b.local(sql.EVENTS), q.test_id, q.start_ns, q.end_ns, q.filters)
        spans = [(c[0][0], c[1][0]) for c in self._partials(statement, q.deadline) if c[2][0]]
        if not spans:
            return timezones.Offsets((), (0,))
        return timezones.offsets(q.time_zone, min(s[0] for s in spans), max(s[1] for s in spans))

    def _first_seen(self, q: TimeseriesQuery, b_at: dict, v_at: dict, shape: tuple, converted: bool,
                    offsets: timezones.Offsets | None) -> np.ndarray:
        counts = np.zeros(shape)
        statement = sql.first_buckets(self._b.local(sql.EVENTS), q.test_id, q.start_ns, q.end_ns, q.filters,
                                      q.interval, converted, offsets)
        for columns in self._partials(statement, q.deadline):
            for bucket, variant, users in zip(*columns):
                counts[b_at[int(bucket)], v_at[variant]] += users
        return counts

    def list_tests(self) -> list[TestInfo]:
        merged: dict[str, list] = {}
        for columns in self._partials(sql.tests(self._b.local(sql.EVENTS)), None):
            for test_id, variants, events, users, first, last in zip(*columns):
                m = merged.setdefault(test_id, [set(), 0, 0, first, last])
                m[0] |= set(variants)
                m[1] += events
                m[2] += users
                m[3], m[4] = min(m[3], first), max(m[4], last)
        return [TestInfo(t, sorted(m[0]), int(m[1]), int(m[2]), int(m[3]), int(m[4])) for t, m in sorted(merged.items())]

    def quarantine(self, test_id: str = "", limit: int = 100, test_prefix: str = ""
                   ) -> tuple[list[QuarantinedEvent], int]:
        table = self._b.table(sql.QUARANTINE)
        columns = self._b.query(sql.quarantine(table, test_id, test_prefix, limit))
        names = [c for c in sql.COLUMNS[sql.QUARANTINE] if c not in ("ts", "batch")]
        entries = []
        for row in zip(*columns):
            record = dict(zip(names, row))
            event = {k: record[k] for k in names[4:]}
            entries.append(QuarantinedEvent(record["received_ns"], record["idx"], record["field"], record["message"],
                                            event))
        (total,), = self._b.query(sql.quarantine_count(table, test_id, test_prefix))
        return entries, int(total)

    def experiments(self) -> dict[str, Experiment]:
        """Every plan, read at most once a second by this gateway. Each shard holds them all, so
        plans are known while some shards are down; of two versions (a write that reached only
        some shards) the later wins. One caller reads them at a time; the others meanwhile take
        the last ones read (with a replica hung, each call read them in a thread of its own,
        each waiting for the timeout), or wait when there are none (after a write)."""
        cached_at, plans = self._plans
        if self._fresh(cached_at):
            return plans
        # Plans read before this gateway's last write are not taken: wait for ones read after it.
        if not self._reading_plans.acquire(blocking=cached_at <= self._written_at):
            return plans
        try:
            cached_at, plans = self._plans
            if self._fresh(cached_at):  # read meanwhile
                return plans
            started = time.monotonic()
            results, missing = self._b.each_shard(sql.experiments(self._b.local(sql.EXPERIMENTS)), partial=True)
            if not results:
                raise Unavailable(f"no shard answered ({', '.join(missing)})")
            latest: dict[str, tuple[int, str]] = {}
            for test_ids, definitions, versions in results:
                for test_id, definition, version in zip(test_ids, definitions, versions):
                    if version > latest.get(test_id, (-1, ""))[0]:
                        latest[test_id] = (version, definition)
            plans = {t: Experiment.from_json(json.loads(d)) for t, (_, d) in latest.items() if d}
            self._versions = {t: version for t, (version, _) in latest.items()}
            self._plans = (started, plans)
            return plans
        finally:
            self._reading_plans.release()

    def _fresh(self, read_at: float) -> bool:
        """Whether plans whose reading began at `read_at` may be answered now."""
        return read_at > self._written_at and time.monotonic() - read_at <= PLANS_TTL_S

    def _written_plans(self) -> None:
        self._written_at = time.monotonic()

    def put_experiment(self, experiment: Experiment) -> None:
        """Written as a version newer than any of the test's, its deletion's too (a deletion after
        a plan from a gateway whose clock runs ahead is that far ahead, and a plan made again at
        once would be older)."""
        self.experiments()
        newest = self._versions.get(experiment.test_id, -1)
        if experiment.updated_ns <= newest:
            experiment = dataclasses.replace(experiment, updated_ns=newest + 1)
        self._b.insert_everywhere(sql.EXPERIMENTS, {"test_id": [experiment.test_id],
                                         "definition": [json.dumps(experiment.to_json())],
                                         "updated_ns": [experiment.updated_ns]})
        self._written_plans()

    # ---- operations -----------------------------------------------------------------------

    def snapshot(self) -> SnapshotInfo:
        raise AbstreamError("the cluster engine keeps no snapshots: its data lives in the ClickHouse replicas "
                            "(back them up with ClickHouse's own tools)")

    def between_steps(self, wait: Callable[[], None]) -> None:
        """Nothing in the background here: merges are the cluster's."""

    def maintain(self) -> None:
        """Once a second: Unavailable, naming it, while a shard has no replica that answers (health
        then says NOT_SERVING: no call that needs that shard can be answered); replication and
        merges are the cluster's."""
        try:
            self._b.each_shard("SELECT 1", timeout=5)
        except Unavailable:
            raise
        except AbstreamError as error:  # refused (a password changed, say): it cannot serve either
            raise Unavailable(str(error)) from error

    def gauges(self) -> list[Gauge]:
        return [Gauge("abstream_clickhouse_shards", "Shards of the ClickHouse cluster", lambda: len(self._b.shards))]

    def close(self) -> None:
        """Also ends a removal's wait for its replicas (a retention sweep's: a stop waited for it,
        up to REMOVAL_TIMEOUT_S, with a replica down); each applies it when it can."""
        self._closed.set()
        self._b.close()


def _strings(column: pa.ChunkedArray, cut: bool = False) -> list[str]:
    """A string column as Python strings, nulls as '' (and, for rejected events, cut like the
    embedded quarantine cuts them)."""
    if cut:
        column = cut_to_limit(column)
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    return column.fill_null("").to_pylist()


def _group_columns(groups: list[list[float]]) -> tuple[MetricColumns, UserMoments]:
    """Merged per-group statistics (group_stats' columns: users, events, conversions, revenue,
    converted users, the per-user variances and covariance) as an answer's metrics and moments."""
    g = np.array(groups, dtype=np.float64).reshape(len(groups), 8)
    users, events, conversions, revenue, converted, revenue_var, conversions_var, covariance = g.T
    metrics = MetricColumns(events=events.astype(np.int64), conversions=conversions.astype(np.int64),
                            total_revenue=revenue, users=users.astype(np.int64), converted_users=converted.astype(np.int64))
    return metrics, UserMoments.of(users, converted, revenue, conversions, revenue_var * users,
                                   conversions_var * users, covariance * users)


def _merge_moments(a: list[float] | None, n: float, total: float, m2: float) -> list[float]:
    """[users, sum, centered sum of squares] of two shards' users of a group (Chan's formula)."""
    if a is None or not a[0]:
        return [n, total, m2]
    if not n:
        return a
    both, d = a[0] + n, total / n - a[1] / a[0]
    return [both, a[1] + total, a[2] + m2 + d * d * a[0] * n / both]  # d * d: inf past the float range, as numpy


def _merge(a: list[float] | None, b: list) -> list[float]:
    """Two shards' partials of one group: counts and sums add; the per-user variances combine by
    Chan's formula (as centered sums of squares), never through sums of squares."""
    b = [float(x) for x in b]
    if a is None:
        return b
    n_a, n_b = a[0], b[0]
    n = n_a + n_b
    out = [n, a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4]]
    for var_at, total_at in ((5, 3), (6, 2)):  # revenue's variance with revenue, conversions' with conversions
        d = b[total_at] / n_b - a[total_at] / n_a  # squared as d * d: ** raises OverflowError where numpy gives inf
        m2 = a[var_at] * n_a + b[var_at] * n_b + d * d * n_a * n_b / n
        out.append(m2 / n)
    # the covariance of revenue and conversions: co-moments combine the same way
    dr, dc = b[3] / n_b - a[3] / n_a, b[2] / n_b - a[2] / n_a
    out.append((a[7] * n_a + b[7] * n_b + dr * dc * n_a * n_b / n) / n)
    return out


def _merge_sessions(a: list[float] | None, b: list) -> list[float]:
    """Two shards' session_stats of one group: sums add; variances and covariances combine by
    Chan's formula, as centered sums of squares and co-moments."""
    b = [float(x) for x in b]
    if a is None or not a[0]:
        return b
    if not b[0]:
        return a
    n_a, n_b = a[0], b[0]
    n = n_a + n_b
    d = [b[k] / n_b - a[k] / n_a for k in (1, 2, 3)]  # events, sessions, conversions: difference of means
    joint = n_a * n_b / n

    def combined(at: int, dx: float, dy: float) -> float:
        return (a[at] * n_a + b[at] * n_b + dx * dy * joint) / n

    return [n, a[1] + b[1], a[2] + b[2], a[3] + b[3], combined(4, d[0], d[0]), combined(5, d[1], d[1]),
            combined(6, d[2], d[1]), combined(7, d[0], d[1])]


def _mark(table: str, partition: str) -> dict[str, list]:
    """The row a removal leaves in a partition of `table` (sql.MARK): no test, in the middle of
    the partition's month ('YYYYMM'), which is that month in the servers' time zone, whichever it
    is (a month's first instant in UTC is the month before west of Greenwich, where the mark then
    missed its partition and the removal waited for it until its timeout)."""
    ns = int(dt.datetime(int(partition[:4]), int(partition[4:6]), 15, tzinfo=dt.timezone.utc).timestamp()) * 10**9
    columns = sql.COLUMNS[table]
    row = {c: [""] for c in columns if c != "ts"}
    if table == sql.EVENTS:
        row.update(ns=[ns], conversion=[0], revenue=[0.0])
    else:
        row.update(received_ns=[ns], idx=[-1], timestamp=[None], conversion=[0], revenue=[0.0])
    row["batch"] = [sql.MARK]
    row["session_id"] = [uuid.uuid4().hex]  # else the replicas drop it as a retry of the last mark
    return row
