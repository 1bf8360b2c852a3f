"""Hostile input, measured: ids crafted to collide in the string dictionary, against random ids.

Ids are crafted against a key the crafter knows (as anyone could against the old fixed hash):
in a dictionary using that key they share one probe chain; in the server's, whose key is
secret and random, they are ids like any other.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from abstream.store.dictionary import Dictionary, hash_strings

KNOWN_KEY = bytes(16)


def crafted_ids(key: bytes, count: int, low_bits: int = 12, seed: int = 5) -> list[str]:
    """Printable 8-byte ids whose hash under `key` has the same low bits."""
    rng = np.random.default_rng(seed)
    found: list[str] = []
    while len(found) < count:
        raw = rng.integers(0x30, 0x7B, size=(1 << 20, 8), dtype=np.uint8)
        values = pa.StringArray.from_buffers(len(raw), pa.py_buffer(np.arange(len(raw) + 1, dtype=np.int32) * 8),
                                             pa.py_buffer(raw.tobytes()))
        low = hash_strings(values, key)[:, 0] & np.uint64((1 << low_bits) - 1)
        found += [bytes(r).decode() for r in raw[low == 0]]
    return found[:count]


def random_ids(count: int, seed: int = 6) -> list[str]:
    rng = np.random.default_rng(seed)
    return [bytes(r).decode() for r in rng.integers(0x30, 0x7B, size=(count, 8), dtype=np.uint8)]


def encode_seconds(ids: list[str], key: bytes | None, batch: int = 1000, runs: int = 3) -> float:
    """Median time to encode `ids` in batches into a new dictionary."""
    values = pa.array(ids)
    times = []
    for _ in range(runs):
        d = Dictionary(capacity=1 << 31, key=key)
        started = time.perf_counter()
        for at in range(0, len(ids), batch):
            d.encode(values.slice(at, batch))
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def dictionary_report(count: int) -> dict:
    crafted, plain = crafted_ids(KNOWN_KEY, count), random_ids(count)
    random_s = encode_seconds(plain, None)
    secret_s = encode_seconds(crafted, None)
    known_s = encode_seconds(crafted, KNOWN_KEY)
    return {"ids": count, "random_seconds": random_s, "crafted_secret_key_seconds": secret_s,
            "crafted_known_key_seconds": known_s, "secret_over_random": secret_s / random_s,
            "known_over_random": known_s / random_s}
