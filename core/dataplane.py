"""The data plane: what every transport hands its calls to, and the only thing that asks the engine.

A transport (service/ for gRPC, http/ for HTTP) authenticates the caller through `Core.tokens`,
converts its request to the core's types, calls one method here, and converts the answer back.
Here: validation, admission (streams, memory, the ingest budget, rate limits), authorization of
test prefixes, deadlines, the priority of queries over ingest, and the analysis. The engine is
whichever the server opened (core/engine.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from abstream.core import admission, analysis, events, threads
from abstream.core.admission import IngestBudget, Limits, RateLimiter, RequestSize
from abstream.core.auth import ANYONE, Principal, Tokens
from abstream.core.engine import Engine
from abstream.core.errors import (
    ABANDONED,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unavailable,
)
from abstream.core.events import EVENT_SCHEMA, Rejection
from abstream.core.metrics import Metrics, resident_bytes
from abstream.core.types import (
    AnalysisOptions,
    DecodedBatch,
    Experiment,
    IngestResult,
    PowerQuery,
    PowerResult,
    QuarantinedEvent,
    QueryStats,
    SegmentsQuery,
    SegmentsResult,
    SnapshotInfo,
    SummaryQuery,
    SummaryResult,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
    ValidatedBatch,
    check_range,
)

log = logging.getLogger("abstream.core")
T = TypeVar("T")
R = TypeVar("R")

#: Batches of one stream applied but not yet acknowledged (waiting for their fsync).
PIPELINE_DEPTH = 8
#: At most this many requests, and events, of one stream that queued up while the batch before
#: them was stored are stored together as one batch (Core._store): each batch costs the store
#: thread a few hundred hand-offs of the GIL whatever its size. One stream of 1,000-event
#: requests ran 25-60% faster with 64 than with 16 (docs/performance.md).
GROUP_REQUESTS = 64
GROUP_EVENTS = 65_536
#: ... and this many while queries run: a larger batch is a longer step between the points
#: where ingest yields to them, and queries during full-speed ingest took ~1.5-2x as long.
GROUP_REQUESTS_WHILE_QUERIED = 16
#: Requests up to this size are measured on the event loop (well under a millisecond).
INLINE_MEASURE_BYTES = 1 << 20
#: How old a reading of the resident memory the high-water mark is checked against may be.
MEMORY_CHECK_S = 0.01
#: Longest an ingest step waits for running queries to finish (see _yield_to_queries).
QUERY_PRIORITY_WAIT_S = 0.05
#: At most how long past its horizon a test keeps events in memory (`Core._due`).
RETENTION_SLACK_NS = 86_400 * 1_000_000_000
QUARANTINE_DEFAULT_LIMIT = 100
QUARANTINE_MAX_LIMIT = 10_000


#: Threads that run queries (the loop's default pool's size).
QUERY_WORKERS = min(32, (os.cpu_count() or 1) + 4)


def _in_thread(pool: ThreadPoolExecutor, fn, *args):
    """`fn(*args)` in `pool`, with the caller's context (request id, principal), as to_thread does."""
    return asyncio.get_running_loop().run_in_executor(pool, functools.partial(contextvars.copy_context().run, fn, *args))


def producer_of(principal: Principal, producer_id: str) -> str:
    """The producer a caller's producer id names: its own, in its token's name (tokens of one
    name share them, as a token and its replacement do), so that no token can claim another's
    sequence and have that one's next batches taken for duplicates. Without tokens everyone is
    the same caller, as are the server's own sources."""
    if principal is ANYONE:
        return producer_id
    return f"@{json.dumps(principal.name)}:{producer_id}"


def split_result(result: IngestResult, sizes: list[int]) -> list[IngestResult]:
    """One result per request of a batch that stored requests of `sizes` events together, each
    with its own rejections (indexed within it); all share the batch's commit token."""
    if len(sizes) == 1:
        return [result]
    if result.duplicate:
        return [result] * len(sizes)
    rejections = sorted(result.rejections, key=lambda r: r.index)
    out, at, k = [], 0, 0
    for n in sizes:
        mine = []
        while k < len(rejections) and rejections[k].index < at + n:
            r = rejections[k]
            mine.append(r._replace(index=r.index - at))
            k += 1
        out.append(IngestResult(n - len(mine), mine, token=result.token))
        at += n
    return out


