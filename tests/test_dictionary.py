"""The vectorized string dictionary: codes are stable, distinct, and decode back to the value."""

from __future__ import annotations

import random
import threading

import numpy as np
import pyarrow as pa
from abstream.store.dictionary import Dictionary, hash_strings

from bench.hostile import crafted_ids

KEY = bytes(range(16))
MASK = (1 << 64) - 1


def siphash(key: bytes, message: bytes, out: int = 8) -> bytes:
    """SipHash-2-4 as the paper writes it, in plain Python: an independent reference."""
    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & MASK

    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]
    if out == 16:
        v[1] ^= 0xEE

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & MASK; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)  # noqa: E702
            v[2] = (v[2] + v[3]) & MASK; v[3] = rotl(v[3], 16) ^ v[2]  # noqa: E702
            v[0] = (v[0] + v[3]) & MASK; v[3] = rotl(v[3], 21) ^ v[0]  # noqa: E702
            v[2] = (v[2] + v[1]) & MASK; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)  # noqa: E702

    whole = len(message) - len(message) % 8
    blocks = [int.from_bytes(message[i:i + 8], "little") for i in range(0, whole, 8)]
    blocks.append((len(message) & 0xFF) << 56 | int.from_bytes(message[whole:], "little"))
    for m in blocks:
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    v[2] ^= 0xEE if out == 16 else 0xFF
    rounds(4)
    result = (v[0] ^ v[1] ^ v[2] ^ v[3]).to_bytes(8, "little")
    if out == 16:
        v[1] ^= 0xDD
        rounds(4)
        result += (v[0] ^ v[1] ^ v[2] ^ v[3]).to_bytes(8, "little")
    return result


def test_the_reference_siphash_gives_the_papers_test_vector():
    # Aumasson and Bernstein, "SipHash: a fast short-input PRF", appendix A: key 00..0f, message 00..0e.
    assert siphash(KEY, bytes(range(15))) == (0xA129CA6149BE45E5).to_bytes(8, "little")
    assert siphash(KEY, b"") == (0x726FDB47DD0E0E31).to_bytes(8, "little")


def test_the_dictionary_hash_is_keyed_128_bit_siphash():
    rng = random.Random(11)
    values = awkward_strings(200, seed=12) + ["x" * n for n in range(40)]
    for key in (KEY, bytes(16), bytes(rng.randrange(256) for _ in range(16))):
        hashes = hash_strings(pa.array(values), key)
        expected = [siphash(key, v.encode(), 16) for v in values]
        assert [h0.tobytes() + h1.tobytes() for h0, h1 in hashes] == expected
    assert not np.array_equal(hash_strings(pa.array(values), KEY), hash_strings(pa.array(values), bytes(16)))


def longest_probe(d: Dictionary) -> int:
    """How far the value farthest from its home slot sits from it (linear probing)."""
    slots, hashes = d._table
    at = np.flatnonzero(slots >= 0)
    home = hashes[slots[at], 0] & np.uint64(len(slots) - 1)
    return int(((at.astype(np.uint64) - home) & np.uint64(len(slots) - 1)).max())


def test_ids_crafted_against_a_known_key_collide_there_and_not_under_a_secret_one():
    ids = crafted_ids(bytes(16), 3000)
    known = Dictionary(capacity=10**9, key=bytes(16))
    known.encode(pa.array(ids))
    secret = Dictionary(capacity=10**9)
    secret.encode(pa.array(ids))
    assert longest_probe(known) > 1000  # 3,000 ids in two home slots: one chain
    assert longest_probe(secret) < 100  # spread like any ids
    assert secret.decode(secret.encode(pa.array(ids))) == ids == known.decode(known.encode(pa.array(ids)))


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


def test_short_values_repeated_through_a_batch_keep_codes_of_their_own():
    """Values of up to 16 bytes are looked up by their bytes first (the memo in _dictionary.c):
    ones alike but for their last byte, a NUL or their length keep their own codes."""
    values = ["", "a" * 15, "a" * 16, "a" * 15 + "b", "b" + "a" * 15, "a" * 17, "a" * 16 + "b", "日本",
              *[f"c{i}" for i in range(300)],  # alike in their second 8 bytes (none)
              *[f"aaaaaaaa{i:08d}" for i in range(300)],  # alike in their first 8
              *[c + "\x00" * k for c in "abcdefghijklmnopqrstuvwxyz" for k in range(16)]]  # alike but in length
    rng = random.Random(5)
    d = Dictionary(capacity=10**9)
    for _ in range(3):
        batch = [rng.choice(values) for _ in range(20_000)]
        assert d.decode(d.encode(pa.array(batch))) == batch
    assert len(d) == len(values)


def test_short_values_at_the_end_of_their_buffer_are_looked_up_like_the_others():
    """A short value is read as two words when 16 bytes of its buffer follow its start, else copied
    (its buffer ends sooner): both readings of a value find one code, and bytes past a value
    never count."""
    d = Dictionary(capacity=10**9)
    values = ["x" * k for k in range(17)] + ["y" * k for k in range(1, 17)]
    codes = {v: c for v, c in zip(values, d.encode(pa.array(values)).tolist())}
    assert len(set(codes.values())) == len(values)
    for value in values:
        for before in ("", "z", "x" * 16, "y" * 30):
            data = (before + value).encode()  # the value's bytes end the buffer, exactly
            offsets = np.array([0, len(before), len(data)], dtype=np.int32)
            array = pa.StringArray.from_buffers(2, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))
            assert array.buffers()[2].size == len(data)
            assert d.encode(array).tolist()[1] == codes[value], (before, value)
    assert len(d) == len(values) + 2  # "z" and "y" * 30 only


