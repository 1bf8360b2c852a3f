"""Bytes into the core: a body or a file (NDJSON, CSV or Parquet) read by the same readers as
`abstream ingest`, chunk by chunk in a worker thread, and handed to the core's ingest as a stream
of batches, so that admission, validation, the quarantine and exactly-once are gRPC's. The HTTP
API, the Kafka connector and imports from object stores all come through here.

A line the readers cannot read (not JSON, a value of the wrong type) becomes a row of its own in
its batch, refused with the reader's reason, so that it is quarantined and counted like any
rejected event; the answer names every rejected line with its field and reason.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import collections.abc
import logging
import tempfile
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import numpy as np
import pyarrow as pa
from abstream.clients import files
from abstream.core import threads
from abstream.core.admission import RequestSize
from abstream.core.auth import Principal
from abstream.core.dataplane import Core
from abstream.core.errors import AbstreamError, InvalidArgument, ResourceExhausted, Unavailable
from abstream.core.events import EVENT_SCHEMA, MAX_EVENT_BYTES, Rejection
from abstream.core.types import DecodedBatch

log = logging.getLogger("abstream.ingest")

#: Rejected lines named one by one in an answer; past this only counted.
DETAILS_LIMIT = 10_000
#: Lines per batch handed to the core.
BATCH_LINES = 5_000


@dataclass
class Outcome:
    """What became of a body's lines."""

    stored: int = 0
    rejected_by_rules: int = 0  # quarantined: read, but not a valid event
    unreadable: int = 0  # quarantined: not readable as an event at all
    already_stored: int = 0  # sent before with the same idempotency key
    refused: int = 0  # events of tests the token may not write: neither stored nor quarantined
    rejections: list[dict] = field(default_factory=list)  # {"line", "field", "error"}, the first DETAILS_LIMIT
    refusals: list[dict] = field(default_factory=list)  # the same, of the refused events
    warnings: list[str] = field(default_factory=list)
    failure: Exception | None = None  # what stopped the reading (what came before it is stored)

    @property
    def quarantined(self) -> int:
        return self.rejected_by_rules + self.unreadable

    def details(self) -> dict:
        out = {"quarantined": self.rejections}
        if self.quarantined > len(self.rejections):
            out["quarantined_truncated"] = True
        if self.refused:  # said apart from the quarantined: they are in no quarantine
            out["refused_rows"], out["refused"] = self.refused, self.refusals
        if self.already_stored:
            out["already_stored_rows"] = self.already_stored
        if self.warnings:
            out["warnings"] = self.warnings
        return out


def at_line(line: int) -> str:
    return f"line {line}"


def _lines(chunk: files.Chunk) -> list[int]:
    """The line of each row `_with_unreadable` makes: the events', then the unreadable ones'."""
    return np.asarray(chunk.lines).tolist() + [line for line, _, _ in chunk.problems]


def _with_unreadable(chunk: files.Chunk, where: Callable[[int], str] | None = at_line
                     ) -> tuple[pa.Table, list[Rejection]]:
    """The chunk's events, then a row for each line that could not be read, of what of it could
    be (`files.Problem.partial`; nulls for the rest), refused with its reason (after
    `where(line)`, if given): the quarantine shows its test, user and the rest as sent."""
    if not chunk.problems:
        return chunk.table, []
    n = chunk.table.num_rows
    read = pa.Table.from_pylist([getattr(p, "partial", None) or {} for p in chunk.problems], schema=files.FILE_SCHEMA)
    table = pa.concat_tables([chunk.table.cast(files.FILE_SCHEMA), read])
    refuse = [Rejection(n + k, name, f"{where(line)}: {why}" if where else why)
              for k, (line, name, why) in enumerate(chunk.problems)]
    return table, refuse


class _Origin(collections.abc.Sequence):
    """Where each row of chunks decoded together came from (their rows start at `starts`), worked
    out only for the rows that are rejected (a list of every row's line would cost more than the
    rest of a large clean chunk's decoding)."""

    def __init__(self, chunks: list[files.Chunk], starts: list[int], where: Callable[[int], str]) -> None:
        self._chunks, self._starts, self._where = chunks, starts, where
        self._lines: dict[int, list] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i):
        k = bisect.bisect_right(self._starts, i) - 1
        if k not in self._lines:
            self._lines[k] = _lines(self._chunks[k])
        return self._where(self._lines[k][i - self._starts[k]])


