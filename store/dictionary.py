"""Per-field string dictionaries: each distinct value gets a small integer code, once, at ingest.

A value's identity is a pair of 64-bit hashes computed in vectorized passes over the Arrow
string buffers; an open-addressing table of int32 codes (linear probing, load <= 1/2) finds
them. Lookups and inserts for a whole batch run as numpy passes, one per probe round, so ingest
never does a Python operation per value, and the index costs 8-16 bytes per distinct value
besides its 16 bytes of hashes. Two values share a code only if both 64-bit hashes collide
(about 2^-128 per pair).
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

_EMPTY = -1
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0x165667B19E3779F9)
_FM1 = np.uint64(0xFF51AFD7ED558CCD)
_FM2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S29 = np.uint64(29)
_S31 = np.uint64(31)
_S35 = np.uint64(35)


def _fmix(h: np.ndarray) -> np.ndarray:
    h ^= h >> _S33
    h *= _FM1
    h ^= h >> _S33
    h *= _FM2
    h ^= h >> _S33
    return h


def hash_strings(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of every string (uint64[n] each); nulls hash as ''.

    Reads the Arrow buffers directly: word j of string i is the 8 bytes at its start + 8j,
    loaded unaligned from a padded copy of the data buffer and masked to the string's length.
    """
    if pa.types.is_large_string(values.type):
        offset_type = np.int64
    else:
        values = values.cast(pa.string()) if values.type != pa.string() else values
        offset_type = np.int32
    n = len(values)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[values.offset: values.offset + n + 1].astype(np.int64)
    starts, lengths = offsets[:-1], np.diff(offsets)
    raw = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    lo, hi = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
    padded = np.zeros(hi - lo + 8, dtype=np.uint8)
    padded[: hi - lo] = raw[lo:hi]
    # Every byte offset as the start of a little-endian uint64 (overlapping, unaligned views).
    words_at = np.ndarray(shape=(hi - lo + 1,), dtype="<u8", buffer=padded, strides=(1,))
    starts = starts - lo
    h1 = lengths.astype(np.uint64) * _M3
    h2 = lengths.astype(np.uint64) ^ _M1
    rows = np.arange(n)
    for j in range(int(((lengths.max() if n else 0) + 7) // 8)):
        rows = rows[lengths[rows] > 8 * j]
        remaining = lengths[rows] - 8 * j
        x = words_at[starts[rows] + 8 * j]
        short = remaining < 8
        if short.any():
            x[short] &= (np.uint64(1) << (remaining[short].astype(np.uint64) * np.uint64(8))) - np.uint64(1)
        a = (h1[rows] ^ (x * _M2)) * _M1
        a ^= a >> _S29
        b = (h2[rows] + x) * _M3
        b ^= b >> _S31
        b ^= x >> _S35
        h1[rows], h2[rows] = a, b
    return _fmix(h1), _fmix(h2 ^ _M2)


class Dictionary:
    """Append-only mapping between strings and dense codes 0..n-1.

    Codes are given in order of first appearance and never change, so stored parts stay valid as
    the dictionary grows. Writers must be serialized by the caller. Readers (`code`, `decode`)
    may run concurrently: arrays they read are replaced whole when they grow, written only past
    the published length otherwise, and a slot being claimed holds a marker they probe past.
    """

    def __init__(self, capacity: int, few_values: bool = True) -> None:
        self.capacity = capacity
        self.few_values = few_values
        self._n = 0
        self._h1 = np.zeros(1024, dtype=np.uint64)
        self._h2 = np.zeros(1024, dtype=np.uint64)
        self._slots = np.full(2048, _EMPTY, dtype=np.int32)
        self._values_lock = threading.Lock()
        self._chunks: list[pa.Array] = []
        self._values: pa.Array = pa.array([], pa.string())

    def __len__(self) -> int:
        return self._n

    @classmethod
    def from_values(cls, values: pa.Array, capacity: int, few_values: bool = True) -> Dictionary:
        """A dictionary in which values[i] has code i (as saved by a snapshot)."""
        d = cls(capacity, few_values)
        n = len(values)
        if n:
            h1, h2 = hash_strings(values)
            d._reserve(n)
            d._h1[:n], d._h2[:n] = h1, h2
            d._n = n
            d._place(d._slots, np.arange(n, dtype=np.int64))
            d._chunks.append(values)
        return d

    # ---- writers ------------------------------------------------------------------------

    def encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Codes for `values` (int64), adding new values; -1 where the dictionary is full."""
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
        if self.few_values:  # hash each distinct value of the batch once
            encoded = values.dictionary_encode()
            values, indices = encoded.dictionary, encoded.indices.to_numpy(zero_copy_only=False)
        else:  # mostly distinct: probing dedupes as well as a hash pass would, at half the cost
            indices = None
        h1, h2 = hash_strings(values)
        before = self._n
        self._reserve(before + len(values))
        self._claimed: list[np.ndarray] = []
        self._claimed_rows: list[np.ndarray] = []
        codes = self._probe(h1, h2, insert=True)
        if self._n > before:
            codes = self._renumber(codes, before)
            first = np.sort(np.concatenate(self._claimed_rows))
            with self._values_lock:
                self._chunks.append(values.take(pa.array(first)))
        return codes if indices is None else codes[indices]

    def _renumber(self, codes: np.ndarray, before: int) -> np.ndarray:
        """Gives this batch's new values their codes in the order of the rows that added them.

        Probing hands codes out in slot-claim order; renumbering makes codes depend only on the
        sequence of values, never on the table's size or layout.
        """
        rows = np.concatenate(self._claimed_rows)  # one row per new value, in claim order
        order = np.argsort(rows, kind="stable")
        remap = np.empty(len(rows), dtype=np.int64)
        remap[order] = before + np.arange(len(rows), dtype=np.int64)  # claim index -> final code
        slots = np.concatenate(self._claimed)
        self._slots[slots] = (remap[self._slots[slots] - before]).astype(np.int32)
        claimed = before + np.arange(len(rows))
        self._h1[remap], self._h2[remap] = self._h1[claimed].copy(), self._h2[claimed].copy()
        new = codes >= before
        codes[new] = remap[codes[new] - before]
        return codes

    def _reserve(self, needed: int) -> None:
        if needed > len(self._h1):
            size = max(needed, len(self._h1) * 3 // 2)
            self._h1 = np.concatenate([self._h1, np.zeros(size - len(self._h1), np.uint64)])
            self._h2 = np.concatenate([self._h2, np.zeros(size - len(self._h2), np.uint64)])
        size = len(self._slots)
        while needed * 2 > size:  # load at most 1/2: linear probing's clusters stay short
            size *= 2
        if size != len(self._slots):
            slots = np.full(size, _EMPTY, dtype=np.int32)
            self._place(slots, np.arange(self._n, dtype=np.int64))
            self._slots = slots  # readers switch to the complete new table in one assignment

    def _place(self, slots: np.ndarray, codes: np.ndarray) -> None:
        """Put known-distinct codes into a table that is not published yet."""
        mask = len(slots) - 1
        pos = (self._h1[codes] & np.uint64(mask)).astype(np.int64)
        while len(codes):
            free = slots[pos] == _EMPTY
            slots[pos[free]] = codes[free]  # with duplicate positions, one write wins
            won = slots[pos] == codes
            codes, pos = codes[~won], (pos[~won] + 1) & mask

    def _probe(self, h1: np.ndarray, h2: np.ndarray, insert: bool) -> np.ndarray:
        """Codes of the values with these hashes; inserts the absent ones when `insert`, else -1."""
        slots, mask = self._slots, len(self._slots) - 1
        h1_known, h2_known = self._h1, self._h2
        codes = np.full(len(h1), _EMPTY, dtype=np.int64)
        todo = np.arange(len(h1), dtype=np.int64)
        pos = (h1 & np.uint64(mask)).astype(np.int64)
        while len(todo):
            p = pos[todo]
            code = slots[p].astype(np.int64)
            live = code >= 0
            safe = np.where(live, code, 0)
            match = live & (h1_known[safe] == h1[todo]) & (h2_known[safe] == h2[todo])
            codes[todo[match]] = code[match]
            empty = code == _EMPTY
            settled = match | (empty & (not insert))
            if insert and empty.any():
                settled |= self._claim(todo, p, empty, h1, h2, codes)
                h1_known, h2_known = self._h1, self._h2
            # Anything else saw another value (or a claim marker) in its slot: probe the next one.
            pos[todo] = np.where(settled | (empty & insert), p, (p + 1) & mask)
            todo = todo[~settled]
        return codes

    def _claim(self, todo: np.ndarray, p: np.ndarray, empty: np.ndarray, h1: np.ndarray, h2: np.ndarray,
               codes: np.ndarray) -> np.ndarray:
        """Each empty slot goes to one of the rows probing it; returns which rows got a code."""
        index = np.flatnonzero(empty)
        rows, at = todo[index], p[index]
        marker = (-2 - np.arange(len(rows), dtype=np.int64)).astype(np.int32)
        self._slots[at] = marker  # with duplicate positions, one write wins
        won = self._slots[at] == marker
        room = max(self.capacity - self._n, 0)
        if np.count_nonzero(won) > room:  # full: these rows get -1 and stop probing
            over = np.flatnonzero(won)[room:]
            self._slots[at[over]] = _EMPTY
            won[over] = False
            full = np.zeros(len(rows), dtype=bool)
            full[over] = True
        else:
            full = None
        won_rows = rows[won]
        new_codes = self._n + np.arange(len(won_rows), dtype=np.int64)
        self._h1[new_codes], self._h2[new_codes] = h1[won_rows], h2[won_rows]
        self._slots[at[won]] = new_codes.astype(np.int32)
        self._claimed.append(at[won])
        self._claimed_rows.append(won_rows)
        self._n += len(won_rows)
        codes[won_rows] = new_codes
        settled = np.zeros(len(todo), dtype=bool)
        settled[index[won]] = True
        if full is not None:
            settled[index[full]] = True
        return settled

    @property
    def nbytes(self) -> int:
        return self._h1.nbytes + self._h2.nbytes + self._slots.nbytes + self.values.nbytes

    # ---- readers ------------------------------------------------------------------------

    def code(self, value: str) -> int | None:
        """The code of `value`, or None when it was never seen."""
        h1, h2 = hash_strings(pa.array([value], pa.string()))
        code = int(self._probe(h1, h2, insert=False)[0])
        return None if code < 0 else code

    @property
    def values(self) -> pa.Array:
        """Every value, in code order (index it with codes)."""
        with self._values_lock:
            if self._chunks:
                self._values = pa.concat_arrays([self._values, *self._chunks])
                self._chunks = []
            return self._values

    def decode(self, codes: np.ndarray) -> list[str]:
        return self.values.take(pa.array(np.asarray(codes, dtype=np.int64))).to_pylist()
