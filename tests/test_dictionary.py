"""The vectorized string dictionary: codes are stable, distinct, and decode back to the value."""

from __future__ import annotations

import random
import threading

import numpy as np
import pyarrow as pa

from abstream.store.dictionary import Dictionary, hash_strings


def awkward_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab\u00e9\u65e5\u0000 _-9"
    out = ["", "a", "a\u0000", "a" * 8, "a" * 9, "a" * 16, "x" * 256, "user_1", "user_10", "user_01"]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(n)]
    out += [f"user_{i}" for i in range(n)]
    return out


def test_encode_roundtrips_and_is_stable_across_batches():
    values = awkward_strings(5000, seed=1)
    d = Dictionary(capacity=10**9)
    rng = random.Random(2)
    seen: dict[str, int] = {}
    for _ in range(30):
        batch = [rng.choice(values) for _ in range(rng.randrange(1, 3000))]
        codes = d.encode(pa.array(batch)).tolist()
        for value, code in zip(batch, codes):
            assert seen.setdefault(value, code) == code
        assert d.decode(np.array(codes)) == batch
    assert len(d) == len(seen) == len(set(seen.values()))
    assert sorted(seen.values()) == list(range(len(seen)))  # dense, in order of first appearance
    for value, code in seen.items():
        assert d.code(value) == code
    assert d.code("never seen") is None


def test_sliced_large_and_chunked_inputs_hash_like_plain_strings():
    values = awkward_strings(300, seed=3)
    plain = hash_strings(pa.array(values))
    sliced = hash_strings(pa.array(["pad", *values]).slice(1))
    large = hash_strings(pa.array(values, pa.large_string()))
    for other in (sliced, large):
        assert np.array_equal(plain, other)
    d = Dictionary(capacity=10**9)
    chunked = pa.chunked_array([pa.array(values[:100]), pa.array(values[100:])])
    assert d.decode(d.encode(chunked)) == values


def test_hashes_differ_for_near_identical_strings():
    values = [f"user_{i}" for i in range(200_000)] + ["a" * i for i in range(300)]
    h1, h2 = hash_strings(pa.array(values)).T
    pairs = h1.astype(object) * 2**64 + h2.astype(object)
    assert len(set(pairs.tolist())) == len(values)
    assert len(np.unique(h1)) == len(values)


def test_full_dictionary_gives_minus_one_and_keeps_what_it_has():
    d = Dictionary(capacity=5)
    codes = d.encode(pa.array([f"v{i}" for i in range(8)] + ["v1"])).tolist()
    assert codes[:5] == [0, 1, 2, 3, 4] and codes[5:8] == [-1, -1, -1] and codes[8] == 1
    assert d.encode(pa.array(["v9", "v0"])).tolist() == [-1, 0]
    assert len(d) == 5 and d.decode(np.arange(5)) == [f"v{i}" for i in range(5)]


def test_growth_through_many_resizes():
    d = Dictionary(capacity=10**9)
    for start in range(0, 300_000, 50_000):
        codes = d.encode(pa.array([f"k{i}" for i in range(start, start + 50_000)]))
        assert codes.tolist() == list(range(start, start + 50_000))
    again = d.encode(pa.array([f"k{i}" for i in range(0, 300_000, 7)]))
    assert again.tolist() == list(range(0, 300_000, 7))


def test_readers_racing_a_growing_writer_see_known_codes_or_none():
    d = Dictionary(10**9)
    d.encode(pa.array([f"k{i}" for i in range(1000)]))
    stop, seen_wrong = threading.Event(), []

    def read() -> None:
        rng = random.Random(4)
        while not stop.is_set():
            i = rng.randrange(0, 200_000)
            code = d.code(f"k{i}")
            if code is not None and code != i:
                seen_wrong.append((i, code))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for start in range(1000, 200_000, 997):  # many small batches: many growths under the readers
            d.encode(pa.array([f"k{i}" for i in range(start, min(start + 997, 200_000))]))
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert seen_wrong == []
    assert [d.code(f"k{i}") for i in (0, 999, 1000, 199_999)] == [0, 999, 1000, 199_999]


def test_from_values_gives_the_same_codes():
    values = awkward_strings(3000, seed=9)
    d = Dictionary(10**9)
    codes = d.encode(pa.array(values))
    restored = Dictionary.from_values(d.values, 10**9)
    assert np.array_equal(restored.encode(pa.array(values)), codes)
    assert len(restored) == len(d)
    assert restored.encode(pa.array(["brand new"])).tolist() == [len(d)]
