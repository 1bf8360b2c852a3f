"""Per-field string dictionaries: each distinct value gets a small integer code, once, at ingest.

A value's identity is its 128-bit SipHash-2-4 under a key of 16 random bytes drawn for each
dictionary when it is made (`secrets`), never stored and never shown; an open-addressing table of
int32 codes (linear probing from the hash's low bits, load <= 1/2) finds them. The loops that
hash and probe a batch are in C (`_dictionary.c`): done as numpy passes they were most of the
cost of ingest. The index costs 8-24 bytes per distinct value besides its 16 bytes of hash (and
the hashes' room, up to half as many more): the table is the smallest power of two at least twice
that room, so it is often a quarter full, not half (2M user ids in 8M slots encoded 6-15 ns per
event faster than in 4M, where each extra probe reads a hash).

Why the hash is keyed: with a fixed mix anyone could compute ids that share a slot's low bits,
and every such id made each later lookup walk the whole chain (60,000 crafted ids took 370x as
long to encode as random ones, and the cost grew with their square). Under a secret key the
slots of ids chosen outside the process are as good as random.

Why matches are confirmed on the hash and not the bytes: SipHash-2-4 is a pseudorandom function
of its key (its designers' claim; no attack is known). Someone who cannot read the key can make
two ids collide only by chance: among n distinct values the chance that any two share 128 bits
is about n^2 / 2^129, which for the 2^31 values a dictionary can hold is 2^-67, and every value
ever sent to the process is one guess. Comparing bytes would cost a second cache miss per
lookup (the value's bytes live apart from its hash) for that 2^-67.

The key need not persist: snapshots and the log hold the strings, and a restart rebuilds every
code's hash from them under a new key (`from_values`); codes are positions, not hashes.

The values themselves are only read to name what a query returns, to hand events out whole and to
write snapshots, so they are kept packed (zstd, as parts keep session ids) in chunks of 65,536,
the newest as they came until they fill one: the benchmark's 1.9M user ids took 28.5 MiB as Arrow
strings and 7.4 packed (~40 ns per value to pack; unpacking them all takes ~85 ms).
"""

from __future__ import annotations

import secrets
import threading

import numpy as np
import pyarrow as pa
from abstream.core.events import string_buffers
from abstream.store import _dictionary
from abstream.store.partition import PackedStrings

_EMPTY = -1


def hash_strings(values: pa.Array, key: bytes) -> np.ndarray:
    """The 128-bit keyed hash of every string, as two 64-bit halves (uint64[n, 2])."""
    offsets, data = string_buffers(values)
    hashes = np.empty((len(values), 2), dtype=np.uint64)
    _dictionary.hash_into(key, offsets, data, hashes)
    return hashes


