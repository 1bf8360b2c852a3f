"""Events as the columnar path of IngestEvents takes them (`arrow_ipc`), without grpc: what
`abstream ingest` encodes while it is still starting."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

#: Columns with few distinct values: sent dictionary-encoded, so the server encodes each value once.
LOW_CARDINALITY = ("test_id", "variant", "event_type", "device", "country")


def arrow_ipc(table: pa.Table, compression: str | None = "lz4") -> bytes:
    """Events as the columnar path takes them fastest: low-cardinality strings dictionary-encoded
    with the narrowest indices, `conversion` as int8, buffers LZ4-compressed (about 30 bytes per
    event instead of 100 for plain strings: less to send, to log and to checksum)."""
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        if name in LOW_CARDINALITY and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                                        or pa.types.is_dictionary(col.type)):
            encoded = col.combine_chunks()
            encoded = encoded if pa.types.is_dictionary(encoded.type) else encoded.dictionary_encode()
            size = len(encoded.dictionary)
            dictionary = encoded.dictionary
            col = pa.DictionaryArray.from_arrays(
                _narrowed(encoded.indices, np.int8 if size <= 127 else np.int16 if size <= 32767 else np.int32),
                dictionary if dictionary.type == pa.string() else dictionary.cast(pa.string()))
        elif name == "conversion" and pa.types.is_integer(col.type):
            col = _zero_or_one(col.combine_chunks())  # others must reach the server as sent
        columns[name] = col
    sink = pa.BufferOutputStream()
    encoded_table = pa.table(columns)
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, encoded_table.schema, options=options) as writer:
        writer.write_table(encoded_table)
    return sink.getvalue().to_pybytes()


# Without nulls, numpy narrows the integers on Arrow's buffers: Arrow's casts load pyarrow.compute,
# and its to_numpy and pa.array pandas where it is installed, a fifth of a second `abstream
# ingest` would spend before its first batch.

def _narrowed(indices: pa.Array, dtype) -> pa.Array:
    if indices.type == pa.from_numpy_dtype(dtype):
        return indices
    if indices.null_count:
        return indices.cast(pa.from_numpy_dtype(dtype))
    return _plain(_values(indices).astype(dtype))


def _zero_or_one(values: pa.Array) -> pa.Array:
    """As int8 when every value present is 0 or 1 and there is one, else as it is."""
    if values.null_count:
        present = np.asarray(values.drop_null().to_numpy(zero_copy_only=False))
        narrow = bool(len(present)) and int(present.min()) >= 0 and int(present.max()) <= 1
        return values.cast(pa.int8()) if narrow else values
    flat = _values(values)
    if len(flat) and int(flat.min()) >= 0 and int(flat.max()) <= 1:
        return _plain(flat.astype(np.int8))
    return values


def _values(array: pa.Array) -> np.ndarray:
    """The values of an integer array without nulls, on its buffer."""
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)


def _plain(values: np.ndarray) -> pa.Array:
    """An integer array without nulls on numpy's buffer."""
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])
