"""Vectorized protobuf encoding of repeated result rows.

Building one message object per row costs ~5 µs in Python: 40 ms for an hourly timeseries of a
quarter. Encoding the rows' wire format with numpy, column by column, and letting upb parse the
bytes costs a few milliseconds. Each row is a list of fields; a field is a tag followed by a
varint, a double, a length-prefixed string (from a small table) or a nested message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _FIXED64, _LEN = 0, 1, 2
_KINDS = {FieldDescriptor.TYPE_DOUBLE: "double", FieldDescriptor.TYPE_STRING: "string",
          FieldDescriptor.TYPE_MESSAGE: "message"}  # every other type used here is a varint


#: A varint of k+1 bytes holds values below _VARINT_LIMITS[k].
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes of each value as a varint (negative int64 take 10, as protobuf writes them)."""
    return np.searchsorted(_VARINT_LIMITS, values.astype(np.uint64), side="right").astype(np.int64) + 1


def _put_varint(buf: np.ndarray, at: np.ndarray, values: np.ndarray, sizes: np.ndarray) -> None:
    v = values.astype(np.uint64)
    width = int(sizes.max(initial=1))
    if width == 1:  # the usual case for lengths and small counts
        buf[at] = v.astype(np.uint8)
        return
    # Every row's bytes at once, as an (n, width) table of which each row keeps its first sizes[i].
    k = np.arange(width, dtype=np.uint64)
    groups = (v[:, None] >> (np.uint64(7) * k)) & np.uint64(0x7F)
    groups |= (k < (sizes[:, None] - 1).astype(np.uint64)).astype(np.uint64) << np.uint64(7)
    keep = k < sizes[:, None].astype(np.uint64)
    buf[(at[:, None] + k.astype(np.int64))[keep]] = groups[keep].astype(np.uint8)


@dataclass
class Message:
    """Rows of one message type: `fields` in order, each (field number, kind, values)."""

    fields: list[tuple[int, str, object]]
    n: int
    _sizes: np.ndarray | None = field(default=None, init=False, repr=False)

    def sizes(self) -> np.ndarray:
        """Bytes of each row (computed once: writing an enclosing message asks again)."""
        if self._sizes is None:
            total = np.zeros(self.n, dtype=np.int64)
            for number, kind, values in self.fields:
                total += _field_size(number, kind, values, self.n)
            self._sizes = total
        return self._sizes

    @classmethod
    def of(cls, descriptor: Descriptor, values: dict[str, object], n: int) -> Message:
        """Rows of the message `descriptor` describes, its fields named: their numbers and kinds
        come from the generated descriptor, not from us. A string field's values are a
        `string_table`, a message field's a Message."""
        fields = []
        for name, column in values.items():
            f = descriptor.fields_by_name[name]
            fields.append((f.number, _KINDS.get(f.type, "varint"), column))
        return cls(sorted(fields, key=lambda field: field[0]), n)

    def write(self, buf: np.ndarray, at: np.ndarray) -> None:
        at = at.copy()
        for number, kind, values in self.fields:
            at += _write_field(buf, at, number, kind, values, self.n)


def _tag(number: int, wire: int) -> int:
    return (number << 3) | wire


def _field_size(number: int, kind: str, values, n: int) -> np.ndarray:
    tag = varint_sizes(np.array([_tag(number, 0)]))[0]
    if kind == "varint":
        return tag + varint_sizes(values)
    if kind == "double":
        return np.full(n, tag + 8, dtype=np.int64)
    if kind == "string":
        table, index = values
        lengths = np.array([len(s) for s in table], dtype=np.int64)[index]
        return tag + varint_sizes(lengths) + lengths
    sub = values.sizes()
    return tag + varint_sizes(sub) + sub


def _write_field(buf: np.ndarray, at: np.ndarray, number: int, kind: str, values, n: int) -> np.ndarray:
    wire = {"varint": _VARINT, "double": _FIXED64}.get(kind, _LEN)
    tag = _tag(number, wire)
    if tag < 0x80:  # field numbers below 16: a one-byte tag, the same in every row
        buf[at] = tag
        tag_sizes = 1
    else:
        tags = np.full(n, tag, dtype=np.uint64)
        tag_sizes = varint_sizes(tags)
        _put_varint(buf, at, tags, tag_sizes)
    at = at + tag_sizes
    if kind == "varint":
        sizes = varint_sizes(values)
        _put_varint(buf, at, values, sizes)
        return tag_sizes + sizes
    if kind == "double":
        raw = np.ascontiguousarray(values, dtype="<f8").view(np.uint8)
        buf[(at[:, None] + np.arange(8)).ravel()] = raw
        return tag_sizes + 8
    if kind == "string":
        table, index = values
        encoded = [s for s in table]
        lengths = np.array([len(s) for s in encoded], dtype=np.int64)[index]
        length_sizes = varint_sizes(lengths)
        _put_varint(buf, at, lengths, length_sizes)
        at = at + length_sizes
        for i, s in enumerate(encoded):
            rows = np.flatnonzero(index == i)
            if len(s) and len(rows):
                buf[(at[rows, None] + np.arange(len(s))).ravel()] = np.tile(np.frombuffer(s, np.uint8), len(rows))
        return tag_sizes + length_sizes + lengths
    sub = values.sizes()
    sub_sizes = varint_sizes(sub)
    _put_varint(buf, at, sub, sub_sizes)
    values.write(buf, at + sub_sizes)
    return tag_sizes + sub_sizes + sub


def encode_repeated(container: Descriptor, name: str, rows: Message) -> bytes:
    """The wire bytes of `rows` as the repeated field `name` of a `container` message."""
    return repeated_field(container.fields_by_name[name].number, rows)


def repeated_field(number: int, rows: Message) -> bytes:
    """The wire bytes of `rows` as repeated field `number` of an enclosing message."""
    if rows.n == 0:
        return b""
    wrapper = Message([(number, "message", rows)], rows.n)
    sizes = wrapper.sizes()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    buf = np.zeros(int(sizes.sum()), dtype=np.uint8)
    wrapper.write(buf, starts)
    return buf.tobytes()


def string_table(values: Sequence[str]) -> tuple[list[bytes], np.ndarray]:
    """(distinct UTF-8 strings, index of each value) for a column of few distinct strings."""
    if len(values) < 64:
        table: dict[str, int] = {}
        index = np.fromiter((table.setdefault(v, len(table)) for v in values), dtype=np.int64, count=len(values))
        return [s.encode() for s in table], index
    encoded = pa.array(values, pa.string()).dictionary_encode()
    return [s.encode() for s in encoded.dictionary.to_pylist()], encoded.indices.to_numpy().astype(np.int64)