def test_sliced_large_and_chunked_inputs_hash_like_plain_strings():
    values = awkward_strings(300, seed=3)
    plain = hash_strings(pa.array(values), KEY)
    sliced = hash_strings(pa.array(["pad", *values]).slice(1), KEY)
    large = hash_strings(pa.array(values, pa.large_string()), KEY)
    for other in (sliced, large):
        assert np.array_equal(plain, other)
    d = Dictionary(capacity=10**9)
    chunked = pa.chunked_array([pa.array(values[:100]), pa.array(values[100:])])
    assert d.decode(d.encode(chunked)) == values


def test_hashes_differ_for_near_identical_strings():
    values = [f"user_{i}" for i in range(200_000)] + ["a" * i for i in range(300)]
    h1, h2 = hash_strings(pa.array(values), KEY).T
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
    """Readers look values up while batches are encoded (the table grows, values are packed by
    the chunk): a code found is the value's own, and once its batch is encoded it decodes back."""
    d = Dictionary(10**9)
    d.encode(pa.array([f"k{i}" for i in range(1000)]))
    stop, seen_wrong, encoded = threading.Event(), [], [1000]

    def read() -> None:
        rng = random.Random(4)
        while not stop.is_set():
            done = encoded[0]
            i = rng.randrange(0, 200_000)
            try:
                code = d.code(f"k{i}")
                if code is not None and code != i or i < done and d.decode(np.array([i])) != [f"k{i}"]:
                    seen_wrong.append((i, code))
            except Exception as e:  # noqa: BLE001 - a failed lookup is what this test looks for
                seen_wrong.append((i, repr(e)))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for start in range(1000, 200_000, 997):  # many small batches: many growths under the readers
            end = min(start + 997, 200_000)
            d.encode(pa.array([f"k{i}" for i in range(start, end)]))
            encoded[0] = end
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert seen_wrong == []
    assert [d.code(f"k{i}") for i in (0, 999, 1000, 199_999)] == [0, 999, 1000, 199_999]
    assert len(d._packed) == 3


def test_from_values_gives_the_same_codes():
    values = awkward_strings(3000, seed=9)
    d = Dictionary(10**9)
    codes = d.encode(pa.array(values))
    restored = Dictionary.from_values(d.values, 10**9)
    assert restored._key != d._key  # a new key: codes come from positions, not from hashes
    assert np.array_equal(restored.encode(pa.array(values)), codes)
    assert len(restored) == len(d)
    assert restored.encode(pa.array(["brand new"])).tolist() == [len(d)]


def test_values_packed_by_the_chunk_decode_as_they_were_added():
    """150,000 values in batches that end inside chunks: two chunks of 65,536 are packed (in
    less room than the strings took), the rest kept as added; any codes decode to their values,
    unpacking only the chunks that hold them, and a dictionary rebuilt from them packs alike."""
    ids = [f"user_{i * 7919 % 300_007}" for i in range(150_000)]  # distinct: 7919 is invertible mod the prime
    d = Dictionary(10**9)
    for lo in range(0, len(ids), 40_000):
        assert d.encode(pa.array(ids[lo:lo + 40_000])).tolist() == list(range(lo, min(lo + 40_000, len(ids))))
    assert len(d._packed) == 2 and sum(len(c) for c in d._chunks) == 150_000 - 2 * Dictionary.CHUNK
    assert d.values.to_pylist() == ids
    slots, hashes = d._table
    assert d.nbytes - slots.nbytes - hashes.nbytes < pa.array(ids).nbytes / 2
    codes = np.random.default_rng(5).integers(0, len(ids), 5_000)
    assert d.decode(codes) == [ids[c] for c in codes]
    unpacked: dict = {}
    assert d.take(np.array([70_000, 3, 149_999]), unpacked).to_pylist() == [ids[70_000], ids[3], ids[149_999]]
    assert sorted(unpacked) == [0, 1]
    assert d.take(np.array([140_000, 65_535]), unpacked).to_pylist() == [ids[140_000], ids[65_535]]
    assert d.decode(np.zeros(0, np.int64)) == [] and Dictionary(10).decode(np.zeros(0, np.int64)) == []
    restored = Dictionary.from_values(d.values, 10**9)
    assert len(restored._packed) == 2 and restored.decode(codes) == [ids[c] for c in codes]
    # A new value per batch: the newest values are concatenated rather than kept one array each.
    for i in range(3 * Dictionary.MERGE_AFTER):
        assert d.encode(pa.array([f"one_{i}", ids[i]])).tolist() == [len(ids) + i, i]
    assert len(d._chunks) <= Dictionary.MERGE_AFTER
    assert d.decode(np.arange(len(ids), len(d))) == [f"one_{i}" for i in range(3 * Dictionary.MERGE_AFTER)]
