"""Durability: recovery at start, snapshots while running, the log kept back to the oldest kept.

The formats are in persist.py (records and snapshots) and wal.py (the log). Recovery loads the
newest snapshot whose files match its manifest, then replays every log record after it; replay
trusts records and never validates again, since a batch's validity depended on the server's
clock when it arrived. A snapshot holds the ingest lock only to capture what to write
(references to immutable parts, a copy of the tail, a log rotation); writing runs beside ingest
and queries.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from abstream.core.errors import AbstreamError, FailedPrecondition, RecoveryError, ResourceExhausted, Unavailable
from abstream.core.events import normalize
from abstream.core.types import Experiment, SnapshotInfo, ValidatedBatch
from abstream.store import persist
from abstream.store.dictionary import Dictionary
from abstream.store.ingest import Ingest, Producer
from abstream.store.partition import COLUMNS, DTYPES, PartitionView, take
from abstream.store.schema import STORED_SCHEMA
from abstream.store.wal import WalCorruption, WriteAheadLog, fsync_dir

log = logging.getLogger("abstream.store")


@dataclass(frozen=True)
class Durability:
    """Where and how the store persists itself; see persist.py and wal.py for the formats."""

    data_dir: Path
    fsync: str = "always"  # or "interval"
    fsync_interval_ms: int = 50
    snapshot_compression: str = "none"  # or "lz4", "zstd"
    snapshots_kept: int = 2
    snapshot_every_events: int = 1_000_000
    snapshot_log_ratio: float = 0.5
    snapshot_every_seconds: float = 300.0


#: A periodic snapshot that failed (a full disk) is tried again this much later.
SNAPSHOT_RETRY_SECONDS = 60.0


@dataclass
class _SnapshotClock:
    at: float = field(default_factory=time.monotonic)
    events: int = 0  # stored then
    logged: int = 0  # Ingest.logged_events then


class Persistence:
    """Recovers `ingest` from its data directory, then logs and snapshots it."""

    def __init__(self, ingest: Ingest, d: Durability) -> None:
        self._ingest = ingest
        self._d = d
        self._lock = threading.Lock()
        self._last = _SnapshotClock()
        self._retry_at = 0.0  # of periodic snapshots, after one failed
        self.snapshot_failures = 0  # snapshots that could not be written, since the start
        self._held: int | None = _hold(Path(d.data_dir))
        try:
            self.identity = _identity(Path(d.data_dir))
            self._recover()
        except BaseException:
            os.close(self._held)
            raise
        self._purge_at = 0.0  # when a pending purge is tried next (`maybe_purge`), after one failed
        self.maybe_purge()  # an erasure whose older copies were not all gone yet

    @property
    def last_snapshot_at(self) -> float:
        """time.monotonic() of the last snapshot written (or of the start, before any)."""
        return self._last.at

    @property
    def wal_dir(self) -> Path:
        return Path(self._d.data_dir) / "wal"

    @property
    def _purge_mark(self) -> Path:
        return Path(self._d.data_dir) / "purge-pending"

    def will_purge(self) -> None:
        """Marks, durably, that a purge is due: set before an erasure is logged, so that a crash
        at any moment after leaves a mark the next start acts on (the erasure itself is in the
        log, and replayed), until `purge` is done."""
        mark = self._purge_mark
        try:
            mark.write_bytes(b"")
            fsync_dir(mark.parent)
        except OSError as error:
            raise _disk_refusal(error, f"the erasure's mark {mark} could not be written ({error.strerror or error}); "
                                       "nothing was erased") from error

    def purge(self) -> SnapshotInfo:
        """A snapshot now, and every older snapshot and log segment deleted: after an erasure,
        the only copies left on disk are the ones without what was erased."""
        mark = self._purge_mark
        if not mark.exists():
            self.will_purge()
        try:
            info = self.snapshot(keep=1)
            if left := self._older_copies(info.path):  # the mark stays: the next start deletes them
                raise Unavailable(f"the events are erased from queries and from the newest snapshot, but older "
                                  f"copies could not be deleted: {'; '.join(left[:5])}; erasing again tries again, "
                                  "and the server's next start does", retry_after=SNAPSHOT_RETRY_SECONDS)
        except AbstreamError:
            self._purge_at = time.monotonic() + SNAPSHOT_RETRY_SECONDS  # `maybe_purge`: not every second
            raise
        mark.unlink(missing_ok=True)
        fsync_dir(mark.parent)
        return info

    def maybe_purge(self) -> None:
        """Finishes a purge an erasure left pending (the server died on the way, the disk was
        full, a copy could not be deleted): at the start, then every SNAPSHOT_RETRY_SECONDS
        while it fails, logged each time."""
        if not self._purge_mark.exists() or time.monotonic() < self._purge_at:
            return
        try:
            self.purge()
            log.info("the purge an erasure left pending is done: no older snapshot or log segment is left")
        except AbstreamError as error:
            log.error("the purge an erasure left pending failed (tried again in %gs): %s", SNAPSHOT_RETRY_SECONDS,
                      error)

    def _older_copies(self, newest: Path) -> list[str]:
        """Deletes, saying why it could not, every snapshot but `newest` and every log segment
        before it (a snapshot's deletions ignore errors: an old copy is a fallback, and its
        deletion is tried again by the next one; after an erasure, it is what must be gone)."""
        left = []
        for _, old in persist.list_snapshots(newest.parent):
            if old != newest:
                try:
                    shutil.rmtree(old)
                except OSError as error:
                    left.append(f"{error.filename or old}: {error.strerror or error}")
        wal, lsn = self._ingest.wal, int(newest.name[5:])
        try:
            wal.drop_before(lsn)
        except OSError as error:
            left.append(f"{error.filename or wal.directory}: {error.strerror or error}")
        segments = wal.segments()
        left += [str(path) for (_, path), (following, _) in zip(segments, segments[1:]) if following <= lsn]
        return left

    # ---- recovery -------------------------------------------------------------------------

    def _recover(self) -> None:
        """Newest readable snapshot, then every log record after it; refuses to lose any."""
        d, ingest = self._d, self._ingest
        started = time.monotonic()
        snapshots_dir, wal = Path(d.data_dir) / "snapshots", WriteAheadLog(self.wal_dir, d.fsync, d.fsync_interval_ms)
        segments = wal.segments()
        first_logged = segments[0][0] if segments else None
        contents, skipped = None, []
        for _, path in persist.list_snapshots(snapshots_dir):
            try:
                contents = persist.load_snapshot(path)
                break
            except persist.SnapshotError as error:
                log.error("snapshot %s is unusable, trying an older one: %s", path, error)
                skipped.append(str(path))
        start_lsn = contents.lsn if contents else 1
        if first_logged is not None and first_logged > start_lsn:
            raise RecoveryError(
                f"cannot recover {d.data_dir}: the write-ahead log begins at record {first_logged}, but "
                + (f"the newest usable snapshot ends before record {start_lsn}" if contents else "no snapshot was found")
                + (f" (unusable: {', '.join(skipped)})" if skipped else f" in {snapshots_dir}")
                + "; the events in between are gone. Restore the snapshots directory from a backup.")
        for tmp in snapshots_dir.glob("tmp-*"):  # a snapshot a crash left half-written: its room given back
            shutil.rmtree(tmp, ignore_errors=True)
        if contents is not None:
            self._restore(contents)
        in_snapshot = ingest.event_count
        replayed = 0
        try:
            for lsn, payload in wal.replay(after_lsn=start_lsn - 1):
                record = persist.decode_record(payload)
                if isinstance(record, persist.Removal):
                    ingest.apply_removal(record.change)
                elif isinstance(record, dict):
                    ingest.experiments = {**ingest.experiments, record["test_id"]: Experiment.from_json(record)}
                else:
                    self._replay(record, lsn)
                replayed += 1
        except WalCorruption as error:
            raise RecoveryError(str(error)) from error
        ingest.wait_sealed()
        wal.open()
        ingest.wal = wal
        self._last = _SnapshotClock(events=in_snapshot)  # what was replayed is since it
        log.info("recovered %d events (%s, %d log records replayed) in %.2fs", ingest.event_count,
                 f"snapshot {start_lsn}" if contents else "no snapshot", replayed, time.monotonic() - started)

    def _replay(self, record: persist.Record, lsn: int) -> None:
        """Stores exactly what a logged batch stored the first time."""
        batch = ValidatedBatch(normalize(record.batch)[0], list(record.rejections), record.received_ns,
                               record.producer_id, record.sequence)
        rejections = list(batch.rejections)
        test_codes, cols, rejected = self._ingest.encode(batch.table, batch.valid, rejections)
        self._ingest.publish(test_codes, cols, rejected, rejections, record.received_ns, record.producer_id,
                             record.sequence, lsn)

    def _restore(self, contents: persist.SnapshotContents) -> None:
        ingest = self._ingest
        for name, values in contents.dictionaries.items():
            if name == "test_id":
                ingest.tests = Dictionary.from_values(values, ingest.tests.capacity)
            else:
                ingest.dicts[name] = Dictionary.from_values(values, ingest.dicts[name].capacity)
        partitions: dict[int, PartitionView] = {}
        for batch in contents.events:
            code = int(batch.column("test")[0].as_py())
            cols = {c: batch.column(c) if c in ("session_id",) else batch.column(c).to_numpy() for c in COLUMNS}
            partitions[code] = partitions.get(code, PartitionView()).with_rows(cols, ingest.rollup_threshold(code))
        ingest.partitions = partitions
        ingest.publish_view()
        ingest.quarantine.restore(contents.quarantine)
        ingest.producers = {k: Producer(v["sequence"], 0) for k, v in contents.producers.items()}
        ingest.experiments = {k: Experiment.from_json(v) for k, v in contents.experiments.items()}

    # ---- snapshots ------------------------------------------------------------------------

    def snapshot(self, keep: int | None = None) -> SnapshotInfo:
        """Writes a snapshot now and returns once it is durable (keeping `keep` snapshots, the
        new one included; default --snapshots-kept)."""
        d, ingest = self._d, self._ingest
        if ingest.wal is None:
            raise AbstreamError("this store has no data directory to snapshot to")
        with self._lock:
            with ingest.lock:
                contents = self._capture()
                events_at, logged_at = ingest.event_count, ingest.logged_events
            root = Path(d.data_dir) / "snapshots"
            try:
                path = persist.write_snapshot(root, contents, d.snapshot_compression)
            except OSError as error:  # said as what it is: the log still holds everything
                self.snapshot_failures += 1
                raise _disk_refusal(error, f"the snapshot could not be written ({error.strerror or error}); the "
                                           "write-ahead log still holds every acknowledged event") from error
            self._last = _SnapshotClock(events=events_at, logged=logged_at)
            # The newest ones up to this one. One numbered past the log is not this log's (a copy
            # gone wrong): kept by number, it had this one deleted.
            found = persist.list_snapshots(root)
            kept = [(lsn, p) for lsn, p in found if lsn <= contents.lsn][: max(d.snapshots_kept if keep is None
                                                                            else keep, 1)]
            for lsn, old in found:
                if (lsn, old) not in kept:
                    if lsn > contents.lsn:
                        log.warning("deleting %s: numbered past the log's record %d, it is not this log's", old,
                                    contents.lsn)
                    shutil.rmtree(old, ignore_errors=True)
            for tmp in root.glob("tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
            # Keep the log back to the oldest kept snapshot, so any of them can be fallen back on.
            try:
                ingest.wal.drop_before(kept[-1][0])
            except OSError as error:  # the snapshot is whole: the next one deletes them
                log.warning("snapshot %s written, but the log segments it makes unneeded could not be deleted: %s",
                            path.name, error)
            log.info("snapshot %s written: %d events", path.name, events_at)
            return SnapshotInfo(path, events_at)

    def _capture(self) -> persist.SnapshotContents:
        """What a snapshot holds, taken under the ingest lock: cheap references, one tail copy."""
        ingest = self._ingest
        ingest.wait_sealed()  # the sealer publishes without the ingest lock: let it finish first
        lsn = ingest.wal.rotate()
        view = ingest.view
        batches = [(code, part) for code, partition in view.partitions.items() for part in partition.parts]
        tail_codes, tail_cols = ingest.tail.copy()
        producers = {k: {"sequence": v.sequence} for k, v in ingest.producers.items()}
        dictionaries = {"test_id": ingest.tests.values, **{n: d.values for n, d in ingest.dicts.items()}}
        return persist.SnapshotContents(lsn, _LazyBatches(batches, tail_codes, tail_cols), dictionaries,
                                        ingest.quarantine.table(), producers,
                                        {k: e.to_json() for k, e in ingest.experiments.items()})

    def maybe_snapshot(self) -> SnapshotInfo | None:
        """Snapshots when the configured number of events or seconds has passed since the last.

        Either way, not before the events since the last snapshot are `snapshot_log_ratio` of
        those it holds: a snapshot writes every event (~0.1 µs each), so at a fixed count its cost
        grew with the store, and a store of 100M events under ingest was snapshotted back to back,
        a core and ~500 MB/s of writes; by time alone, a trickle of events into it had the whole
        store written every five minutes. Rising with the store, snapshots write at most
        1 / ratio + 1 times the events ingested, and a restart replays at most `ratio` of the
        store from the log (11M events: replayed in 2.7 s, loaded from a snapshot in 1.3 s).
        The events since are those the log holds since, rejected ones too: a producer sending
        only bad events grew the log without end, never snapshotted.
        """
        d = self._d
        since = self._ingest.logged_events - self._last.logged
        worth = since > 0 and since >= d.snapshot_log_ratio * self._last.events
        due = worth and ((d.snapshot_every_events > 0 and since >= d.snapshot_every_events) or (
            d.snapshot_every_seconds > 0 and time.monotonic() - self._last.at >= d.snapshot_every_seconds))
        if not due or time.monotonic() < self._retry_at:
            return None
        try:
            return self.snapshot()
        except (ResourceExhausted, FailedPrecondition):
            self._retry_at = time.monotonic() + SNAPSHOT_RETRY_SECONDS  # a full disk is not written every second
            raise

    def close(self, final_snapshot: bool = True) -> None:
        """A last snapshot (so a restart replays nothing), then the log closed."""
        ingest = self._ingest
        try:
            ingest.wait_sealed()
            sealed = True
        except Exception:  # noqa: BLE001 - said as storing stopped; a snapshot now would leave its rows out
            sealed = False
        if ingest.wal is not None:
            if final_snapshot and sealed and ingest.wal.failure is None:  # after a failure: what was never logged stays out
                try:
                    self.snapshot()
                except (ResourceExhausted, FailedPrecondition) as error:  # the log holds it all: replayed at the start
                    log.warning("%s: the next start replays it", error)
            ingest.wal.close()
            ingest.wal = None
        if self._held is not None:
            os.close(self._held)  # the lock goes with it
            self._held = None


def _disk_refusal(error: OSError, message: str) -> ResourceExhausted | FailedPrecondition:
    """A file that could not be written, as a client's error: a full disk is retried later."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceExhausted(message, retry_after=SNAPSHOT_RETRY_SECONDS)
    return FailedPrecondition(message)