class Ingest:
    """Bodies into the core: one worker thread per body being read (a bounded pool of them)."""

    def __init__(self, core: Core, max_bodies: int) -> None:
        self._core = core
        self.readers = max_bodies
        self._readers = threads.pool("abstream-read", max_bodies)

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    async def chunks(self, principal: Principal, make: Callable[[], Iterator[files.Chunk]], producer: str = "",
                     sequence: Callable[[files.Chunk, int], int] = lambda chunk, k: k,
                     where: Callable[[int], str] | None = None, skip_through: int = 0, whole: bool = False,
                     own_producers: bool = True, final: int | None = None) -> Outcome:
        """Stores what `make()` reads (in a worker thread); with `producer`, batch k (from 1) goes
        with `sequence(chunk, k)`, so the same body sent again stores nothing twice, and batches
        up to `skip_through` are not sent at all (stored before). `where(line)` says where a
        line came from, first in its rejections (the line number's own words if not given).
        `whole`: a small body, read in one step (its chunks are few, the hops between threads
        per chunk are not). An empty chunk is sent only when numbered `final`: it records that
        what had no events was read to its end."""
        loop = asyncio.get_running_loop()
        outcome = Outcome()
        in_flight: collections.deque = collections.deque()
        if whole:
            read = await loop.run_in_executor(self._readers, _read_whole, make)
            pull = lambda: _replay(read)  # noqa: E731
        else:
            reader = await loop.run_in_executor(self._readers, make)
            pull = lambda: loop.run_in_executor(self._readers, next, reader, None)  # noqa: E731

        async def batches() -> AsyncIterator[tuple[files.Chunk, int]]:
            k = 0
            while True:
                if (rejected := outcome.quarantined + outcome.refused) > MOST_UNREADABLE_LINES:
                    # Lines that read as events the rules reject (`{}`) cost what unreadable ones do
                    # (`readable`): counted as their acks come, a few batches behind the reading.
                    outcome.failure = files.FileProblem(f"more than {MOST_UNREADABLE_LINES:,} of its events were "
                                                        f"rejected ({rejected:,}): the rest of it was not read")
                    return
                try:
                    chunk = await pull()
                except MemoryError:  # the server's, not the body's fault (pyarrow's too: before ArrowException)
                    outcome.failure = ResourceExhausted("the server ran out of memory reading the body; retry later",
                                                        retry_after=5.0)
                    return
                except (files.FileProblem, AbstreamError, pa.ArrowException, OSError) as error:
                    # What came before is stored; the answer says so, and what stopped the reading.
                    outcome.failure = error
                    return
                except Exception as error:  # noqa: BLE001 - a reader's own defect, met on this input
                    log.exception("reading a body failed")
                    outcome.failure = InvalidArgument("body", f"could not be read past this point "
                                                              f"({type(error).__name__}: {error})")
                    return
                if chunk is None:
                    return
                number = sequence(chunk, k + 1)
                if not chunk.table.num_rows and not chunk.problems and not (producer and number == final):
                    continue
                k += 1
                if producer and number <= skip_through:
                    outcome.already_stored += chunk.table.num_rows + len(chunk.problems)
                    continue
                in_flight.append(chunk)
                yield chunk, number

        def measure(item) -> RequestSize:
            chunk, number = item
            # Chunks whose tables come out of `_with_unreadable` alike are decoded as one.
            return RequestSize(chunk.table.nbytes, chunk.table.num_rows + len(chunk.problems), chunk.table.nbytes,
                               producer, number if producer else 0, (chunk.table.schema, bool(chunk.problems)))

        def decode(items) -> DecodedBatch:
            # With `where`, the core says where each rejected event came from (DecodedBatch.origin).
            pieces = [_with_unreadable(chunk, None if where else at_line) for chunk, _ in items]
            starts = np.cumsum([0] + [table.num_rows for table, _ in pieces]).tolist()
            table = pieces[0][0] if len(pieces) == 1 else \
                pa.concat_tables([table for table, _ in pieces]).combine_chunks()
            refuse = [Rejection(r.index + at, r.field, r.message) for (_, rs), at in zip(pieces, starts) for r in rs]
            origin = _Origin([chunk for chunk, _ in items], starts, where) if where is not None else None
            return DecodedBatch(table, producer, items[-1][1] if producer else 0, refuse, origin=origin)

        try:
            async for result in self._core.ingest(principal, batches(), measure, decode, own_producers):
                self._tally(outcome, in_flight.popleft(), result, where)
        except (ResourceExhausted, Unavailable) as refused:  # the batches before it are stored
            outcome.failure = refused
        return outcome

    @staticmethod
    def _tally(outcome: Outcome, chunk: files.Chunk, result, where) -> None:
        """What became of one chunk, added to the outcome."""
        if result.duplicate:
            outcome.already_stored += chunk.table.num_rows + len(chunk.problems)
            return
        outcome.stored += result.accepted
        if not result.rejections:
            return
        lines = _lines(chunk)
        unreadable = chunk.table.num_rows  # rows from here on are the unreadable lines
        named, refused = [], []
        test_ids = chunk.table.column("test_id") if "test_id" in chunk.table.column_names else None
        for r in result.rejections:
            # Not kept in the quarantine: the events of tests the token may not write (a test id
            # outside its prefix), and, not refused for that, its lines without a test id.
            outside = (not r.quarantined and r.index < unreadable and test_ids is not None
                       and bool(test_ids[r.index].as_py()))
            if outside:
                outcome.refused += 1
            elif r.index >= unreadable:
                outcome.unreadable += 1
            else:
                outcome.rejected_by_rules += 1
            into = refused if outside else named
            if len(outcome.rejections) + len(outcome.refusals) + len(named) + len(refused) < DETAILS_LIMIT:
                into.append({"line": lines[r.index], "field": r.field,
                             "error": r.message.removeprefix(f"{(where or at_line)(lines[r.index])}: ")})
        outcome.rejections += sorted(named, key=lambda r: r["line"])
        outcome.refusals += sorted(refused, key=lambda r: r["line"])