class Core:
    def __init__(self, limits: Limits = Limits(), tokens: Tokens = Tokens(None), metrics: Metrics | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.limits = limits
        self.tokens = tokens
        self.metrics = metrics or Metrics(None)
        self._engine: Engine | None = None  # set once the engine is open (recovered)
        self.draining = False
        self.stopped: Unavailable | None = None  # why the engine cannot store now (its log failed, a shard is down)
        self.retention_days = 0.0  # --retention-days: 0 keeps events for ever
        self.sources: dict = {}  # the server's own sources (Kafka) by name: each has `serving` and `state`
        self.events_acked = 0  # events stored by this process's ingest since it started
        self._clock = clock
        self._rates = RateLimiter()
        self._resident = (-math.inf, 0)  # (when, resident bytes): the last reading _check_memory made
        self._budget = IngestBudget(limits.max_ingest_bytes)
        self._streams = 0
        self._queries = 0
        self._no_queries = threading.Event()
        self._no_queries.set()
        # One thread stores batches, for every stream: with a thread per step from the shared pool,
        # up to 8 prepares per stream fought over the GIL (~555 futex calls per 1,000-event batch
        # under strace), and a thread to prepare and one to apply cost a round trip each.
        self._storing = threads.pool("abstream-store")
        # Queries and the answers built from them, in threads of their own: in the shared pool,
        # six slow ones held every ingest stream's acks (their fsync waits) behind them.
        self._querying = threads.pool("abstream-query", QUERY_WORKERS)

    @property
    def engine(self) -> Engine:
        """The engine; until it is open (the embedded one recovers first), calls are UNAVAILABLE."""
        if self._engine is None:
            raise Unavailable("the server is starting: its engine is not open yet", retry_after=1.0)
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine
        engine.between_steps(self._yield_to_queries)  # its sealing yields to queries as ingest does

    @property
    def engine_open(self) -> bool:
        return self._engine is not None

    @property
    def serving(self) -> bool:
        """What health checks say, on every transport."""
        return self.engine_open and not self.draining and self.stopped is None

    @property
    def streams(self) -> int:
        """Ingest streams open now."""
        return self._streams

    def close(self) -> None:
        """Ends the ingest threads (once no stream is open)."""
        self._storing.shutdown(wait=False)
        self._querying.shutdown(wait=False)

    # ---- ingest ---------------------------------------------------------------------------

    async def ingest(self, principal: Principal, requests: AsyncIterator[T], measure: Callable[[T], RequestSize],
                     decode: Callable[[list[T]], DecodedBatch], own_producers: bool = True
                     ) -> AsyncIterator[IngestResult]:
        """Decodes, checks, applies and acks a stream's requests in order, pipelined: while one
        batch waits for its fsync, the next is stored. Requests that queued up meanwhile are
        stored together, as one batch (`_store`), and acked one by one. `measure` and `decode`
        are the transport's: the size and sender of a request without decoding it, and the
        events of requests stored together, as one batch (rejections indexed among them all)."""
        engine = self.engine
        # Whose producer ids the requests carry: the caller's own, or (`own_producers` False: an
        # import's, named after the objects) nobody's.
        owner = principal if own_producers else ANYONE
        if self.draining:
            raise Unavailable("the server is shutting down; send to another server or retry later")
        if self._streams >= self.limits.max_ingest_streams:
            raise ResourceExhausted(f"{self._streams} ingest streams are open, the most this server takes; "
                                    "send on an open stream or retry", retry_after=1.0)
        self._streams += 1
        self.metrics.active_streams.inc()
        arrived: asyncio.Queue = asyncio.Queue(maxsize=2 * GROUP_REQUESTS)
        acking: asyncio.Queue = asyncio.Queue(maxsize=PIPELINE_DEPTH)
        cut_short = False
        held: list[int] = []  # budget this stream holds, one entry per request not yet acked, in order

        async def read_all() -> None:
            nonlocal cut_short
            try:
                async for raw in requests:
                    started = time.perf_counter()
                    # A walk over the request that allocates nothing per event: inline for small
                    # ones, in a thread for large.
                    size = measure(raw) if len(raw) <= INLINE_MEASURE_BYTES else await asyncio.to_thread(measure, raw)
                    if size.producer_id and owner is not ANYONE:
                        size = dataclasses.replace(size, producer_id=producer_of(owner, size.producer_id))
                    self._check_memory()
                    held.append(await self._budget.acquire(admission.cost(size)))
                    await arrived.put((started, raw, size))
                    del raw  # the queue holds it now, and the store thread once it takes it
                    if self.draining:
                        cut_short = True
                        break
            finally:
                await arrived.put(None)

        async def store_all() -> None:
            try:
                ended = False
                while not ended:
                    taken = [await arrived.get()]
                    most = GROUP_REQUESTS_WHILE_QUERIED if self._queries else GROUP_REQUESTS
                    while taken[-1] is not None and len(taken) < most and not arrived.empty():
                        taken.append(arrived.get_nowait())
                    if ended := taken[-1] is None:
                        taken.pop()
                    if not taken:
                        continue
                    stored, error = await _in_thread(self._storing, self._store, engine,
                                                     [(raw, size) for _, raw, size in taken], decode, principal, owner)
                    starts = iter(started for started, _, _ in taken)
                    del taken
                    for result, sizes in stored:
                        self.metrics.stored_together.observe(len(sizes))
                        durable = asyncio.ensure_future(asyncio.to_thread(engine.commit, result))
                        await acking.put((split_result(result, sizes), durable, [next(starts) for _ in sizes]))
                    if error is not None:
                        raise error
            finally:
                await acking.put(None)

        reading, storing = asyncio.create_task(read_all()), asyncio.create_task(store_all())
        try:
            while (item := await acking.get()) is not None:
                results, durable, starts = item
                await durable
                for result, started in zip(results, starts):
                    await self._budget.release(held.pop(0))
                    self.events_acked += result.accepted
                    self.metrics.acked(result, time.perf_counter() - started)
                    yield result
            await storing  # raises what decoding or storing a batch raised, after every earlier ack
            await reading
        finally:
            reading.cancel()
            storing.cancel()
            await self._budget.release(sum(held))
            self._streams -= 1
            self.metrics.active_streams.dec()
        if cut_short:  # the batches in hand are acked; send the rest elsewhere
            raise Unavailable("the server is shutting down; send the remaining batches again")

    def _store(self, engine: Engine, requests: list[tuple[T, RequestSize]], decode: Callable, principal: Principal,
               owner: Principal) -> tuple[list[tuple[IngestResult, list[int]]], BaseException | None]:
        """Stores requests of one stream, consecutive ones that may go together as one batch
        (one decoding, check, log record, view and fsync): per request, a batch costs ~3 ms
        however few its events. Returns each batch's result with the events of each of its
        requests, and what stopped it early (raised after the acks of the requests before)."""
        groups: collections.deque[list[tuple[T, RequestSize]]] = collections.deque()
        for request in requests:
            if groups and self._joins(engine, [size for _, size in groups[-1]], request[1]):
                groups[-1].append(request)
            else:
                groups.append([request])
        del requests
        stored = []
        while groups:
            group = groups.popleft()
            try:
                self._yield_to_queries()  # before each step of ~0.1-10 ms, so a query waits for no more
                try:
                    batch = decode([raw for raw, _ in group])
                except Exception:  # noqa: BLE001 -- one of them cannot be read: the ones before it are stored
                    if len(group) == 1:
                        raise
                    groups.extendleft([request] for request in reversed(group))
                    continue
                sizes = [size.events for _, size in group] if len(group) > 1 else [batch.table.num_rows]
                if sum(sizes) != batch.table.num_rows:
                    raise RuntimeError(f"requests measured as {sum(sizes)} events were decoded as "
                                       f"{batch.table.num_rows}")
                first = group[0][1]
                self._yield_to_queries()
                validated = self._validated(batch, principal, owner,
                                            first.sequence if len(group) > 1 and first.producer_id else 0)
                wait = self._rates.wait_for(principal, validated.table.num_rows)
                if wait > 0:
                    raise RateLimited(f"token {principal.name!r} is over its ingest rate of "
                                      f"{principal.ingest_rate:g} events/s", wait, principal.ingest_rate)
                prepared = engine.prepare(validated)
                self._yield_to_queries()
                stored.append((engine.apply(prepared), sizes))
            except Exception as e:  # noqa: BLE001 -- raised once the requests before it are acked
                return stored, e
        return stored, None

    @staticmethod
    def _joins(engine: Engine, group: list[RequestSize], size: RequestSize) -> bool:
        """Whether a request may be stored with the requests before it: of the same shape (a
        columnar request is logged as it came), one producer's next sequences (where the engine
        takes such a batch), not too many events, and never a batch its producer sent before
        (the engine answers that one as a duplicate, on its own)."""
        first, last = group[0], group[-1]
        if size.shape is None or size.shape != first.shape or size.producer_id != first.producer_id \
                or sum(s.events for s in group) + size.events > GROUP_EVENTS:
            return False
        if not size.producer_id:
            return True
        return engine.groups_producer_batches and size.sequence > last.sequence \
            and first.sequence > engine.last_sequence(first.producer_id)

    def _validated(self, batch: DecodedBatch, principal: Principal, owner: Principal, first_sequence: int = 0
                   ) -> ValidatedBatch:
        """The checked events of a request, or of requests stored together (`first_sequence`: the
        first one's, when they are one producer's)."""
        now = self._clock()
        table, rejections = events.check(batch.table, now, batch.refuse)
        if principal.test_prefix:
            rejections = self._within_prefix(table, rejections, principal)
        if batch.origin is not None and rejections:
            rejections = [r._replace(message=f"{batch.origin[r.index]}: {r.message}") for r in rejections]
        producer_id = producer_of(owner, batch.producer_id) if batch.producer_id else ""
        return ValidatedBatch(table, rejections, now, producer_id, batch.sequence, batch.ipc, first_sequence)

    @staticmethod
    def _within_prefix(table: pa.Table, rejections: list[Rejection], principal: Principal) -> list[Rejection]:
        """A checked batch's rejections, from a token limited to a test prefix: an event for a
        test outside it is rejected for that (whatever else it broke: that is what the ack says),
        the others are stored. Neither it nor an event without a test id (the rules reject those)
        is quarantined: the quarantine shows each token the events of its tests by their ids,
        and keeps a share per prefix; an event outside the prefix would be shown to the token
        whose tests it names, and one without a test id would fill the share of no prefix. The
        test ids are read as stored: strings, or a dictionary of them (its values checked, and
        its rows take the answer: no row copies them)."""
        def of_rows(column: pa.Array, kernel) -> np.ndarray:
            if pa.types.is_dictionary(column.type):
                return kernel(column.dictionary).take(column.indices).fill_null(False).to_numpy(zero_copy_only=False)
            return kernel(column).fill_null(False).to_numpy(zero_copy_only=False)

        chunks, empty = table.column("test_id").chunks, np.zeros(0, dtype=bool)
        inside = np.concatenate([empty] + [of_rows(c, lambda v: pc.starts_with(v, principal.test_prefix))
                                           for c in chunks])
        named = np.concatenate([empty] + [of_rows(c, lambda v: pc.greater(pc.binary_length(v), 0)) for c in chunks])
        outside = named & ~inside
        why = f"token {principal.name!r} may only write tests whose id starts with {principal.test_prefix!r}"
        kept = [r if named[r.index] else r._replace(quarantined=False) for r in rejections if not outside[r.index]]
        refused = [Rejection(i, "test_id", why, quarantined=False) for i in np.flatnonzero(outside).tolist()]
        return sorted(kept + refused, key=lambda r: r.index) if refused else kept

    def _check_memory(self) -> None:
        """Refuses ingest while the process is above its memory high-water mark, as read at most
        every MEMORY_CHECK_S: read for every request, the read (a system call, the GIL let go
        and taken back) cost the event loop ~30 µs a request."""
        mark = self.limits.memory_high_water_bytes
        if not mark:
            return
        if (now := time.monotonic()) - self._resident[0] >= MEMORY_CHECK_S:
            self._resident = (now, resident_bytes())
        if (resident := self._resident[1]) > mark:
            raise ResourceExhausted(f"the server holds {resident:,} bytes, above its memory high-water mark of "
                                    f"{mark:,}; retry later", retry_after=1.0)

    def _yield_to_queries(self) -> None:
        """Ingest waits while queries run, up to QUERY_PRIORITY_WAIT_S per step (in the ingest
        thread, before decoding each request, and before checking and before applying each batch;
        in the engine's sealer, before each test's rows become parts: `Engine.between_steps`).

        A query is someone waiting for an answer; a batch is a producer with a buffer. On two
        cores, a stream ingesting at full speed would otherwise take the core (and the GIL) a
        query needs and make it several times slower.
        """
        if self._queries:
            started = time.perf_counter()
            self._no_queries.wait(QUERY_PRIORITY_WAIT_S)
            self.metrics.ingest_yield_seconds.inc(time.perf_counter() - started)

    # ---- queries --------------------------------------------------------------------------

    async def summary(self, principal: Principal, q: SummaryQuery, timeout: float | None = None,
                      respond: Callable[[SummaryResult], R] = lambda r: r) -> R:
        """Per-variant results and their analysis; `respond` (the transport's converter) runs in
        the worker thread too."""
        q = await self._planned(self._admit(principal, q, timeout))
        engine = self.engine

        def work() -> R:
            plan = engine.experiments().get(q.test_id)
            g = engine.summary(q)
            start = plan.start_ns if plan is not None else None
            # Events past the retention horizon are seen by no query (the sweep may not have removed
            # them yet); those after a start the caller gave earlier than the plan's are analysed.
            until = start if start is None or q.start_ns is None else min(start, q.start_ns)
            before = engine.count_events(q.test_id, self.horizon(q.test_id, plan), until - 1) if until is not None else 0
            future = engine.count_events(q.test_id, self._clock() + analysis.FUTURE_NS, None)
            start_text = f" ({events.format_ns(start)})" if start is not None else ""
            return respond(analysis.summary(q, g, before, future, start_text))

        return await self._in_worker("Summary", work)

    async def segments(self, principal: Principal, q: SegmentsQuery, timeout: float | None = None,
                       respond: Callable[[SegmentsResult], R] = lambda r: r) -> R:
        q = await self._planned(self._admit(principal, q, timeout))
        engine = self.engine
        return await self._in_worker("Segments", lambda: respond(analysis.segments(q, engine.segments(q))))

    async def power(self, principal: Principal, q: PowerQuery, timeout: float | None = None,
                    respond: Callable[[PowerResult], R] = lambda r: r) -> R:
        """Users needed per variant to detect a lift, from the test's control as the baseline."""
        q.check()
        summary = await self._planned(self._admit(principal, SummaryQuery(
            q.test_id, analysis=AnalysisOptions(control_variant=q.control_variant)), timeout))
        engine = self.engine

        def work() -> R:
            info = next((t for t in engine.list_tests() if t.test_id == q.test_id), None)
            days = 0.0
            if info is not None:  # the span the control's users were counted over: the plan's, within the events'
                first = info.first_event_ns if summary.start_ns is None else max(info.first_event_ns, summary.start_ns)
                last = info.last_event_ns if summary.end_ns is None else min(info.last_event_ns, summary.end_ns)
                days = max(last - first, 0) / 86_400e9
            return respond(analysis.power(q, summary, engine.summary(summary), days))

        return await self._in_worker("Power", work)

    async def _plans(self) -> dict[str, Experiment]:
        """Every test's plan: read in a thread from an engine that may wait on the network for
        them (a hung ClickHouse replica held every call of every transport until it timed out)."""
        engine = self.engine
        return await asyncio.to_thread(engine.experiments) if engine.remote_plans else engine.experiments()

    async def _planned(self, q):
        """A query with its experiment's plan where it leaves a choice open: the control, the
        planned split (for the sample ratio mismatch), the start and, once stopped, the stop
        (events after it are outside the experiment)."""
        plan = (await self._plans()).get(q.test_id)
        start_ns = q.start_ns if q.start_ns is not None or plan is None else plan.start_ns
        horizon = self.horizon(q.test_id, plan)
        if horizon is not None:  # events past their retention are not seen, swept or not yet
            start_ns = horizon if start_ns is None else max(start_ns, horizon)
        if plan is None:
            return dataclasses.replace(q, start_ns=start_ns) if start_ns != q.start_ns else q
        changes = {"start_ns": start_ns, "end_ns": q.end_ns if q.end_ns is not None else plan.stop_ns}
        for name in ("analysis", "lift"):
            options = getattr(q, name, None)
            if options is not None:
                changes[name] = dataclasses.replace(options, planned_control=plan.control_variant,
                                                    planned_weights=dict(plan.split))
        return dataclasses.replace(q, **changes)

    async def timeseries(self, principal: Principal, q: TimeseriesQuery, timeout: float | None = None,
                         respond: Callable[[TimeseriesResult], R] = lambda r: r) -> R:
        q = await self._planned(self._admit(principal, q, timeout))
        engine = self.engine
        if q.lift is None:
            return await self._in_worker("Timeseries", lambda: respond(engine.timeseries(q)))
        return await self._in_worker("Timeseries", lambda: respond(analysis.lift(q, engine.timeseries(q))))

    async def last_sequence(self, principal: Principal, producer_id: str) -> int:
        """Where a source's producer, sending as `principal`, resumes."""
        engine = self.engine
        return await asyncio.to_thread(engine.last_sequence, producer_of(principal, producer_id))

    async def list_tests(self, principal: Principal,
                         respond: Callable[[list[TestInfo], QueryStats], R] = lambda t, s: t) -> R:
        """Every test the caller may read, from counters the engine keeps (no event scanned)."""
        engine = self.engine

        def work() -> R:
            started = time.perf_counter_ns()
            plans = engine.experiments()
            tests = [dataclasses.replace(t, experiment=plans.get(t.test_id))
                     for t in engine.list_tests() if principal.may_use(t.test_id)]
            return respond(tests, QueryStats(0, time.perf_counter_ns() - started))

        return await self._in_worker("ListTests", work)

    async def quarantine(self, principal: Principal, test_id: str = "", limit: int = 0,
                         respond: Callable[[list[QuarantinedEvent], int], R] = lambda e, t: (e, t)) -> R:
        """Rejected events the caller may read, newest first, and how many match in all."""
        events.check_query_string("test_id", test_id)
        limit = min(limit or QUARANTINE_DEFAULT_LIMIT, QUARANTINE_MAX_LIMIT)
        engine = self.engine
        return await self._in_worker("ListQuarantine", lambda: respond(
            *engine.quarantine(test_id, limit, principal.test_prefix)))

    def _admit(self, principal: Principal, q, timeout: float | None):
        """A query checked, allowed for the caller, and given the caller's deadline, at most
        --max-query-seconds away."""
        q.check()
        if not principal.may_use(q.test_id):
            raise PermissionDenied(f"token {principal.name!r} may only read tests whose id starts with "
                                   f"{principal.test_prefix!r}")
        if most := self.limits.max_query_seconds:
            timeout = most if timeout is None else min(timeout, most)
        return q if timeout is None else dataclasses.replace(q, deadline=time.monotonic() + timeout)

    async def _in_worker(self, name: str, work: Callable[[], R]) -> R:
        """`work()` in a query thread, counted as a running query (ingest yields to it) until it
        ends, even when its caller stopped waiting for it, timed. A caller that goes away (its
        call cancelled) stops it at its next check of `in_time`."""
        if self._queries >= self.limits.max_queries:
            raise ResourceExhausted(f"{self._queries} queries are running or waiting for a thread, the most this "
                                    "server takes (--max-queries); retry", retry_after=1.0)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        abandoned = threading.Event()

        def ended() -> None:
            self._queries -= 1
            if not self._queries:
                self._no_queries.set()
            self.metrics.query_seconds.labels(name).observe(time.perf_counter() - started)

        def run() -> R:
            ABANDONED.set(abandoned)
            try:
                return work()
            finally:
                try:
                    loop.call_soon_threadsafe(ended)
                except RuntimeError:  # the loop is closed: the server is gone
                    pass

        queued = self._querying.submit(functools.partial(contextvars.copy_context().run, run))
        self._queries += 1  # once queued: a pool shut down (the server stopping) raised above, uncounted
        self._no_queries.clear()
        try:
            return await asyncio.wrap_future(queued)
        except asyncio.CancelledError:
            if queued.cancelled():  # taken back before a thread began it: it ends here
                ended()
            abandoned.set()
            raise

    def in_query_thread(self, fn: Callable[..., R], *args) -> Awaitable[R]:
        """`fn(*args)` where queries run: work of the size of an answer (building one), which
        must not hold up the threads ingest acks wait in."""
        return _in_thread(self._querying, fn, *args)

    # ---- experiments --------------------------------------------------------------------

    async def create_experiment(self, principal: Principal, plan: Experiment) -> Experiment:
        self._may_plan(principal, plan.test_id)
        plan.check()
        engine = self.engine
        existing = (await self._plans()).get(plan.test_id)
        if existing is not None and existing.stop_ns is None and _same_plan(existing, plan):
            # A retry (of a create that failed on the way, perhaps half done): done again, unchanged.
            await asyncio.to_thread(engine.put_experiment, existing)
            return existing
        if existing is not None and not _same_plan(existing, Experiment(existing.test_id)):
            raise FailedPrecondition(f"test {plan.test_id!r} has an experiment already: change it with "
                                     "UpdateExperiment (abstream experiment update)")
        now = self._clock()
        plan = dataclasses.replace(plan, stop_ns=None, created_ns=now, updated_ns=now,
                                   retention_days=existing.retention_days if existing else None)
        await asyncio.to_thread(engine.put_experiment, plan)
        return plan

    async def update_experiment(self, principal: Principal, changes: Experiment) -> Experiment:
        """Changes the fields `changes` sets (a non-empty string or split, a time)."""
        self._may_plan(principal, changes.test_id)
        engine = self.engine
        plan = await self._plan(changes.test_id)
        plan = dataclasses.replace(
            plan, control_variant=changes.control_variant or plan.control_variant,
            split=dict(changes.split) or plan.split,
            start_ns=plan.start_ns if changes.start_ns is None else changes.start_ns,
            stop_ns=plan.stop_ns if changes.stop_ns is None else changes.stop_ns,
            hypothesis=changes.hypothesis or plan.hypothesis, updated_ns=max(self._clock(), plan.updated_ns + 1))
        plan.check()
        await asyncio.to_thread(engine.put_experiment, plan)
        return plan

    async def stop_experiment(self, principal: Principal, test_id: str, stop_ns: int | None = None) -> Experiment:
        return await self.update_experiment(principal, Experiment(test_id, stop_ns=self._clock() if stop_ns is None
                                                                  else stop_ns))

    async def list_experiments(self, principal: Principal) -> list[Experiment]:
        plans = await self._plans()
        return [plans[t] for t in sorted(plans) if principal.may_use(t)]

    async def _plan(self, test_id: str) -> Experiment:
        plan = (await self._plans()).get(test_id)
        if plan is None:
            raise NotFound(f"test {test_id[:256]!r} has no experiment: define one with CreateExperiment "
                           "(abstream experiment create)")
        return plan

    @staticmethod
    def _may_plan(principal: Principal, test_id: str) -> None:
        events.check_query_string("test_id", test_id)
        if not test_id:
            raise InvalidArgument("test_id", "is required")
        if not principal.may_use(test_id):
            raise PermissionDenied(f"token {principal.name!r} may only plan tests whose id starts with "
                                   f"{principal.test_prefix!r}")

    # ---- lifecycle ------------------------------------------------------------------------

    async def delete_test(self, principal: Principal, test_id: str) -> int:
        self._may_plan(principal, test_id)
        return await self._removing("delete_test", lambda: self.engine.delete_test(test_id))

    async def erase_user(self, principal: Principal, user_id: str, tests: list[str]) -> int:
        events.check_query_string("user_id", user_id)
        if not user_id:
            raise InvalidArgument("user_id", "is required")
        if principal.test_prefix and not tests:
            raise PermissionDenied(f"token {principal.name!r} may only erase from tests whose id starts with "
                                   f"{principal.test_prefix!r}: name them (test_ids)")
        for test_id in tests:
            self._may_plan(principal, test_id)
        return await self._removing("erase_user", lambda: self.engine.erase_user(user_id, tests or None))

    async def set_retention(self, principal: Principal, test_id: str, days: float) -> Experiment:
        self._may_plan(principal, test_id)
        if not (days >= 0 and math.isfinite(days)):
            raise InvalidArgument("days", f"must be 0 (the server's default) or more, got {days}")
        engine = self.engine
        plan = (await self._plans()).get(test_id) or Experiment(test_id, created_ns=self._clock())
        plan = dataclasses.replace(plan, retention_days=days or None,
                                   updated_ns=max(self._clock(), plan.updated_ns + 1))
        await asyncio.to_thread(engine.put_experiment, plan)
        return plan

    def horizon(self, test_id: str, plan: Experiment | None) -> int | None:
        """The oldest instant of a test's events that queries see (None: every event)."""
        days = self._retention_days(plan)
        if not days:
            return None
        now = self._clock()
        # A retention longer than the oldest event that may be stored keeps every event: 1e300
        # days has no instant (int(inf) raised, in every query of its test and in the sweep).
        return None if days * 86_400e9 >= now - events.MIN_TIMESTAMP_NS else now - int(days * 86_400e9)

    def _retention_days(self, plan: Experiment | None) -> float:
        return (plan.retention_days if plan is not None else None) or self.retention_days

    def _due(self, test: TestInfo, plan: Experiment | None) -> int | None:
        """The horizon before which the sweep removes a test's events, when it is time to: once
        its oldest event is past the horizon by an eighth of the retention, at most a day.
        Removing rewrites the test's events (under the ingest lock, on the embedded engine: at
        ~0.3 s per million events); at every sweep, a test of 100M events ingested around the
        clock was rewritten every minute. Queries never see what is past the horizon meanwhile."""
        horizon = self.horizon(test.test_id, plan)
        if horizon is None:
            return None
        slack = min(RETENTION_SLACK_NS, int(self._retention_days(plan) * 86_400e9 / 8))
        return horizon if test.first_event_ns < horizon - slack else None

    async def sweep(self) -> int:
        """Removes events past their test's retention, and quarantined events received before
        it (they hold user ids as much as stored ones do); the server calls it periodically.
        Returns the stored events removed."""
        engine = self.engine
        plans = await self._plans()
        if not self.retention_days and not any(p.retention_days for p in plans.values()):
            return 0
        tests = await asyncio.to_thread(engine.list_tests)
        horizons = {t.test_id: h for t in tests if (h := self._due(t, plans.get(t.test_id))) is not None}
        try:
            return await self._removing("retention", lambda: engine.retain(horizons)) if horizons else 0
        finally:  # whether or not that failed: each is a duty of its own (not once the server stops)
            # A test's own retention, else the server's (None: kept), for quarantined events too,
            # whether or not their test has stored events; 0 keeps them all (none came before).
            own = {t: self.horizon(t, p) or 0 for t, p in plans.items() if p.retention_days}
            try:
                if not self.draining:
                    await self._removing("quarantine_retention",
                                         lambda: engine.retain_quarantine(own, self.horizon("", None)), say_none=False)
            except Exception:  # noqa: BLE001 - said; the next sweep tries again
                log.exception("removing quarantined events past their retention failed")

    async def _removing(self, operation: str, work: Callable[[], int], say_none: bool = True) -> int:
        started = time.perf_counter()
        removed = await asyncio.to_thread(work)
        seconds = time.perf_counter() - started
        self.metrics.removed.labels(operation).inc(removed)
        if removed or say_none:
            log.info("%s removed %d events in %.3fs", operation, removed, seconds)
        return removed

    async def export(self, principal: Principal, test_id: str, start_ns: int | None, end_ns: int | None
                     ) -> AsyncIterator[pa.Table]:
        """A test's events as stored, a piece at a time (each piece read in a worker thread); no
        events are one empty piece, so that what is written of them is a file with the columns."""
        self._may_plan(principal, test_id)
        check_range(test_id, start_ns, end_ns)
        horizon = self.horizon(test_id, (await self._plans()).get(test_id))
        if horizon is not None:  # events past their retention are not handed out, swept or not yet
            start_ns = horizon if start_ns is None else max(start_ns, horizon)
        pieces = iter(await asyncio.to_thread(self.engine.export, test_id, start_ns, end_ns))
        piece = await asyncio.to_thread(next, pieces, None)
        if piece is None:
            piece = EVENT_SCHEMA.empty_table()
        while piece is not None:
            at = piece.schema.get_field_index("timestamp")
            if at >= 0 and not pa.types.is_timestamp(piece.schema.field(at).type):  # as the Event has it
                piece = piece.set_column(at, "timestamp", piece.column(at).cast(pa.timestamp("ns", "UTC")))
            yield piece
            piece = await asyncio.to_thread(next, pieces, None)

    # ---- operations -----------------------------------------------------------------------

    async def snapshot(self, principal: Principal) -> SnapshotInfo:
        """A snapshot of the whole store: not for a token limited to some tests (it would learn how
        many events every test holds)."""
        whole_store(principal, "snapshot the store")
        return await asyncio.to_thread(self.engine.snapshot)


def whole_store(principal: Principal, what: str) -> None:
    """Refuses a token limited to some tests `what` reaches every test's events."""
    if principal.test_prefix:
        raise PermissionDenied(f"token {principal.name!r} may only use tests whose id starts with "
                               f"{principal.test_prefix!r}, and may not {what}: that takes a token for every test")


def _same_plan(a: Experiment, b: Experiment) -> bool:
    return (a.control_variant, a.split, a.start_ns, a.hypothesis) == (b.control_variant, b.split, b.start_ns,
                                                                      b.hypothesis)
