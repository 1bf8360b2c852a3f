"""The write-ahead log: every accepted batch is appended here, and made durable, before its ack.

Segments `wal-<first lsn>.log` hold records, each a header (magic, payload length, LSN, CRC-32 of
payload and LSN) and the payload. The CRC is computed by the thread that writes the record, outside
the lock that orders records (with fsync="always", the committing thread: ~35 ns per event of
checksumming off the thread that stores every batch). A record is complete only if its CRC
matches, so a crash in the middle of a write leaves a tail that replay detects, logs and cuts
off. A bad record with good records after it is not a torn write but damage; replay refuses to
guess and says where.

Durability: with `fsync="always"`, `commit(lsn)` returns once an fsync covering the record has
finished; concurrent writers share fsyncs (group commit). The records are written by the
commit that fsyncs them, not by `append`: `append` runs in the one thread that stores every
batch, under the ingest lock, and copying a batch's ~100 KB into the page cache there held up
the next batch; in the committing thread it overlaps with it. With `fsync="interval"`, `append`
writes the record, a background thread fsyncs every `interval_ms` and `commit` returns at once:
a process crash loses nothing (the kernel has the bytes), a power loss may lose the last
interval.

A write or fsync that fails (a full disk, an I/O error) stops the log for good: the bytes it left
are cut off, every commit waiting and every later append or commit raises `Unavailable`, and
nothing is written after the failure, so the log on disk stays a clean prefix of what was
acknowledged and a restart (once the disk is fixed) recovers exactly that. Batches applied but
not yet durable were never acknowledged, and are gone after the restart.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from abstream.core import threads
from abstream.core.errors import AbstreamError, Stopped, Unavailable

log = logging.getLogger("abstream.store.wal")

_MAGIC = 0xAB5E_0003
_HEADER = struct.Struct("<IIQI")  # magic, payload length, lsn, crc32(payload + lsn bytes)
_MAX_RECORD = 1 << 31


class WalCorruption(AbstreamError):
    """The log is damaged somewhere other than its tail: recovering would mean guessing."""


def _crc(lsn: int, payload_crc: int) -> int:
    return zlib.crc32(struct.pack("<Q", lsn), payload_crc)


@dataclass(frozen=True)
class Payload:
    """A record's payload, ready to be appended: its pieces (anything with the buffer protocol,
    never written again) and total size."""

    pieces: list
    size: int

    @classmethod
    def of(cls, pieces: list) -> Payload:
        return cls(pieces, sum(memoryview(piece).nbytes for piece in pieces))

    def record(self, lsn: int) -> list:
        """The record's pieces as written: its header (with the CRC), then the payload's."""
        crc = 0
        for piece in self.pieces:
            crc = zlib.crc32(piece, crc)
        return [_HEADER.pack(_MAGIC, self.size, lsn, _crc(lsn, crc)), *self.pieces]


def _records(pending: list[tuple[int, Payload]]) -> list:
    return [piece for lsn, payload in pending for piece in payload.record(lsn)]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The most buffers one writev takes (Linux: 1,024); records queued for a commit come in many
#: pieces (an IPC record is ~40 of its table's buffers).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in getattr(os, "sysconf_names", {}) else -1
_IOV_MAX = _IOV_MAX if _IOV_MAX > 0 else 1024  # -1: no stated limit


def _write_or_undo(fd: int, pieces: list) -> None:
    """`_write_all`, or none of it: a failed write's bytes are cut off (best effort) before its
    error is raised."""
    size = os.fstat(fd).st_size  # O_APPEND: where the write begins
    try:
        _write_all(fd, pieces)
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:  # a torn tail with nothing after it: replay cuts it off
            pass
        raise


def _write_all(fd: int, pieces: list) -> None:
    """Writes the pieces in order, IOV_MAX buffers per writev; a short write (a signal, a full
    disk) continues after it."""
    views = [v for v in (memoryview(p).cast("B") for p in pieces) if v.nbytes]
    at = 0
    while at < len(views):
        written = os.writev(fd, views[at:at + _IOV_MAX])
        while at < len(views) and written >= views[at].nbytes:
            written -= views[at].nbytes
            at += 1
        if at < len(views) and written:
            views[at] = views[at][written:]


class WriteAheadLog:
    def __init__(self, directory: Path, fsync: str = "always", interval_ms: int = 50) -> None:
        if fsync not in ("always", "interval"):
            raise ValueError(f"fsync policy must be 'always' or 'interval', not {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.policy = fsync
        self.interval_ms = interval_ms
        self._lock = threading.Lock()  # orders records: LSNs, the records not yet written, the segment
        self._writing = threading.Lock()  # one writer of pending records at a time, in LSN order
        self._fsyncing = threading.Lock()  # one fsync of the log at a time (`_fsync`)
        self._fsync_error: OSError | None = None
        self._synced_bytes: dict[int, int] = {}  # of each segment (by inode): its size at its last good fsync
        self._pending: list[tuple[int, Payload]] = []  # records appended, not yet written (fsync="always")
        self._synced = threading.Condition(threading.Lock())
        self._syncing = False
        self._durable_lsn = 0
        self._fd: int | None = None
        self._segment_first = 0
        self.next_lsn = 1
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None
        self.failure: OSError | None = None  # the write or fsync that stopped the log

    def _failed(self, error: OSError) -> None:
        """Stops the log after a failed write or fsync (see the module's docstring)."""
        with self._lock:
            self._stopped(error)
        with self._synced:
            self._synced.notify_all()

    def _stopped(self, error: OSError) -> None:
        """`_failed`, under `_lock`."""
        if self.failure is None:
            log.error("the write-ahead log could not be written: %s. This server stores no more events until it is "
                      "restarted; %s", error, self._safe)
            self.failure = error
        self._pending = []  # after the failed records: never written

    @property
    def _safe(self) -> str:
        """What a failure leaves of the acknowledged events: with fsync="interval" the last
        interval's were acknowledged before any fsync, and a failed fsync may have lost them."""
        if self.policy == "always":
            return "the events it acknowledged are safe"
        return f"the events it acknowledged up to {self.interval_ms} ms before the failure are safe"

    def refusal(self) -> Stopped:
        return Stopped(f"the write-ahead log could not be written ({self.failure}): this server stores no more "
                           f"events until it is restarted ({self._safe}); send them to another server or retry once "
                           "it is back", retry_after=5.0)

    def _fsync(self, fd: int) -> None:
        """fsync of the log's segment, one at a time, and none after one failed. Linux reports a
        failed writeback to one fsync of an open file (and a descriptor and its dup share one):
        a commit's fsync racing the rotation's failed one could return success for pages that
        were lost, and acknowledge them."""
        with self._fsyncing:
            if self._fsync_error is None:
                held = os.fstat(fd)
                try:
                    os.fsync(fd)
                    self._synced_bytes[held.st_ino] = max(self._synced_bytes.get(held.st_ino, 0), held.st_size)
                except OSError as error:
                    self._fsync_error = error
            if self._fsync_error is not None:
                raise self._fsync_error

    def _cut_unsynced(self) -> None:
        """After a failed fsync (fsync="always"; under `_writing`, so that nothing is written
        meanwhile): the segment being written back to its size at its last good fsync, cutting
        records acknowledged to no one, so that a restart does not replay records refused to their
        callers (taken for the originals of their resends, or stored twice when untagged). The
        segments before were each fsynced whole before the next one began."""
        if self.policy != "always" or self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._synced_bytes.get(os.fstat(self._fd).st_ino, 0))
        except OSError as error:
            log.warning("cutting the records a failed fsync held off the write-ahead log failed (%s): a restart "
                        "replays them", error)

    # ---- reading (at start) ----------------------------------------------------------------

    def segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob("wal-*.log"):
            try:
                found.append((int(path.stem[4:]), path))
            except ValueError:
                continue
        return sorted(found)

    def replay(self, after_lsn: int) -> Iterator[tuple[int, bytes]]:
        """Records with LSN > after_lsn, in order; cuts a torn tail off the last segment."""
        segments = self.segments()
        expected: int | None = None
        # The torn tail a crash leaves may be followed by empty segments: those a restart opened
        # before the next crash (with fsync="interval" the tail's pages could be lost after that).
        written = [i for i, (_, path) in enumerate(segments) if path.stat().st_size]
        read: list[Path] = []
        for i, (first, path) in enumerate(segments):
            if i + 1 < len(segments) and segments[i + 1][0] <= after_lsn + 1:
                continue  # every record in it is before the snapshot: not read (damage there loses nothing)
            last_segment = not written or i >= written[-1]
            data = path.read_bytes()
            read.append(path)
            offset = 0
            while offset < len(data):
                record = self._read(data, offset)
                if record is None:
                    if last_segment and not self._valid_record_after(data, offset):
                        log.warning("cutting a torn or corrupt tail off %s at byte %d (%d bytes): a write the "
                                    "process did not finish (with --fsync always, never acknowledged)",
                                    path, offset, len(data) - offset)
                        with open(path, "r+b") as f:
                            f.truncate(offset)
                            os.fsync(f.fileno())
                        break
                    raise WalCorruption(
                        f"write-ahead log {path} is damaged at byte {offset} and holds records after the damage; "
                        "refusing to start rather than skip acknowledged events. Restore the data directory from "
                        "a backup, or move this segment aside to start without the events it holds")
                lsn, payload, size = record
                if expected is not None and lsn != expected:
                    raise WalCorruption(f"write-ahead log {path}: record {lsn} at byte {offset} follows {expected - 1}")
                expected = lsn + 1
                if lsn > after_lsn:
                    yield lsn, payload
                offset += size
        # What was replayed is taken as durable, and a producer's resend of it is acknowledged as a
        # duplicate: records a crash left in the page cache (written, their fsync never done, so
        # never acknowledged) are made durable first, or a power loss after the restart lost them.
        for path in read:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.directory)
        self.next_lsn = max(self.next_lsn, (expected or 1), after_lsn + 1)
        self._durable_lsn = self.next_lsn - 1

    @staticmethod
    def _read(data: bytes, offset: int) -> tuple[int, bytes, int] | None:
        if offset + _HEADER.size > len(data):
            return None
        magic, length, lsn, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if magic != _MAGIC or length > _MAX_RECORD or end > len(data):
            return None
        payload = data[offset + _HEADER.size:end]
        if _crc(lsn, zlib.crc32(payload)) != crc:
            return None
        return lsn, payload, end - offset

    def _valid_record_after(self, data: bytes, offset: int) -> bool:
        magic = struct.pack("<I", _MAGIC)
        at = data.find(magic, offset + 1)
        while at != -1:
            if self._read(data, at) is not None:
                return True
            at = data.find(magic, at + 1)
        return False

    # ---- writing ----------------------------------------------------------------------------

    def open(self) -> None:
        """Start writing after the records replay found, in a new segment."""
        self._start_segment()
        if self.policy == "interval":
            self._flusher = threading.Thread(target=self._flush_every_interval, name="abstream-flush", daemon=True)
            self._flusher.start()

    def _start_segment(self) -> None:
        """A new segment from the next LSN on (under `_writing` and `_lock`, nothing pending).
        Opened before the old one is closed: with no descriptor free, the old one stays the
        segment written (an empty new one left behind is passed over by replay)."""
        fd = os.open(self.directory / f"wal-{self.next_lsn:020d}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._fd is not None:
            try:
                self._fsync(self._fd)
            except OSError:
                os.close(fd)
                self._cut_unsynced()
                raise
            old, self._fd = self._fd, None  # closed once: close() must not close its number again
            os.close(old)
            self._synced_bytes.clear()  # of the segments before: no longer written
        self._segment_first = self.next_lsn
        self._fd = fd
        fsync_dir(self.directory)

    def append(self, payload: Payload) -> int:
        """Logs one record (written to the OS now with fsync="interval", else by the commit that
        fsyncs it); returns its LSN."""
        if payload.size > _MAX_RECORD:
            raise AbstreamError(f"a log record of {payload.size} bytes; at most {_MAX_RECORD}")
        with self._lock:
            if self.failure is not None:
                raise self.refusal()
            lsn = self.next_lsn
            if self.policy == "always":
                self._pending.append((lsn, payload))
            else:
                try:
                    _write_or_undo(self._fd, payload.record(lsn))
                except OSError as error:
                    self._stopped(error)
                    raise self.refusal() from error
            self.next_lsn = lsn + 1
            return lsn

    def _written(self) -> tuple[int, int]:
        """Writes the records appended so far; returns the last one's LSN and a descriptor of the
        segment they are in (the caller closes it)."""
        with self._writing:
            with self._lock:
                if self.failure is not None:
                    raise self.refusal()
                try:
                    fd = os.dup(self._fd)
                except OSError as error:  # out of descriptors, say: the records stay queued for the next commit
                    raise Unavailable(f"the write-ahead log cannot be written now ({error.strerror or error})",
                                      retry_after=1.0) from error
                pending, self._pending = self._pending, []
                target = self.next_lsn - 1
            try:
                _write_or_undo(fd, _records(pending))
            except OSError as error:
                os.close(fd)
                self._failed(error)
                raise self.refusal() from error
            except BaseException:
                os.close(fd)
                raise
            return target, fd

    def _synced_to(self, fd: int) -> None:
        """fsync, then close, `fd`; a failed fsync stops the log (the kernel may have dropped the pages)."""
        try:
            self._fsync(fd)
        except OSError as error:
            with self._writing:
                self._cut_unsynced()
            self._failed(error)
            raise self.refusal() from error
        finally:
            os.close(fd)

    def commit(self, lsn: int) -> None:
        """Returns once record `lsn` is as durable as the policy promises."""
        if self.policy == "interval":
            return
        with self._synced:
            while self._durable_lsn < lsn:
                if self.failure is not None:
                    raise self.refusal()
                if self._syncing:
                    self._synced.wait()
                    continue
                self._syncing = True
                self._synced.release()
                try:
                    target, fd = self._written()  # everything appended so far rides on this fsync
                    self._synced_to(fd)
                finally:
                    self._synced.acquire()
                    self._syncing = False
                    self._synced.notify_all()  # the waiters: durable now, or the log failed
                self._durable_lsn = max(self._durable_lsn, target)

    def _flush_every_interval(self) -> None:
        threads.name_native("abstream-flush")
        while not self._closed.wait(self.interval_ms / 1000) and self.failure is None:
            try:
                self.sync()
            except Unavailable:  # the log failed (said once, by _failed: the loop ends), or no descriptor is free now
                pass

    def sync(self) -> None:
        if self._fd is None:
            return
        target, fd = self._written()
        self._synced_to(fd)
        with self._synced:
            self._durable_lsn = max(self._durable_lsn, target)
            self._synced.notify_all()

    def rotate(self) -> int:
        """Starts a new segment (the old one written and synced); returns the first LSN the new one holds."""
        with self._writing, self._lock:
            if self.failure is not None:
                raise self.refusal()
            try:
                _write_or_undo(self._fd, _records(self._pending))
                self._pending = []
                self._start_segment()
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):  # no descriptor free now: the log goes on as it was
                    raise Unavailable(f"the write-ahead log cannot start its next segment now ({error.strerror}); "
                                      "the snapshot is taken later", retry_after=1.0) from error
                self._stopped(error)
                raise self.refusal() from error
            first = self.next_lsn
        with self._synced:
            self._durable_lsn = max(self._durable_lsn, first - 1)
            self._synced.notify_all()
        return first

    def drop_before(self, lsn: int) -> None:
        """Deletes segments whose every record has an LSN below `lsn`."""
        segments = self.segments()
        for (first, path), (next_first, _) in zip(segments, segments[1:]):
            if next_first <= lsn and first != self._segment_first:
                path.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def close(self) -> None:
        self._closed.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
        with self._writing, self._lock:
            if self._fd is not None:
                try:
                    if self.failure is None:  # after a failure, nothing more is written
                        _write_or_undo(self._fd, _records(self._pending))
                        self._fsync(self._fd)
                finally:
                    self._pending = []
                    os.close(self._fd)
                    self._fd = None