def _read_whole(make: Callable[[], Iterator[files.Chunk]]) -> collections.deque:
    """Every chunk, then what stopped the reading (an exception) or None at the end."""
    read: collections.deque = collections.deque()
    try:
        read.extend(make())
        read.append(None)
    except Exception as error:  # raised again by _replay, where the chunk that failed would be
        read.append(error)
    return read


async def _replay(read: collections.deque) -> files.Chunk | None:
    item = read.popleft() if read else None
    if isinstance(item, Exception):
        raise item
    return item


def spooled(body, chunk_bytes: int = 1 << 20, most: int | None = None, name: str = "the body"):
    """A body copied to a temporary file (unlinked: gone once closed; a Parquet file is read from
    its end), in a worker thread; refused past `most` bytes."""
    spool, written = tempfile.TemporaryFile(), 0
    try:
        while piece := body.read(chunk_bytes):
            written += len(piece)
            if most is not None and written > most:
                raise files.FileProblem(f"{name} is more than {most:,} bytes: not read")
            spool.write(piece)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


#: A body is read no further once more of its lines than this could not be read as events: each
#: cost ~13 µs and ~1 KB while it was stored (a rejection, its quarantine row, its message) where
#: an event costs ~1 µs. A 4 MB body of 2M such lines took 32 s of the thread that stores every
#: stream's events and raised the server's peak memory by 540 MB; 100,000 is what the quarantine
#: keeps by default.
MOST_UNREADABLE_LINES = 100_000


def reader_for(fmt: str, body, name: str, warnings: list[str], batch_lines: int = BATCH_LINES
               ) -> Iterator[files.Chunk]:
    """The chunks of a body in `fmt` (runs in the worker thread)."""
    if fmt in ("ndjson", "csv"):
        return readable(files.read_stream(body, fmt, batch_lines, name, warnings.append), name)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        spool = spooled(body)
        try:
            schema = pq.ParquetFile(spool).schema_arrow
            # Strings are read as the file keeps them when it keeps them once per value (a
            # dictionary): one 20 KB value in 5,000 rows is then 20 KB, not 100 MB, and refused
            # by its length as any too-long string is.
            strings = [f.name for f in schema if f.name in EVENT_SCHEMA.names and (
                pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type))]
            parquet = pq.ParquetFile(spool, read_dictionary=strings)
        except (pa.ArrowInvalid, OSError) as error:  # a footer pyarrow cannot read is an OSError
            raise InvalidArgument("format", f"the body is not a Parquet file: {error}") from None
        return parquet_chunks(parquet, batch_lines, name)
    raise InvalidArgument("format", f"must be csv, ndjson or parquet, not {fmt[:32]!r}")


def parquet_chunks(parquet, rows: int, name: str, field: str = "body", use_threads: bool = True
                   ) -> Iterator[files.Chunk]:
    """A Parquet file's event columns (the others are never read) in chunks of `rows`, once its row
    groups are found to hold no more than their rows could as events (InvalidArgument naming
    `field` otherwise)."""
    columns = [c for c in EVENT_SCHEMA.names if c in parquet.schema_arrow.names]
    check_parquet_sizes(parquet.metadata, columns, name, field)
    return files._columnar(parquet.iter_batches(batch_size=rows, columns=columns, use_threads=use_threads), name)


def check_parquet_sizes(metadata, columns: list[str], name: str, field: str = "body") -> None:
    """Refuses a Parquet file any of whose row groups holds, uncompressed, more bytes of the event
    columns than its rows could as events: compressed, a few KB can decode to gigabytes, held
    while its batches are read."""
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        size = sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                   if group.column(j).path_in_schema.split(".")[0] in columns)
        most = group.num_rows * MAX_EVENT_BYTES + (1 << 20)
        if size > most:
            raise InvalidArgument(field, f"row group {i} of {name} holds {size:,} bytes of event columns "
                                          f"uncompressed, more than its {group.num_rows:,} rows could as events "
                                          f"({most:,}): not read")


def readable(chunks: Iterator[files.Chunk], name: str) -> Iterator[files.Chunk]:
    """The chunks, until more than MOST_UNREADABLE_LINES of their lines could not be read."""
    unreadable = 0
    for chunk in chunks:
        unreadable += len(chunk.problems)
        if unreadable > MOST_UNREADABLE_LINES:
            raise files.FileProblem(f"more than {MOST_UNREADABLE_LINES:,} lines of {name} could not be read as "
                                    "events: the rest of it was not read")
        yield chunk