def _identity(data_dir: Path) -> str:
    """The data directory's name for itself (its file `store-id`, made at its first start): a
    copy restored from a backup keeps it, as it is the same store."""
    path = data_dir / "store-id"
    if not path.exists():
        made = data_dir / "store-id.tmp"
        made.write_text(uuid.uuid4().hex + "\n")
        with open(made, "rb") as f:
            os.fsync(f.fileno())
        made.replace(path)
        fsync_dir(data_dir)
    return path.read_text().strip()


def _hold(data_dir: Path) -> int:
    """An exclusive lock on the data directory (its file `lock`, holding this process's id), held
    while the store is open: two servers on one directory would each write their own record
    under the same number, and neither could start again."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held (other errors: the directory cannot be used, said as such)
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RecoveryError(f"{data_dir} is in use by another abstream server (process {holder}); one server per "
                            "data directory: stop it, or give this one its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class _LazyBatches:
    """The snapshot's record batches, built while writing (outside the ingest lock)."""

    def __init__(self, parts: list, tail_codes: np.ndarray, tail_cols: dict) -> None:
        self._parts, self._tail_codes, self._tail_cols = parts, tail_codes, tail_cols

    def __iter__(self):
        for code, part in self._parts:
            yield _with_test(part.batch(), code)
        if len(self._tail_codes):
            order = np.lexsort((self._tail_cols["timestamp"], self._tail_codes))
            codes = self._tail_codes[order]
            cols = {c: take(self._tail_cols[c], order) for c in COLUMNS}
            bounds = np.flatnonzero(np.diff(codes)) + 1
            for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(codes)]):
                arrays = [pa.array(cols[c][lo:hi]) if c in DTYPES else cols[c][lo:hi] for c in COLUMNS]
                yield _with_test(pa.RecordBatch.from_arrays(arrays, schema=STORED_SCHEMA), int(codes[lo]))


def _with_test(batch: pa.RecordBatch, code: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(np.full(batch.num_rows, code, np.int32)), *batch.columns],
                                      schema=persist.SNAPSHOT_SCHEMA)
