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


def _batch_size(batch: _Table, body_size: int, prefix) -> tuple[int, int]:
    """(rows, decompressed bytes of its buffers) of one RecordBatch table; `prefix(offset)`: the
    8 bytes of its body at `offset` (a compressed buffer's uncompressed length)."""
    rows = batch.scalar(0, "<q")
    compressed = batch.table(3) is not None
    total = 0
    entries = batch.structs(2, 16)
    if len(entries) > _MOST_BUFFERS:
        raise ValueError(f"a batch of {len(entries):,} buffers; at most {_MOST_BUFFERS:,}")
    for entry in entries:
        offset, length = struct.unpack("<qq", entry)
        if offset < 0 or length < 0 or offset + length > body_size:
            raise ValueError("a buffer lies outside its message's body")
        if not compressed or length == 0:
            total += length
            continue
        if length < 8:
            raise ValueError("a compressed buffer is shorter than its length prefix")
        (uncompressed,) = struct.unpack("<q", prefix(offset))
        total += length - 8 if uncompressed == -1 else uncompressed
        if uncompressed < -1:
            raise ValueError("a compressed buffer has a negative length")
    if rows < 0:
        raise ValueError("a record batch has a negative length")
    return rows, total


def _message_size(meta: bytes, body_size: int, prefix) -> tuple[int, int, int]:
    """(record batch rows, dictionary rows, decompressed bytes) of one message."""
    root = _Table(meta, _read(meta, "<I", 0))
    kind = root.scalar(1, "<B")
    if kind == _RECORD_BATCH:
        header = root.table(2)
        if header is None:
            raise ValueError("a record batch message without its header")
        n, size = _batch_size(header, body_size, prefix)
        return n, 0, size
    if kind == _DICTIONARY_BATCH:
        header = root.table(2)
        data = header.table(1) if header is not None else None
        if data is None:
            raise ValueError("a dictionary batch message without its data")
        n, size = _batch_size(data, body_size, prefix)
        return 0, n, size
    return 0, 0, body_size


def measure(source: pa.Buffer) -> StreamSize:
    """Rows and decompressed size of an IPC stream, from its messages' metadata only."""
    reader = pa.ipc.MessageReader.open_stream(source)
    rows = dictionary_rows = decoded = 0
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        body = message.body
        n, values, size = _message_size(message.metadata.to_pybytes(), 0 if body is None else body.size,
                                        lambda offset: body[offset:offset + 8].to_pybytes())
        rows, dictionary_rows, decoded = rows + n, dictionary_rows + values, decoded + size
    return StreamSize(rows, dictionary_rows, decoded)


#: The longest message metadata (a flatbuffer) an IPC file is read with: a schema of ten columns
#: takes a kilobyte.
_MOST_METADATA = 16 << 20
#: The most messages, and buffers of one message, an IPC file is measured with (each is a read).
_MOST_BLOCKS, _MOST_BUFFERS = 100_000, 10_000
#: A body up to this size is read whole to measure it: one read instead of one per buffer.
_BODY_READ_WHOLE = 4 << 20


def measure_file(f) -> tuple[StreamSize, int]:
    """Rows and decompressed size of an IPC file (a seekable binary file), and the most bytes
    one of its messages decompresses to beyond its own size, from its footer (where the batches a
    reader reads are) and those messages' metadata and the 8 bytes that begin each compressed
    buffer: nothing is decompressed. ValueError when it is not one."""
    size = f.seek(0, 2)
    f.seek(0)
    if size < 18 or f.read(6) != b"ARROW1":
        raise ValueError("it does not begin as an Arrow IPC file does")
    f.seek(size - 10)
    footer_size, magic = struct.unpack("<i6s", f.read(10))
    if magic != b"ARROW1" or not 0 < footer_size <= min(size - 18, _MOST_METADATA):
        raise ValueError("it does not end as an Arrow IPC file does (cut short?)")
    f.seek(size - 10 - footer_size)
    footer = f.read(footer_size)
    root = _Table(footer, _read(footer, "<I", 0))
    blocks = root.structs(2, 24) + root.structs(3, 24)  # dictionary batches, record batches
    if len(blocks) > _MOST_BLOCKS:
        raise ValueError(f"{len(blocks):,} batches; at most {_MOST_BLOCKS:,}")
    rows = dictionary_rows = decoded = most = 0
    for block in blocks:
        offset, meta_size, _, body_size = struct.unpack("<qiiq", block)
        if not (8 <= offset and 8 <= meta_size <= _MOST_METADATA and 0 <= body_size
                and offset + meta_size + body_size <= size):
            raise ValueError(f"a batch at byte {offset:,} lies outside the file")
        f.seek(offset)
        meta = f.read(meta_size)
        skip = 8 if meta[:4] == b"\xff\xff\xff\xff" else 4  # the continuation marker, then the length
        meta = meta[skip:]
        body_at = offset + meta_size
        whole = None
        if body_size <= _BODY_READ_WHOLE:
            f.seek(body_at)
            whole = f.read(body_size)

        def prefix(at: int, body_at: int = body_at, whole: bytes | None = whole) -> bytes:
            if whole is not None:
                return whole[at:at + 8]
            f.seek(body_at + at)
            return f.read(8)
        n, values, decompressed = _message_size(meta, body_size, prefix)
        rows, dictionary_rows, decoded = rows + n, dictionary_rows + values, decoded + decompressed
        most = max(most, decompressed - body_size)
    return StreamSize(rows, dictionary_rows, decoded), most


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
