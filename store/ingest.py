"""Ingest and the tail: dictionary-encoded appends, published as immutable views.

A checked batch (core/events.py) is encoded and its log record built without the ingest lock
(`prepare`), so that a stream prepares its next batches while one is applied; under the lock
(`apply`) its record is written and it becomes visible, all at once: its events go to the tail
shared by every test (and a full tail is sealed into parts in a background thread), its
rejected events to the quarantine, its producer's sequence to the producers, then one new
`StoreView` is published. Queries take no lock.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pyarrow as pa
from abstream.core import threads
from abstream.core.errors import Stopped, Unavailable
from abstream.core.events import Rejection
from abstream.core.types import Experiment, IngestResult, ValidatedBatch
from abstream.store import persist
from abstream.store.dictionary import Dictionary
from abstream.store.partition import (
    COLUMNS,
    DTYPES,
    STRINGS,
    PartitionView,
    StoreView,
    Tail,
    split_by_test,
    take,
)
from abstream.store.quarantine import Quarantine
from abstream.store.rollup import COLUMNS as ROLLUP_COLUMNS
from abstream.store.rollup import Rollup, RollupWanted
from abstream.store.schema import CODE_TYPES
from abstream.store.wal import Payload, WriteAheadLog

#: The most a tail's sealing waits for running queries, in all (`Ingest.between_steps`): a full
#: tail waits for its seal, under the ingest lock, and queries scan it until it is sealed.
SEAL_WAIT_S = 0.1


@dataclass(frozen=True)
class PreparedBatch:
    """A checked, dictionary-encoded batch and its log record, ready for `Ingest.apply`."""

    test_codes: np.ndarray
    cols: dict[str, np.ndarray | pa.Array]  # the stored columns of the accepted events
    rejected: pa.Table  # the rejected events as sent, in the order of `rejections`
    rejections: list[Rejection]
    received: int
    producer_id: str
    sequence: int
    first_sequence: int  # of the producer's first request in the batch (0: the batch is one request)
    payload: Payload | None  # the log record, when the store has a log
    batch: ValidatedBatch  # as checked: encoded again if the dictionaries were rebuilt since (an erasure)
    generation: int  # of the dictionaries the codes are of

    @property
    def events(self) -> int:
        return len(self.test_codes) + len(self.rejections)


def _without(partition: PartitionView, keep, rollup: RollupWanted | None) -> tuple[PartitionView | None, int]:
    """The partition rebuilt from the rows `keep(columns)` selects, and how many it dropped
    (None when nothing is left)."""
    batches = [part.batch() for part in partition.parts]
    table = pa.Table.from_batches(batches).combine_chunks()
    cols = {c: table.column(c).chunk(0) if c in STRINGS else table.column(c).to_numpy() for c in COLUMNS}
    mask = np.asarray(keep(cols))
    dropped = int(len(mask) - mask.sum())
    if not dropped:
        return partition, 0
    if not mask.any():
        return None, dropped
    at = np.flatnonzero(mask)
    at = at[np.argsort(cols["timestamp"][at], kind="stable")]  # parts overlap in time: a part is sorted
    return PartitionView().with_rows({c: take(a, at) for c, a in cols.items()}, rollup), dropped


@dataclass
class Producer:
    sequence: int
    lsn: int


class Ingest:
    """The store's mutable state and the one path that changes it. Appends are serialized by
    one lock; every change publishes a new immutable view."""

    def __init__(self, seal_rows: int, quarantine_limit: int, rollup_events: int | None = None,
                 quarantine_namespaces: tuple[str, ...] = ()) -> None:
        self.seal_rows = seal_rows
        self.rollup_events = rollup_events  # a test's events from which it may keep a rollup (rollup.py)
        self.rolled: dict[int, frozenset[str]] = {}  # tests whose whole-test answers were asked for: what they need
        self._folding: dict[int, list[dict]] = {}  # tests whose first rollup is being folded: rows sealed since
        self._folder = threads.pool("abstream-rollup")
        self._removals = 0  # removals applied: a rollup folded across one is not attached
        self.lock = threading.Lock()  # applying batches: the log's order is the order they become visible
        self._encode_lock = threading.Lock()  # the dictionaries' one writer
        self._generation = 0  # of the dictionaries: rebuilt by an erasure (under both locks)
        self.tests = Dictionary(capacity=np.iinfo(np.int32).max)
        self.dicts = {name: Dictionary(capacity=int(np.iinfo(t.to_pandas_dtype()).max))
                      for name, t in CODE_TYPES.items()}
        self.tail = Tail(min(seal_rows, 1 << 22))  # a tail's room up front, within reason
        self.partitions: dict[int, PartitionView] = {}  # written by the sealer (and recovery) only
        self._sealing: dict[str, np.ndarray] | None = None  # a full tail the sealer is working on
        self._sealer = threads.pool("abstream-seal")
        self._sealed: Future | None = None
        self._view_lock = threading.Lock()  # publishing views: appends and the sealer
        self.view = StoreView({}, (self.tail.view(),))
        self.quarantine = Quarantine(quarantine_limit, quarantine_namespaces)
        self.producers: dict[str, Producer] = {}
        self.experiments: dict[str, Experiment] = {}
        self.wal: WriteAheadLog | None = None  # set by durability once recovered
        self.logged_events = 0  # events of the batches published since the start (stored or rejected): the log's growth
        #: Called by the sealer before each test's rows become parts, while the seal has waited
        #: less than SEAL_WAIT_S in all (see EventStore.between_steps).
        self.between_steps: Callable[[], None] = lambda: None
        self._logged_values: dict[str, tuple[Dictionary, int, pa.Array]] = {}  # for `_logged`

    # ---- the ingest path --------------------------------------------------------------------

    def prepare(self, batch: ValidatedBatch) -> PreparedBatch:
        """Encodes a checked batch's strings and builds its log record, outside the ingest lock."""
        rejections = list(batch.rejections)
        with self._encode_lock:
            test_codes, cols, rejected = self.encode(batch.table, batch.valid, rejections)
            generation = self._generation
            logged = batch.table
            if self.wal is not None and batch.ipc is None and len(test_codes) == logged.num_rows:
                logged = self._logged(logged, test_codes, cols)  # every row stored, in order
        payload = None
        if self.wal is not None:
            payload = Payload.of(persist.encode_record(
                persist.Record(logged, rejections, batch.producer_id, batch.sequence, batch.received_ns),
                batch.ipc))
        return PreparedBatch(test_codes, cols, rejected, rejections, batch.received_ns, batch.producer_id,
                             batch.sequence, batch.first_sequence, payload, batch, generation)

    def _logged(self, table: pa.Table, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> pa.Table:
        """A batch stored whole, as logged: each column of few values as the codes just given
        them and their dictionary's values (cached until it grows), where those values take at
        most a quarter of the column's bytes as sent."""
        few = {}
        for name in persist.FEW_VALUES:
            d, column = (self.tests if name == "test_id" else self.dicts[name]), table.column(name)
            if len(d) > persist.LOGGED_DICTIONARY or column.type != pa.string():
                continue
            cached = self._logged_values.get(name)
            if cached is None or cached[0] is not d or cached[1] != len(d):
                cached = self._logged_values[name] = (d, len(d), d.values)
            if 4 * cached[2].nbytes <= column.nbytes:
                few[name] = (test_codes if name == "test_id" else cols[name], cached[2])
        return persist.logged_table(table, few, cols["conversion"])

    def apply(self, p: PreparedBatch) -> IngestResult:
        """Logs a prepared batch and makes it visible, in one critical section; its `token` is the
        log record to be durable before the ack. A batch tagged with a producer id is applied at
        most once per sequence: one not above the producer's last is a duplicate. A batch of several
        of its requests is applied whole or not at all."""
        with self.lock:
            n = len(p.test_codes)  # a batch that fills the tail waits for the seal before: before it is logged
            self.check_sealing(wait=self.tail.rows + n >= self.seal_rows or self.tail.rows + 2 * n > self.tail.room)
            if p.generation != self._generation:  # encoded before an erasure rebuilt the dictionaries
                p = self.prepare(p.batch)  # (under the ingest lock: no other erasure meanwhile)
            if (previous := self.producers.get(p.producer_id) if p.producer_id else None) is not None:
                if p.sequence <= previous.sequence:
                    # Applied before: wait for that batch to be durable, store nothing now.
                    return IngestResult(0, [], duplicate=True, token=(previous.lsn or None) if self.wal else None)
                if p.first_sequence and p.first_sequence <= previous.sequence:
                    raise Unavailable(f"producer {p.producer_id!r} had batches up to sequence {previous.sequence} "
                                      f"applied while batches {p.first_sequence} to {p.sequence} were on their way "
                                      "(two streams at once?); send them again", retry_after=0.1)
            lsn = None if self.wal is None else self.wal.append(p.payload)
            self.publish(p.test_codes, p.cols, p.rejected, p.rejections, p.received, p.producer_id, p.sequence, lsn)
            return IngestResult(accepted=len(p.test_codes), rejections=p.rejections, token=lsn)

    def put_experiment(self, experiment: Experiment) -> None:
        """Logs a plan and makes it current; returns once it is durable."""
        with self.lock:
            lsn = None if self.wal is None else self.wal.append(Payload.of(persist.encode_experiment(
                experiment.to_json())))
            self.experiments = {**self.experiments, experiment.test_id: experiment}
        if lsn is not None:
            self.wal.commit(lsn)

    # ---- removal -----------------------------------------------------------------------------

    def remove(self, change: dict) -> int:
        """Logs a removal and applies it (`apply_removal`) in one critical section; returns once
        it is durable, with the events it removed. One that cannot be worked out (memory runs
        out rewriting a large test) is neither logged nor applied."""
        with self.lock:
            apply = self._removal(change)
            lsn = None if self.wal is None else self.wal.append(Payload.of(persist.encode_removal(change)))
            removed = apply()
        if lsn is not None:
            self.wal.commit(lsn)
        return removed

    def apply_removal(self, change: dict) -> int:
        """Removes events (under the ingest lock, or in replay): `{"delete_test": id}`,
        `{"erase_user": user id, "tests": [ids] or absent}` or `{"horizons": {test id: ns}}` (events
        before their test's horizon). `{"quarantine_horizons": {test id: ns}, "quarantine_others":
        ns or None}` removes quarantined events received before their test's horizon
        (`Quarantine.remove_received_before`) and nothing else."""
        return self._removal(change)()

    def _removal(self, change: dict) -> Callable[[], int]:
        """Works out a removal without changing anything, and returns what applies it (and
        returns the events it removed): all of it, or, raising here, none of it. The tail is
        sealed too, so every event is in a part, and one new view is published: the very next
        query sees none of them. A part that holds some of them is rewritten without them; the
        memory of what is dropped is freed with the view."""
        if "quarantine_horizons" in change:
            return lambda: self.quarantine.remove_received_before(change["quarantine_horizons"],
                                                                  change["quarantine_others"])
        self.wait_sealed()
        self._removals += 1  # a rollup folded before it is not attached (`_attach`), even if this fails
        partitions = dict(self.partitions)
        test_codes, cols = self.tail.copy()
        if len(test_codes):
            for code, rows in split_by_test(test_codes, cols, wide_keys=len(self.tests) > 1 << 16):
                partitions[code] = partitions.get(code, PartitionView()).with_rows(rows, self.rollup_threshold(code))
        del test_codes, cols
        removed, users, plans = 0, None, self.experiments
        quarantined: tuple = ()  # what `Quarantine.remove` is given
        if "delete_test" in change:
            test_id = change["delete_test"]
            code = self.tests.code(test_id)
            if code is not None and code in partitions:
                removed = partitions.pop(code).events
            quarantined = ("test_id", [test_id])
            plans = {k: v for k, v in self.experiments.items() if k != test_id}
        elif "erase_user" in change:
            name, only = change["erase_user"], change.get("tests")
            user = self.dicts["user_id"].code(name)
            codes = None if only is None else {self.tests.code(t) for t in only}
            for code, partition in list(partitions.items()) if user is not None else ():
                if (codes is None or code in codes) and partition.has_users(np.array([user], np.int64))[0]:
                    partitions[code], n = _without(partition, lambda c: c["user_id"] != user,
                                                   self.rollup_threshold(code))
                    removed += n
            if only is None and user is not None:  # no event refers to its code any more: its string goes too
                with self._encode_lock:  # the dictionary's one writer: read while no batch is encoded
                    values = self.dicts["user_id"].values.to_pylist()
                values[user] = f"\x00erased:{user}"
                users = Dictionary.from_values(pa.array(values, pa.string()), self.dicts["user_id"].capacity)
                del values
            quarantined = ("user_id", [name], only)
        elif "horizons" in change:
            for test_id, horizon in change["horizons"].items():
                code = self.tests.code(test_id)
                partition = partitions.get(code) if code is not None else None
                if partition is not None and partition.first_ns < horizon:
                    partitions[code], n = _without(partition, lambda c, h=horizon: c["timestamp"] >= h,
                                                  self.rollup_threshold(code))
                    removed += n
        partitions = {code: p for code, p in partitions.items() if p is not None}

        def apply() -> int:
            if quarantined:
                self.quarantine.remove(*quarantined)
            self.experiments = plans
            if users is not None:
                # Batches encoded since it was read (beside this lock) added ids to the old one
                # only: each is encoded again when applied, as every batch encoded before.
                with self._encode_lock:
                    self.dicts["user_id"] = users
                    self._generation += 1  # batches encoded before are encoded again when applied
            self.tail.clear()
            with self._view_lock:
                self._removals += 1  # a rollup whose folding began during the removal is not attached either
                self.partitions = partitions
                self.view = StoreView(partitions, (self.tail.view(),))
            return removed

        return apply

    def commit(self, result: IngestResult) -> None:
        """Returns once the batch behind `result` is as durable as the fsync policy promises."""
        if result.token is not None and self.wal is not None:
            self.wal.commit(result.token)

    def encode(self, batch: pa.Table, valid: np.ndarray, rejections: list[Rejection]
               ) -> tuple[np.ndarray, dict[str, np.ndarray | pa.Array], pa.Table]:
        """(test codes, stored columns) of the valid rows of a normalized batch, and its rejected
        rows as sent. A row whose value no longer fits a full dictionary gets a rejection too;
        `rejections` ends up complete and sorted by row."""
        good_index = np.flatnonzero(valid)
        good = batch.take(good_index) if len(good_index) < batch.num_rows else batch
        test_codes = self.tests.encode(good.column("test_id"))
        codes = {name: d.encode(good.column(name)) for name, d in self.dicts.items()}
        full = np.zeros(good.num_rows, dtype=bool)
        for name, c in codes.items():
            if len(c) == 0 or c.min() >= 0:  # the usual case: nothing overflowed
                continue
            overflow = c < 0
            for j in np.flatnonzero(overflow & ~full).tolist():
                rejections.append(Rejection(int(good_index[j]), name, f"{name} has reached its limit of "
                                            f"{self.dicts[name].capacity} distinct values"))
            full |= overflow
        sessions = good.column("session_id")
        cols = {
            "timestamp": good.column("timestamp").to_numpy(),
            "conversion": good.column("conversion").to_numpy().astype(np.uint8),
            "revenue": good.column("revenue").to_numpy(),
            "session_id": (sessions.cast(pa.string()) if sessions.type != pa.string() else sessions).combine_chunks(),
            **{name: c.astype(CODE_TYPES[name].to_pandas_dtype()) for name, c in codes.items()},
        }
        if full.any():
            kept = np.flatnonzero(~full)
            test_codes, cols = test_codes[kept], {c: take(a, kept) for c, a in cols.items()}
        rejections.sort(key=lambda r: r.index)
        rejected = batch.take(pa.array([r.index for r in rejections], pa.int64())) if rejections else batch.slice(0, 0)
        return test_codes, cols, rejected

    def publish(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array], rejected: pa.Table,
                rejections: list[Rejection], received: int, producer_id: str, sequence: int,
                lsn: int | None) -> None:
        """Makes a batch visible: its events, its rejected events (`rejected`, in the order of
        `rejections`) in quarantine, and its producer's sequence (under the ingest lock)."""
        self._append_by_test(test_codes, cols)
        self.quarantine.add(received, rejections, rejected)
        self.logged_events += len(test_codes) + len(rejections)
        if producer_id:
            self.producers[producer_id] = Producer(sequence, lsn or 0)

    # ---- the tail and sealing ---------------------------------------------------------------

    def _append_by_test(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> None:
        if len(test_codes) == 0:
            return
        self.tail.append(test_codes, cols)
        if self.tail.rows >= self.seal_rows or self.tail.rows + len(test_codes) > self.tail.room:
            # Sealing (sorting, packing, merging parts) runs in the sealer thread, beside the
            # next appends; one tail at a time, so a sealer that falls behind slows ingest down.
            # Sealed too when a batch like this one would not fit: a tail grown past its room
            # is copied into arrays twice its size, and sealing more rows at once needs more
            # room for the seal's temporaries (10M events in batches of 100,000 into a server:
            # sealed at 200,000 events instead of 300,000, 41.7-43.5 bytes per event at the
            # last ack against 46.4-49.5).
            self.wait_sealed()
            test_codes, cols = self.tail.drain()
            with self._view_lock:
                self._sealing = {"test": test_codes, **{c: cols[c] for c in DTYPES if c != "test"},
                                 **{c: cols[c] for c in STRINGS}}
                # Published before the sealer may run: it pairs its parts with the newest tail
                # view, which must not be the one that still holds their rows.
                self.view = StoreView(self.partitions, (self._sealing, self.tail.view()))
            self._sealed = self._sealer.submit(self._seal, test_codes, cols)
        self.publish_view()

    def publish_view(self) -> None:
        """One new view: everything applied so far becomes visible at once."""
        with self._view_lock:
            tails = (self.tail.view(),) if self._sealing is None else (self._sealing, self.tail.view())
            self.view = StoreView(self.partitions, tails)

    # ---- rollups ------------------------------------------------------------------------------

    def rollup_threshold(self, code: int) -> RollupWanted | None:
        """The rollup a test keeps: only tests whose whole-test answers were asked for keep one
        (hourly once a cumulative Timeseries was, by a dimension once its Segments was), so
        that ingest pays for what dashboards watch, not for every test. None while its first
        one is being folded."""
        holds = self.rolled.get(code)
        if holds is None or self.rollup_events is None or code in self._folding:
            return None
        return RollupWanted(self.rollup_events, holds)

    def want_rollup(self, code: int, holds: frozenset[str]) -> None:
        """A whole-test answer was asked for, and the test has no rollup holding what it reads:
        from now on it keeps one (with `holds`, and what was asked for before), the first one
        folded from its parts in a thread of its own (the asking query scans meanwhile)."""
        if self.rollup_events is None:
            return
        self.rolled[code] = holds | self.rolled.get(code, frozenset())
        try:
            self._sealer.submit(self._start_folding, code)
        except RuntimeError:  # the store is closed: nothing more is sealed or rolled up
            pass

    def _start_folding(self, code: int) -> None:
        """In the sealer: folds the test's parts as they are now, in the folding thread, so that
        sealing goes on meanwhile; the rows sealed since are kept to be folded in after."""
        partition, wanted = self.partitions.get(code), self.rollup_threshold(code)
        if partition is None or wanted is None or partition.events < wanted.events or (
                partition.rollup is not None and wanted.holds <= partition.rollup.holds):
            return
        self._folding[code] = []
        removals = self._removals

        def fold() -> None:
            rollup = partition.folded(wanted.holds)
            self._sealer.submit(self._attach, code, partition, rollup, removals)

        self._folder.submit(fold)

    def _attach(self, code: int, base: PartitionView, rollup: Rollup, removals: int) -> None:
        """In the sealer: the rows sealed while `rollup` was folded from `base` are folded in,
        and it is attached to the test's partition, unless a removal rewrote the partition
        meanwhile (the next whole-test query asks again)."""
        sealed = self._folding.pop(code, [])
        current = self.partitions.get(code)
        if (current is None or removals != self._removals
                or (current.rollup is not None and rollup.holds <= current.rollup.holds)
                or current.events != base.events + sum(len(rows["timestamp"]) for rows in sealed)):
            return
        for rows in sealed:
            rollup = rollup.merged(rows)
        with self._view_lock:
            # A removal may have run while the rows were folded in (it takes the ingest lock, not
            # the sealer): `current` would bring back what it removed, and lose the tail it sealed.
            if self.partitions.get(code) is not current or removals != self._removals:
                return
            self.partitions = {**self.partitions, code: replace(current, rollup=rollup)}
            self.view = StoreView(self.partitions, self.view.tails)

    def wait_rollups(self) -> None:
        """Returns once the rollups asked for so far are in place: every task queued before
        has run in both threads (each runs its tasks in order)."""
        self.wait_sealed()
        self._sealer.submit(lambda: None).result()
        self._folder.submit(lambda: None).result()
        self._sealer.submit(lambda: None).result()

    def check_sealing(self, wait: bool = False) -> None:
        """Refuses to store once a seal failed (memory running out while it sorted, say): the rows
        it took are neither in parts nor in the tail, and every later batch would be logged and
        shown, then refused (its resends stored again each time). The log has them all: a
        restart replays them."""
        if self._sealed is None or not (wait or self._sealed.done()):
            return
        if (error := self._sealed.exception()) is not None:
            raise Stopped(f"sealing the newest events failed ({type(error).__name__}: {error}): this server stores "
                          "no more events until it is restarted (which replays its log); send them to another "
                          "server or retry once it is back", retry_after=5.0)

    def wait_sealed(self) -> None:
        """Returns once no tail is being sealed (re-raising what sealing raised)."""
        if self._sealed is not None:
            self._sealed.result()

    def _seal(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> None:
        """Moves a drained tail into each test's parts and publishes them (in the sealer)."""
        partitions = dict(self.partitions)
        waited = 0.0
        for code, rows in split_by_test(test_codes, cols, wide_keys=len(self.tests) > 1 << 16):
            if waited < SEAL_WAIT_S:  # in all: a tail of thousands of tests must not wait a step each
                step = time.perf_counter()
                self.between_steps()
                waited += time.perf_counter() - step
            partitions[code] = partitions.get(code, PartitionView()).with_rows(rows, self.rollup_threshold(code))
            if code in self._folding:
                self._folding[code].append({c: rows[c] for c in ROLLUP_COLUMNS})
        with self._view_lock:
            # The tail views appends published stay valid: only the sealed rows move.
            self.partitions, self._sealing = partitions, None
            self.view = StoreView(partitions, self.view.tails[-1:])

    def close(self) -> None:
        self._folder.shutdown()  # first: its last task hands its rollup to the sealer
        try:
            self.wait_sealed()
        except Exception:  # noqa: BLE001 - said as storing stopped (`check_sealing`); the log holds its rows
            pass
        self._sealer.shutdown()

    # ---- what it holds ----------------------------------------------------------------------

    @property
    def event_count(self) -> int:
        view = self.view
        return sum(p.events for p in view.partitions.values()) + view.tail_rows

    @property
    def nbytes(self) -> int:
        """Bytes held by stored events and dictionaries (not counting the allocator's slack)."""
        view = self.view
        parts = sum(p.nbytes for partition in view.partitions.values() for p in partition.parts)
        bits = sum(partition.user_bits.nbytes + (partition.rollup.nbytes if partition.rollup else 0)
                   for partition in view.partitions.values())
        tail = sum(a.nbytes for t in view.tails for a in t.values())
        return parts + bits + tail + sum(d.nbytes for d in [self.tests, *self.dicts.values()])
