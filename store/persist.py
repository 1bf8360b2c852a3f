"""What goes to disk: write-ahead log records, and snapshots as Arrow IPC files.

A log record is one acknowledged batch: the events that were stored (as EVENT_SCHEMA strings,
so replay encodes the same strings again; columns of few values may be dictionary
arrays, `logged_table`), the rejected ones with their reasons, and the producer's id and
sequence. Replay trusts records; it never validates again, since a batch's validity depended
on the server's clock when it arrived.

A snapshot is a directory `snap-<lsn>` (the first log record it does not contain):

    manifest.json        what the snapshot holds, and every file's size and CRC-32
    events.arrow         stored events, one record batch per part, with a `test` code column
    dict-<field>.arrow   each dictionary's strings in code order (a code is a row number)
    quarantine.arrow     rejected events with their reasons
    producers.json       last applied sequence per producer
    experiments.json     each test's plan (control, split, start, stop)

It is written to `tmp-<lsn>`, every file fsynced, then renamed and the parent fsynced, so a
snapshot directory either is complete or does not exist under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
from abstream.core.events import Rejection
from abstream.store import quarantine
from abstream.store.schema import STORED_SCHEMA
from abstream.store.wal import fsync_dir

_SIZES = struct.Struct("<IQ")  # header bytes, batch bytes
SNAPSHOT_SCHEMA = pa.schema([pa.field("test", pa.int32()), *STORED_SCHEMA])


class SnapshotError(Exception):
    """A snapshot is incomplete or damaged; the caller falls back to an older one."""


# ---- log records ------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One applied batch as logged: every event as it arrived, and which were rejected and why
    (replay stores the others, exactly as they were stored the first time)."""

    batch: pa.Table
    rejections: list[Rejection]
    producer_id: str
    sequence: int
    received_ns: int


class _Pieces:
    """A sink that keeps what an Arrow writer hands it: its metadata as bytes, and the table's
    own buffers, not copies of them."""

    closed = False

    def __init__(self) -> None:
        self.pieces: list[bytes | pa.Buffer] = []
        self.size = 0

    def write(self, piece: bytes | pa.Buffer) -> int:
        self.pieces.append(piece)
        self.size += len(piece)
        return len(piece)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _ipc(table: pa.Table) -> _Pieces:
    """The table as an Arrow IPC stream, in pieces: writing it into one buffer copied every
    event's bytes once more before the log wrote them."""
    sink = _Pieces()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        writer.write_table(table)
    return sink


#: String columns that take few distinct values, logged dictionary-encoded (`logged_table`).
FEW_VALUES = ("test_id", "variant", "event_type", "device", "country")
#: The most values a dictionary logged with a record may have (int16 codes).
LOGGED_DICTIONARY = 32767


def logged_table(table: pa.Table, few: dict[str, tuple[np.ndarray, pa.Array]], conversion: np.ndarray) -> pa.Table:
    """The batch as its log record holds it when every row is stored: each column in `few` as a
    dictionary array of (every row's code, the values of the codes), and `conversion` as a byte.
    A row batch's record took 113 bytes per event with every column as it arrived, ~56 so;
    replay reads them as it reads a columnar request's dictionary columns."""
    columns = {name: table.column(name) for name in table.column_names}
    for name, (codes, values) in few.items():
        index = np.int8 if len(values) <= 127 else np.int16
        columns[name] = pa.DictionaryArray.from_arrays(pa.array(codes.astype(index)), values)
    columns["conversion"] = pa.array(conversion)
    return pa.table(columns)


def encode_record(record: Record, ipc: pa.Buffer | bytes | None = None) -> list[bytes | pa.Buffer]:
    """The record's payload, in pieces that the log writes one after the other without joining.

    `ipc`, when given, is the batch as the Arrow IPC stream it arrived in: logged as is, not
    written again.
    """
    header = json.dumps({"producer_id": record.producer_id, "sequence": record.sequence,
                         "received_ns": record.received_ns,
                         # [index, field, message], and false after them for one not quarantined
                         "rejections": [r if not r.quarantined else r[:3] for r in record.rejections]},
                        separators=(",", ":"), check_circular=False).encode()
    if ipc is None:
        body = _ipc(record.batch)
        pieces, size = body.pieces, body.size
    else:
        pieces, size = [ipc], memoryview(ipc).nbytes
    return [_SIZES.pack(len(header), size) + header, *pieces]


def encode_experiment(experiment: dict) -> list[bytes]:
    """A record of an experiment's plan as defined or changed (no events)."""
    header = json.dumps({"experiment": experiment}, separators=(",", ":")).encode()
    return [_SIZES.pack(len(header), 0) + header]


@dataclass(frozen=True)
class Removal:
    """A record of events removed: a test deleted, a user erased, events past a retention
    horizon. Replay removes them again at the same point."""

    change: dict


def encode_removal(change: dict) -> list[bytes]:
    header = json.dumps({"removal": change}, separators=(",", ":")).encode()
    return [_SIZES.pack(len(header), 0) + header]


