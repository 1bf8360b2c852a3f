"""Imports from S3 (and S3-compatible stores, and local files) through pyarrow.fs, exactly once.

Each object is a producer: `import:` and a hash of its URI, size and modification time (pyarrow.fs
does not expose an ETag; size and last-modified change whenever the object is written again).
Its batches are numbered 1, 2, … and the last one is numbered FINISHED, so the store remembers,
durably and with the events, whether an object was imported whole, or how far an interrupted
import got: running the import again reads only what is new, and resumes an interrupted object
after its last stored batch. Parquet and Arrow objects are read columnar, a batch at a time
(random access, never whole); CSV and NDJSON are streamed, gzip or not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import io
import logging
import os
import struct
import urllib.parse
from dataclasses import dataclass
from typing import AsyncIterator, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from abstream.clients import files
from abstream.clients.columnar import LOW_CARDINALITY
from abstream.core import ipc
from abstream.core.auth import ANYONE, Principal
from abstream.core.dataplane import Core, whole_store
from abstream.core.errors import AbstreamError, InvalidArgument, ResourceExhausted, Stopped, Unavailable
from abstream.core.events import MAX_EVENT_BYTES, MAX_VALUE_BYTES
from abstream.sources.ingest import BATCH_LINES, Ingest, parquet_chunks, readable, spooled

log = logging.getLogger("abstream.sources.objects")

#: The sequence of an object's last batch: past it, the object is imported.
FINISHED = 1 << 62
#: What the AWS SDK says of a failure that passes (the store unreachable, slowing callers down,
#: failing inside): the import is UNAVAILABLE, not the caller's mistake.
_PASSING = ("NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
            "REQUEST_TIMEOUT")
#: Rows per batch of a columnar object.
COLUMNAR_ROWS = 262_144
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
           ".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson", ".json": "ndjson"}


@dataclass
class Progress:
    """One object's state, and the import's so far (what ImportEventsResponse carries)."""

    uri: str
    state: str  # started, imported, skipped, failed
    size: int = 0
    accepted: int = 0
    quarantined: int = 0
    already_stored: int = 0
    error: str = ""
    objects_total: int = 0
    objects_done: int = 0
    total_accepted: int = 0
    total_quarantined: int = 0


def filesystem(uri: str, endpoint_url: str = "", region: str = "", import_root: str = ""
               ) -> tuple[pafs.FileSystem, str, str]:
    """(the file system, the path in it, the URI's scheme and bucket to name objects by). A
    local path must be under `import_root`: nobody imports the server's other files."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "s3":
        # A key is what follows the bucket, whole: '#' and '?' are characters of keys here, not a
        # URL's fragment and query (which cut s3://b/run#2/ to the prefix b/run: every run imported).
        bucket, _, key = uri.strip()[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidArgument("uri", f"{uri[:128]!r} names no bucket: s3://bucket/prefix/")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
        options: dict = {"region": region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                         or "us-east-1"}
        if endpoint:  # pyarrow does not read AWS_ENDPOINT_URL itself
            e = urllib.parse.urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            options.update(endpoint_override=e.netloc, scheme=e.scheme or "https")
        return pafs.S3FileSystem(**options), f"{bucket}/{key}" if key else bucket, "s3://"
    if parsed.scheme in ("", "file"):
        if not import_root:
            raise InvalidArgument("uri", "local paths are imported only under the server's --import-root, which is "
                                         "not set: import from s3://, or start the server with --import-root DIR")
        path = os.path.realpath(parsed.path if parsed.scheme == "file" else uri)
        if not under_root(path, import_root):
            raise InvalidArgument("uri", f"{uri[:256]} is not under the server's --import-root "
                                         f"{os.path.realpath(import_root)}")
        return pafs.LocalFileSystem(), path, ""
    raise InvalidArgument("uri", f"{parsed.scheme}:// is not supported: s3://bucket/prefix/ or a local path")


def _endpoint(url: str) -> str:
    """An endpoint as compared: its scheme, host and port, in lower case (https when none is said)."""
    e = urllib.parse.urlparse(url if "://" in url else f"https://{url}")
    return f"{e.scheme.lower()}://{(e.netloc or '').lower()}"


def check_endpoint(endpoint_url: str, allowed: str) -> None:
    """A request may name an S3 endpoint only if the server's operator allowed it: an admin token
    is not the operator, and the endpoint named is where the server connects (a host on its
    network, a port scan from its errors)."""
    if not endpoint_url:
        return
    own = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    listed = {_endpoint(e.strip()) for e in [own, *allowed.split(",")] if e.strip()}
    if _endpoint(endpoint_url) not in listed:
        raise InvalidArgument("endpoint_url", f"{endpoint_url[:128]!r} is not an endpoint this server imports from: "
                                              "its operator lists them with --import-endpoints")


def under_root(path: str, import_root: str) -> bool:
    """Whether a local path, its links followed, is under `import_root`."""
    path, root = os.path.realpath(path), os.path.realpath(import_root)
    return os.path.commonpath([path, root]) == root


def _listed(found: list[pafs.FileInfo], under: str) -> list[pafs.FileInfo]:
    """The objects of a listing under `under` (a folder, or a key prefix as typed), in name
    order, but for those a writer leaves beside its data: a name with a part after `under` that
    starts with `_` or `.` (Spark's and Hadoop's `_SUCCESS` and `_temporary/`, whose files are
    then copied to their own names and would be imported twice; `.` for hidden files), as Arrow's
    and Spark's own dataset readers skip them. What was typed is never tested (`s3://b/_2025`)."""
    def kept(f: pafs.FileInfo) -> bool:
        parts = f.path[len(under):].split("/")
        if not under.endswith("/"):  # the rest of a part typed in part
            parts = parts[1:]
        return f.type == pafs.FileType.File and f.path.startswith(under) and \
            not any(part[:1] in ("_", ".") for part in parts)
    return sorted((f for f in found if kept(f)), key=lambda f: f.path)


def objects(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The objects at `path`: itself if it is one, else every one under it (`_listed`), in name
    order."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound and isinstance(fs, pafs.LocalFileSystem):
        raise InvalidArgument("uri", f"{path[:256]} does not exist on the server")
    bucket = path.split("/", 1)[0]
    if not isinstance(fs, pafs.LocalFileSystem) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        # Listing a missing bucket finds nothing, as an empty one does: said, not "nothing to import".
        raise InvalidArgument("uri", f"there is no bucket {bucket[:64]!r} (or these credentials cannot see it)")
    if info.type == pafs.FileType.NotFound and not path.endswith("/"):  # a key prefix: s3://bucket/events/2025-
        prefix = path.rsplit("/", 1)[0]
        found = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return _listed(found, path)
    found = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    return _listed(found, path.rstrip("/") + "/")


def format_of(name: str, requested: str) -> tuple[str, str | None]:
    """(format, compression) of an object."""
    compression = "gzip" if name.lower().endswith(".gz") else None
    stem = name[:-3] if compression else name
    if requested:
        if requested not in ("parquet", "arrow", "csv", "ndjson"):
            raise InvalidArgument("format", f"must be parquet, arrow, csv or ndjson, not {requested[:32]!r}")
        return requested, compression
    for suffix, fmt in FORMATS.items():
        if stem.lower().endswith(suffix):
            return fmt, compression
    raise InvalidArgument("format", f"cannot tell the format of {name!r} from its name: give one "
                                    "(parquet, arrow, csv or ndjson)")


def producer_of(uri: str, info: pafs.FileInfo) -> str:
    version = f"{uri}\0{info.size}\0{info.mtime_ns}"
    return "import:" + hashlib.sha256(version.encode()).hexdigest()[:40]


#: Read as Parquet stores them (dictionary pages): no strings materialized, and the server's
#: dictionary encoding then works on the distinct values only. Not the ids of users and sessions:
#: nearly every value is distinct, and as dictionaries they cost more to read and to log.
_DICTIONARIES = list(LOW_CARDINALITY)


def read_object(fs: pafs.FileSystem, info: pafs.FileInfo, fmt: str, compression: str | None, name: str,
                warn) -> Iterator[files.Chunk]:
    if fmt == "parquet" and not compression:
        import pyarrow.parquet as pq

        source = fs.open_input_file(info.path)
        present = set(pq.ParquetFile(source).schema_arrow.names)  # its footer: optional columns may be absent
        parquet = pq.ParquetFile(source, read_dictionary=[c for c in _DICTIONARIES if c in present], pre_buffer=True)
        return parquet_chunks(parquet, COLUMNAR_ROWS, name, "uri", use_threads=False)
    if fmt == "arrow" and not compression:
        return _arrow_file(fs.open_input_file(info.path), name, info.size)
    stream = fs.open_input_stream(info.path, compression=compression, buffer_size=1 << 20)
    if fmt == "parquet":  # compressed: read from its end only once inflated
        import pyarrow.parquet as pq

        return parquet_chunks(pq.ParquetFile(_inflated(stream, info.size, name)), COLUMNAR_ROWS, name, "uri",
                              use_threads=False)
    if fmt == "arrow":
        inflated = _inflated(stream, info.size, name)
        return _arrow_file(inflated, name, inflated.seek(0, 2))
    text = io.BufferedReader(_Raw(stream), 1 << 20)
    if compression is None and text.peek(2)[:2] == files.GZIP_MAGIC:  # gzip whatever its name, as files are read
        text = io.BufferedReader(gzip.GzipFile(fileobj=text, mode="rb"), 1 << 20)
    return readable(files.read_stream(text, fmt, BATCH_LINES, name, warn), name)


#: The most one record batch of an Arrow object may grow by when decompressed: it is read whole.
MOST_ARROW_INFLATION = 256 << 20


def _arrow_file(source, name: str, size: int) -> Iterator[files.Chunk]:
    """An Arrow IPC file's events in chunks of at most COLUMNAR_ROWS, once its footer and its
    batches' metadata show that decompressing them costs no more than their rows could hold as
    events, nor any batch more than MOST_ARROW_INFLATION beyond its own size: its buffers may be
    compressed, and a few hundred KB of zeros decompressed to gigabytes, each batch read whole.
    An uncompressed file costs what it holds, whatever its columns."""
    try:
        measured, most = ipc.measure_file(source)
    except (ValueError, struct.error) as error:
        raise InvalidArgument("uri", f"{name} is not a readable Arrow IPC file: {error}") from None
    limit = max(ipc.byte_limit(measured, MAX_EVENT_BYTES, MAX_VALUE_BYTES), size)
    if measured.decoded_bytes > limit:
        raise InvalidArgument("uri", f"{name} decompresses to {measured.decoded_bytes:,} bytes, more than its "
                                     f"{measured.rows:,} rows could hold as events ({limit:,}): not read")
    if most > MOST_ARROW_INFLATION:
        raise InvalidArgument("uri", f"{name} has a record batch that decompresses to {most:,} bytes more than its "
                                     f"size, past the {MOST_ARROW_INFLATION:,} one may: write it in smaller record "
                                     "batches")
    reader = pa.ipc.open_file(source)
    return files._columnar((batch.slice(at, COLUMNAR_ROWS) for i in range(reader.num_record_batches)
                            for batch in (reader.get_batch(i),) for at in range(0, batch.num_rows, COLUMNAR_ROWS)),
                           name)


#: A compressed Parquet or Arrow object may inflate to at most this many times its size, and 64
#: MiB (Parquet and Arrow are compressed within already: gzip gains them little; zeros gain it
#: 1,000 times). It is inflated into a temporary file, as these are read from their ends:
#: inflated in memory, a 780 KB object of zeros took 768 MiB.
MOST_INFLATION = 100


def _inflated(stream, size: int, name: str) -> BinaryIO:
    return spooled(stream, most=MOST_INFLATION * size + (64 << 20), name=f"{name} inflated")


class _Raw(io.RawIOBase):
    """A pyarrow input stream as Python's readers take it (it has no readline of its own)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


def _final_marked(chunks: Iterator[files.Chunk], final: list) -> Iterator[files.Chunk]:
    """The chunks, the last one put in `final` before it is handed on (so it is numbered FINISHED)."""
    previous = None
    for chunk in chunks:
        if not chunk.table.num_rows and not chunk.problems:
            continue
        if previous is not None:
            yield previous
        previous = chunk
    if previous is None:
        previous = files.Chunk(files.FILE_SCHEMA.empty_table(), np.zeros(0, np.int64), [], 0)
    final.append(previous)
    yield previous


class Importer:
    """Imports for the ImportEvents RPC (and `abstream import`)."""

    def __init__(self, core: Core, import_root: str = "", endpoints: str = "") -> None:
        self.core = core
        self.import_root = import_root
        self.endpoints = endpoints
        self._ingest = Ingest(core, 2)

    def close(self) -> None:
        self._ingest.close()

    async def run(self, principal: Principal, uri: str, fmt: str = "", endpoint_url: str = "",
                  region: str = "") -> AsyncIterator[Progress]:
        if isinstance(self.core.stopped, Stopped):  # its producers' sequences may count what was never made durable
            raise Stopped(str(self.core.stopped))
        # An object may hold any test's events, and a limited token's import would mark it
        # imported for everyone: the other tests' events in it were then never stored.
        whole_store(principal, "import objects")
        if not uri.strip():
            raise InvalidArgument("uri", "is required: s3://bucket/prefix/ or a path")
        if fmt:
            format_of("", fmt)  # a format no object can have is refused before any is listed
        check_endpoint(endpoint_url, self.endpoints)
        fs, path, scheme = await asyncio.to_thread(filesystem, uri, endpoint_url, region, self.import_root)
        try:
            found = await asyncio.to_thread(objects, fs, path)
        except OSError as error:
            if any(f"AWS Error {kind}" in str(error) for kind in _PASSING):
                raise Unavailable(f"cannot list {uri[:256]} now: {error}", retry_after=1.0) from None
            raise InvalidArgument("uri", f"cannot list {uri[:256]}: {error}") from None
        totals = Progress(uri, "", objects_total=len(found))
        for info in found:
            if self.core.draining:  # the rest is for the next import: none is begun while stopping
                raise Unavailable(f"the server is stopping: {totals.objects_done:,} of {len(found):,} objects were "
                                  "looked at; import again to go on", retry_after=5.0)
            name = f"{scheme}{info.path}"
            progress = dataclasses.replace(totals, uri=name, state="started", size=info.size)
            producer = producer_of(name, info)
            stored = await self.core.last_sequence(ANYONE, producer)
            if not scheme and not under_root(info.path, self.import_root):
                # A link in a directory imported leads out of it: the root bounds every file read.
                progress = dataclasses.replace(progress, state="failed",
                                               error=f"{name[:256]} is a link to a file outside the server's "
                                                     "--import-root: not read")
            elif stored == FINISHED:
                progress.state = "skipped"
            else:
                yield progress
                progress = await self._one(principal, fs, info, fmt, name, producer, stored, progress)
            totals.objects_done += 1
            totals.total_accepted += progress.accepted
            totals.total_quarantined += progress.quarantined
            yield dataclasses.replace(progress, objects_done=totals.objects_done,
                                      total_accepted=totals.total_accepted,
                                      total_quarantined=totals.total_quarantined)

    async def _one(self, principal: Principal, fs, info, fmt: str, name: str, producer: str, stored: int,
                   progress: Progress) -> Progress:
        try:
            object_format, compression = format_of(name, fmt)
        except InvalidArgument as error:
            return dataclasses.replace(progress, state="failed", error=str(error))
        final: list = []

        def read() -> Iterator[files.Chunk]:
            return _final_marked(read_object(fs, info, object_format, compression, name, lambda w: None), final)

        accepted = quarantined = 0
        already = None  # stored by an earlier import: what the first attempt found
        while True:
            final.clear()
            try:
                outcome = await self._ingest.chunks(
                    principal, read, producer, sequence=lambda chunk, k: FINISHED if final and chunk is final[0] else k,
                    where=lambda line: f"{name} line {line}", skip_through=stored, own_producers=False,
                    final=FINISHED)
            except (OSError, pa.ArrowException, files.FileProblem, InvalidArgument) as error:
                # This object cannot be read (a column of a type no event field takes): the others still are.
                return dataclasses.replace(progress, state="failed", error=f"cannot read {name}: {error}")
            except AbstreamError:
                raise
            except Exception as error:  # noqa: BLE001 - a defect reading this object; the others still are read
                log.exception("importing %s failed", name)
                return dataclasses.replace(progress, state="failed", error=f"cannot read {name}: internal error "
                                                                           f"({type(error).__name__}; see the server log)")
            accepted, quarantined = accepted + outcome.stored, quarantined + outcome.quarantined
            already = outcome.already_stored if already is None else already
            if (isinstance(outcome.failure, (ResourceExhausted, Unavailable)) and not self.core.draining
                    and not isinstance(outcome.failure, Stopped)):
                # Refused for now (a rate, the memory high-water mark): resume after what is stored
                # (not after a failed log: what it applied last is not durable, and never will be).
                await asyncio.sleep(getattr(outcome.failure, "retry_after", None) or 1.0)
                stored = await self.core.last_sequence(ANYONE, producer)
                continue
            break
        error = outcome.failure
        refused = isinstance(error, (ResourceExhausted, Unavailable))  # the server's state, not the object's
        return dataclasses.replace(progress, state="failed" if error else "imported", accepted=accepted,
                                   quarantined=quarantined, already_stored=already or 0,
                                   error="" if not error else f"{name} not imported: {error}" if refused
                                   else f"cannot read {name}: {error}")
