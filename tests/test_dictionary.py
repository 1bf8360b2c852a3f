"""The vectorized string dictionary: codes are stable, distinct, and decode back to the value."""

from __future__ import annotations

import random

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
        assert np.array_equal(plain[0], other[0]) and np.array_equal(plain[1], other[1])
    d = Dictionary(capacity=10**9)
    chunked = pa.chunked_array([pa.array(values[:100]), pa.array(values[100:])])
    assert d.decode(d.encode(chunked)) == values


def test_hashes_differ_for_near_identical_strings():
    values = [f"user_{i}" for i in range(200_000)] + ["a" * i for i in range(300)]
    h1, h2 = hash_strings(pa.array(values))
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


def test_mostly_distinct_mode_agrees_with_few_values_mode():
    values = awkward_strings(2000, seed=5)
    rng = random.Random(6)
    batches = [[rng.choice(values) for _ in range(rng.randrange(1, 2000))] for _ in range(10)]
    few, many = Dictionary(10**9), Dictionary(10**9, few_values=False)
    for batch in batches:
        a, b = few.encode(pa.array(batch)), many.encode(pa.array(batch))
        assert few.decode(a) == many.decode(b) == batch
        # the same value always gets the same code within each dictionary
        assert len(set(zip(batch, b.tolist()))) == len(set(batch))
    assert len(few) == len(many)


def test_from_values_gives_the_same_codes():
    values = awkward_strings(3000, seed=9)
    d = Dictionary(10**9)
    codes = d.encode(pa.array(values))
    restored = Dictionary.from_values(d.values, 10**9)
    assert np.array_equal(restored.encode(pa.array(values)), codes)
    assert len(restored) == len(d)
    assert restored.encode(pa.array(["brand new"])).tolist() == [len(d)]