def decode_record(payload: bytes) -> Record | Removal | dict:
    """A batch's record, a removal, or an experiment's plan (a dict)."""
    h, b = _SIZES.unpack_from(payload)
    at = _SIZES.size
    header = json.loads(payload[at:at + h])
    if "experiment" in header:
        return header["experiment"]
    if "removal" in header:
        return Removal(header["removal"])
    batch = pa.ipc.open_stream(pa.py_buffer(payload)[at + h:at + h + b]).read_all()
    return Record(batch, [Rejection(*x) for x in header["rejections"]], header["producer_id"], header["sequence"],
                  header["received_ns"])


# ---- snapshots --------------------------------------------------------------------------

@dataclass(frozen=True)
class SnapshotContents:
    """Everything a snapshot holds, as the store hands it over or gets it back."""

    lsn: int
    events: Iterable[pa.RecordBatch]  # SNAPSHOT_SCHEMA, one batch per part, sorted by timestamp
    dictionaries: dict[str, pa.Array]
    quarantine: pa.Table
    producers: dict[str, Any]
    experiments: dict[str, dict] = field(default_factory=dict)


def _write_ipc(path: Path, schema: pa.Schema, batches: list[pa.RecordBatch], compression: str | None) -> None:
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _crc_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_snapshot(root: Path, contents: SnapshotContents, compression: str) -> Path:
    """Writes a complete snapshot atomically; returns its directory."""
    codec = None if compression == "none" else compression
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"snap-{contents.lsn:020d}"
    tmp = root / f"tmp-{contents.lsn:020d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, contents, codec, compression)
        if final.exists():  # the same LSN again (nothing was logged since): the same store
            if _matches_manifest(final):  # already whole on disk: kept (removing it first left none for a moment)
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)  # damaged: replaced
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: what was written is given back at once
        raise
    fsync_dir(root)
    return final


def _write_files(tmp: Path, contents: SnapshotContents, codec: str | None, compression: str) -> None:
    """A snapshot's files and their manifest, each fsynced, in `tmp`."""
    files = {"events.arrow": (SNAPSHOT_SCHEMA, contents.events),
             "quarantine.arrow": (quarantine.SCHEMA, contents.quarantine.to_batches())}
    for name, values in contents.dictionaries.items():
        files[f"dict-{name}.arrow"] = (pa.schema([("value", pa.string())]),
                                       [pa.record_batch([values], names=["value"])])
    for name, (schema, batches) in files.items():
        _write_ipc(tmp / name, schema, batches, codec)
    (tmp / "producers.json").write_text(json.dumps(contents.producers))
    (tmp / "experiments.json").write_text(json.dumps(contents.experiments))
    manifest = {
        "format": 1, "lsn": contents.lsn, "created_ns": time.time_ns(), "compression": compression,
        "files": {p.name: {"size": p.stat().st_size, "crc32": _crc_file(p)} for p in sorted(tmp.iterdir())},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for path in tmp.iterdir():
        _fsync_file(path)
    fsync_dir(tmp)


def _matches_manifest(path: Path) -> bool:
    """Whether a snapshot's files are those its manifest lists (sizes and CRC-32s)."""
    try:
        _check_manifest(path)
        return True
    except (SnapshotError, OSError, ValueError, KeyError):
        return False


def _check_manifest(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    for name, expected in manifest["files"].items():
        file = path / name
        if file.stat().st_size != expected["size"] or _crc_file(file) != expected["crc32"]:
            raise SnapshotError(f"{file} does not match the manifest (size or CRC-32)")
    return manifest


def list_snapshots(root: Path) -> list[tuple[int, Path]]:
    """Complete snapshot directories, newest first."""
    found = []
    for path in root.glob("snap-*") if root.is_dir() else []:
        try:
            found.append((int(path.name[5:]), path))
        except ValueError:
            continue
    return sorted(found, reverse=True)


def load_snapshot(path: Path) -> SnapshotContents:
    """Reads and checks one snapshot; raises SnapshotError when anything is off."""
    try:
        manifest = _check_manifest(path)

        def read(name: str) -> pa.Table:
            # Memory-mapped: uncompressed columns are used where they lie, without a copy.
            return pa.ipc.open_file(pa.memory_map(str(path / name))).read_all()

        events = pa.ipc.open_file(pa.memory_map(str(path / "events.arrow")))
        batches = [events.get_batch(i) for i in range(events.num_record_batches)]
        dictionaries = {p.name[5:-6]: read(p.name).column("value").combine_chunks() for p in path.glob("dict-*.arrow")}
        return SnapshotContents(manifest["lsn"], batches, dictionaries, read("quarantine.arrow"),
                                json.loads((path / "producers.json").read_text()),
                                json.loads((path / "experiments.json").read_text())
                                if (path / "experiments.json").exists() else {})
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, pa.ArrowException) as error:
        raise SnapshotError(f"{path} cannot be read: {error}") from error