class Dictionary:
    """Append-only mapping between strings and dense codes 0..n-1.

    Codes are given in order of first appearance and never change, so stored parts stay valid as
    the dictionary grows. Writers must be serialized by the caller. Readers (`code`, `decode`)
    may run concurrently: the table they read is replaced whole when it grows (slots and hashes
    in one assignment), and written in place only where they cannot be misled (see the C file).
    """

    #: Values packed together.
    CHUNK = 1 << 16
    #: The newest values (as many arrays as batches brought new ones) are concatenated past this.
    MERGE_AFTER = 64

    def __init__(self, capacity: int, key: bytes | None = None) -> None:
        """`key`: the 16-byte hash key; random unless given (tests give one to craft collisions)."""
        self.capacity = capacity
        self._key = secrets.token_bytes(16) if key is None else bytes(key)
        self._n = 0
        self._table = (np.full(2048, _EMPTY, dtype=np.int32), np.zeros((1024, 2), dtype=np.uint64))
        self._values_lock = threading.Lock()  # readers take the two lists as one
        self._packed: list[PackedStrings] = []  # values 0 .. CHUNK * len - 1
        self._chunks: list[pa.Array] = []  # the values after them, at most MERGE_AFTER arrays

    def __len__(self) -> int:
        return self._n

    @classmethod
    def from_values(cls, values: pa.Array, capacity: int) -> Dictionary:
        """A dictionary in which values[i] has code i (as saved by a snapshot), under a new key."""
        d = cls(capacity)
        n = len(values)
        if n:
            d._grow(n)
            slots, hashes = d._table
            hashes[:n] = hash_strings(values, d._key)
            _dictionary.place(slots, hashes, 0, n)
            d._n = n
            d._add_values(values)
        return d

    # ---- writers ------------------------------------------------------------------------

    def encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Codes for `values` (int64), adding new values; -1 where the dictionary is full."""
        if isinstance(values, pa.ChunkedArray):
            if values.num_chunks != 1:
                return np.concatenate([self.encode(c) for c in values.chunks] or [np.zeros(0, np.int64)])
            values = values.chunk(0)
        if pa.types.is_dictionary(values.type):
            # Encode the dictionary's values that rows use, once; rows take their codes by index.
            indices = values.indices.fill_null(0).to_numpy(zero_copy_only=False)
            codes = np.full(len(values.dictionary), -1, dtype=np.int64)
            used = np.flatnonzero(np.bincount(indices, minlength=len(values.dictionary)))
            codes[used] = self.encode(values.dictionary.take(pa.array(used)))
            return codes[indices]
        offsets, data = string_buffers(values)
        codes = np.empty(len(values), dtype=np.int64)
        before, row = self._n, 0
        while row < len(values):
            slots, hashes = self._table
            limit = min(len(hashes), len(slots) // 2)
            self._n, row = _dictionary.encode(self._key, offsets, data, row, slots, hashes, self._n, limit,
                                              self.capacity, codes)
            if row < len(values):
                self._grow(self._n + 1 + (len(values) - row) // 4)
        if self._n > before:
            # Codes follow first appearance: the first row holding code c is where c first shows.
            new = np.flatnonzero(codes >= before)
            c = codes[new]
            first = np.ones(len(new), dtype=bool)
            first[1:] = c[1:] > np.maximum.accumulate(c)[:-1]
            first = new[first]
            self._add_values(values.take(pa.array(first)))
        return codes

    def _add_values(self, values: pa.Array) -> None:
        """New values after the others; a full chunk's worth is packed (the writer only)."""
        chunks, packed = [*self._chunks, values], []
        if len(chunks) > self.MERGE_AFTER or sum(len(c) for c in chunks) >= self.CHUNK:
            unpacked = pa.concat_arrays(chunks)
            full = len(unpacked) - len(unpacked) % self.CHUNK
            packed = [PackedStrings(unpacked.slice(lo, self.CHUNK)) for lo in range(0, full, self.CHUNK)]
            chunks = [pa.concat_arrays([unpacked.slice(full)])]  # not the whole buffer
        with self._values_lock:  # readers take both lists as one
            self._packed, self._chunks = [*self._packed, *packed], chunks

    def _grow(self, needed: int) -> None:
        """Room for `needed` codes: hashes grow by half, the table stays at most half full."""
        slots, hashes = self._table
        if needed <= min(len(hashes), len(slots) // 2):
            return
        size = max(needed, len(hashes) * 3 // 2)
        grown = np.zeros((size, 2), dtype=np.uint64)
        grown[: self._n] = hashes[: self._n]
        table_size = len(slots)
        while size * 2 > table_size:
            table_size *= 2
        if table_size != len(slots):
            slots = np.full(table_size, _EMPTY, dtype=np.int32)
            _dictionary.place(slots, grown, 0, self._n)
        self._table = (slots, grown)  # readers switch to the complete new table in one assignment

    @property
    def nbytes(self) -> int:
        slots, hashes = self._table
        with self._values_lock:
            packed, chunks = self._packed, self._chunks
        return slots.nbytes + hashes.nbytes + sum(p.nbytes for p in packed) + sum(c.nbytes for c in chunks)

    # ---- readers ------------------------------------------------------------------------

    def code(self, value: str) -> int | None:
        """The code of `value`, or None when it was never seen."""
        slots, hashes = self._table
        code = _dictionary.find(self._key, value.encode(), slots, hashes)
        return None if code < 0 else code

    @property
    def values(self) -> pa.Array:
        """Every value, in code order (index it with codes): all of them unpacked."""
        with self._values_lock:
            packed, chunks = self._packed, self._chunks
        arrays = [p.array() for p in packed] + chunks
        return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())

    def take(self, codes: np.ndarray, unpacked: dict[int, pa.Array] | None = None) -> pa.Array:
        """The values of these codes, unpacking only the chunks that hold them (kept in `unpacked`,
        when given, for the caller's next codes: pages of one export)."""
        codes = np.asarray(codes, dtype=np.int64)
        unpacked = {} if unpacked is None else unpacked
        with self._values_lock:
            packed, chunks = self._packed, self._chunks
        if len(codes) == 0:
            return pa.array([], pa.string())
        # Codes grouped by chunk (the newest values are chunk len(packed)), each group taken
        # from its chunk alone, then put back in the order asked.
        chunk = np.minimum(codes // self.CHUNK, len(packed))
        order = np.argsort(chunk, kind="stable")
        ks, firsts = np.unique(chunk[order], return_index=True)
        pieces = []
        for k, lo, hi in zip(ks.tolist(), firsts.tolist(), [*firsts[1:].tolist(), len(codes)]):
            if k == len(packed):
                source = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
            elif k in unpacked:
                source = unpacked[k]
            else:
                source = unpacked[k] = packed[k].array()
            pieces.append(source.take(pa.array(codes[order[lo:hi]] - k * self.CHUNK)))
        if len(pieces) == 1:
            return pieces[0]
        return pa.concat_arrays(pieces).take(pa.array(np.argsort(order)))

    def decode(self, codes: np.ndarray) -> list[str]:
        return self.take(codes).to_pylist()
