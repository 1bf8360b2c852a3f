"""Arrow IPC streams from senders we do not trust: what a stream will cost, known before reading it.

An IPC stream's record batches may be LZ4- or ZSTD-compressed buffer by buffer, and each
compressed buffer begins with its uncompressed length. Reading a stream decompresses every
buffer: 64 MiB of compressed zeros would become 16 GiB. So the stream's messages are walked
first, without decompressing anything (`measure`): rows per record batch and the bytes every
buffer will take once decompressed, read from each message's metadata (a flatbuffer, of which
the few fields needed here are read by hand) and the 8-byte prefix of each buffer. Only a
stream within its limits is then read (`read_bounded`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pyarrow as pa
from abstream.core.errors import InvalidArgument

# Message.header's union tags (Arrow's Message.fbs).
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3


@dataclass(frozen=True)
class StreamSize:
    """What reading a stream will produce: record batch rows, dictionary rows, decompressed bytes."""

    rows: int
    dictionary_rows: int
    decoded_bytes: int


class _Table:
    """One flatbuffer table: its fields by index, through its vtable, every read bounds-checked."""

    def __init__(self, buf: bytes, at: int) -> None:
        self.buf, self.at = buf, at
        vtable = at - _read(buf, "<i", at)
        self.vtable_size = _read(buf, "<H", vtable)
        self.vtable = vtable

    def _offset(self, field: int) -> int:
        slot = 4 + 2 * field
        return _read(self.buf, "<H", self.vtable + slot) if slot < self.vtable_size else 0

    def scalar(self, field: int, fmt: str, default: int = 0) -> int:
        off = self._offset(field)
        return _read(self.buf, fmt, self.at + off) if off else default

    def table(self, field: int) -> _Table | None:
        off = self._offset(field)
        if not off:
            return None
        target = self.at + off + _read(self.buf, "<I", self.at + off)
        return _Table(self.buf, target)

    def structs(self, field: int, size: int) -> list[bytes]:
        """A vector of fixed-size structs, each as its bytes."""
        off = self._offset(field)
        if not off:
            return []
        start = self.at + off + _read(self.buf, "<I", self.at + off)
        count = _read(self.buf, "<I", start)
        if start + 4 + count * size > len(self.buf):
            raise ValueError("a vector runs past the end of its message's metadata")
        return [self.buf[start + 4 + i * size: start + 4 + (i + 1) * size] for i in range(count)]


def _read(buf: bytes, fmt: str, at: int) -> int:
    if at < 0 or at + struct.calcsize(fmt) > len(buf):
        raise ValueError("the message metadata is cut short")
    return struct.unpack_from(fmt, buf, at)[0]


def _batch_size(batch: _Table, body: pa.Buffer | None) -> tuple[int, int]:
    """(rows, decompressed bytes of its buffers) of one RecordBatch table."""
    rows = batch.scalar(0, "<q")
    compressed = batch.table(3) is not None
    total = 0
    body_size = 0 if body is None else body.size
    for entry in batch.structs(2, 16):
        offset, length = struct.unpack("<qq", entry)
        if offset < 0 or length < 0 or offset + length > body_size:
            raise ValueError("a buffer lies outside its message's body")
        if not compressed or length == 0:
            total += length
            continue
        if length < 8:
            raise ValueError("a compressed buffer is shorter than its length prefix")
        (uncompressed,) = struct.unpack("<q", body[offset:offset + 8].to_pybytes())
        total += length - 8 if uncompressed == -1 else uncompressed
        if uncompressed < -1:
            raise ValueError("a compressed buffer has a negative length")
    if rows < 0:
        raise ValueError("a record batch has a negative length")
    return rows, total


def measure(source: pa.Buffer) -> StreamSize:
    """Rows and decompressed size of an IPC stream, from its messages' metadata only."""
    reader = pa.ipc.MessageReader.open_stream(source)
    rows = dictionary_rows = decoded = 0
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        meta = message.metadata.to_pybytes()
        root = _Table(meta, _read(meta, "<I", 0))
        kind = root.scalar(1, "<B")
        if kind == _RECORD_BATCH:
            header = root.table(2)
            if header is None:
                raise ValueError("a record batch message without its header")
            n, size = _batch_size(header, message.body)
            rows += n
        elif kind == _DICTIONARY_BATCH:
            header = root.table(2)
            data = header.table(1) if header is not None else None
            if data is None:
                raise ValueError("a dictionary batch message without its data")
            n, size = _batch_size(data, message.body)
            dictionary_rows += n
        else:
            size = 0 if message.body is None else message.body.size
        decoded += size
    return StreamSize(rows, dictionary_rows, decoded)


def byte_limit(size: StreamSize, row_bytes: int, value_bytes: int) -> int:
    """The most a stream of valid events of this many rows may decompress to: `row_bytes` per row,
    `value_bytes` per dictionary value, and a mebibyte for schemas and padding."""
    return size.rows * row_bytes + size.dictionary_rows * value_bytes + (1 << 20)


def checked_size(source: pa.Buffer, field: str, max_rows: int, row_bytes: int, value_bytes: int) -> StreamSize:
    """`measure`, refusing (InvalidArgument naming `field`) a stream of more than `max_rows` rows
    or more than `max_rows` dictionary values, one that would decompress to more than valid rows
    can take (`byte_limit`), or one that is not IPC at all. Dictionary values are bounded too: a
    one-row stream whose dictionary held 600,000 values of 1,800 bytes was 2 MB and decompressed
    to 1 GB."""
    try:
        size = measure(source)
    except (pa.ArrowInvalid, OSError, ValueError) as error:
        raise InvalidArgument(field, f"is not a readable Arrow IPC stream: {error}") from None
    if size.rows > max_rows:
        raise InvalidArgument(field, f"a batch of {size.rows} events; at most {max_rows}")
    if size.dictionary_rows > max_rows:
        raise InvalidArgument(field, f"dictionaries of {size.dictionary_rows} values in all; at most {max_rows} "
                                     "(as many as the events a batch may hold)")
    if size.decoded_bytes > (limit := byte_limit(size, row_bytes, value_bytes)):
        raise InvalidArgument(field, f"decompresses to {size.decoded_bytes:,} bytes, more than {size.rows:,} valid "
                                     f"events and {size.dictionary_rows:,} dictionary values can take ({limit:,})")
    return size


def read_bounded(source: pa.Buffer, field: str, max_rows: int, row_bytes: int, value_bytes: int) -> pa.Table:
    """The table an IPC stream holds, once `checked_size` has found it within its limits."""
    checked_size(source, field, max_rows, row_bytes, value_bytes)
    try:
        table = pa.ipc.open_stream(source).read_all()
        table.validate(full=True)  # offsets, dictionary indices, UTF-8: the store reads them as given
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidArgument(field, f"is not a readable Arrow IPC stream: {error}") from None
    return table
