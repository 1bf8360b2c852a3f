"""Per-field string dictionaries: each distinct value gets a small integer code, once, at ingest."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class Dictionary:
    """Append-only mapping between strings and dense codes 0..n-1.

    Codes are given in order of first appearance and never change, so stored parts stay valid as
    the dictionary grows. Writers must be serialized by the caller; readers may decode
    concurrently, because a code is published in `values` before any part refers to it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._index: dict[str, int] = {}
        self.values: list[str] = []

    def __len__(self) -> int:
        return len(self.values)

    def code(self, value: str) -> int | None:
        """The code of `value`, or None when it was never seen."""
        return self._index.get(value)

    def encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Codes for `values` (int64), adding new values; -1 where the dictionary is full.

        Hashes the batch once in Arrow, then does one Python lookup per distinct value of the
        batch rather than per event.
        """
        encoded = values.dictionary_encode()
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks() if encoded.num_chunks != 1 else encoded.chunk(0)
        local = np.empty(len(encoded.dictionary), dtype=np.int64)
        for i, value in enumerate(encoded.dictionary.to_pylist()):
            code = self._index.get(value)
            if code is None:
                if len(self.values) >= self.capacity:
                    code = -1
                else:
                    code = len(self.values)
                    self.values.append(value)
                    self._index[value] = code
            local[i] = code
        return local[encoded.indices.to_numpy(zero_copy_only=False)]

    def decode(self, codes: np.ndarray) -> list[str]:
        values = self.values
        return [values[c] for c in codes.tolist()]
