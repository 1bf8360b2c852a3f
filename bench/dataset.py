"""A deterministic, realistic event dataset, generated vectorized and cached as an Arrow IPC file.

50 tests of Zipf-skewed sizes with 2-4 variants each, 2M users (a few heavy, most light), 90 days,
3 devices, 20 countries, 5 event types, ~5% conversions and log-normal revenue with some refunds.
Strings are plain (not dictionary-encoded), as producers send them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

START_S = 1_735_689_600  # 2025-01-01T00:00:00Z
DAYS = 90
N_TESTS = 50
N_USERS = 2_000_000
VARIANT_NAMES = ["control", "variant_a", "variant_b", "variant_c"]
DEVICES = (["desktop", "mobile", "tablet"], [0.5, 0.4, 0.1])
COUNTRIES = ["US", "GB", "DE", "FR", "BR", "IN", "JP", "CA", "AU", "ES",
             "IT", "MX", "NL", "SE", "PL", "KR", "AR", "ZA", "NG", "TR"]
EVENT_TYPES = (["page_view", "click", "add_to_cart", "purchase", "signup"], [0.55, 0.25, 0.1, 0.07, 0.03])
CONVERSION_BY_TYPE = np.array([0.005, 0.02, 0.08, 0.35, 0.30])  # ~5% of all events

CACHE = Path(os.environ.get("ABSTREAM_BENCH_DATA", Path(__file__).parent / "data"))


def _strings(prefix: str, codes: np.ndarray, n: int) -> pa.Array:
    dictionary = pa.array([f"{prefix}{i}" for i in range(n)])
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), dictionary).cast(pa.string())


def _pick(rng: np.random.Generator, choices: tuple[list[str], list[float]], n: int) -> pa.Array:
    names, weights = choices
    codes = rng.choice(len(names), size=n, p=weights).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(names)).cast(pa.string()), codes


def generate(n: int, seed: int = 42) -> pa.Table:
    """n events, sorted by timestamp as a live stream would deliver them."""
    rng = np.random.default_rng(seed)
    test_weights = 1.0 / np.arange(1, N_TESTS + 1) ** 1.1
    test = rng.choice(N_TESTS, size=n, p=test_weights / test_weights.sum()).astype(np.int32)
    n_variants = rng.integers(2, 5, size=N_TESTS)
    users = min(N_USERS, max(n // 5, 1000))
    user = np.floor(users * rng.random(n) ** 2).astype(np.int64)  # heavy users at low ids
    # Assignment is sticky: a user sees the same variant of a test every time.
    variant = ((user * 2_654_435_761 + test * 40_503) % 1_000_003) % n_variants[test]
    ts = np.sort(START_S + rng.integers(0, DAYS * 86400, size=n))
    device, _ = _pick(rng, DEVICES, n)
    event_type, type_codes = _pick(rng, EVENT_TYPES, n)
    conversion = (rng.random(n) < CONVERSION_BY_TYPE[type_codes]).astype(np.uint8)
    revenue = np.where(conversion == 1, np.round(rng.lognormal(3.5, 1.0, n), 2), 0.0)
    refunds = rng.random(n) < 0.003
    revenue[refunds] = -np.round(rng.lognormal(3.0, 0.8, int(refunds.sum())), 2)
    country = rng.choice(len(COUNTRIES), size=n, p=_zipf(len(COUNTRIES))).astype(np.int32)
    session = (user * 7 + (ts - START_S) // 1800) % max(n // 3, 1)
    return pa.table({
        "timestamp": pa.array(ts * 1_000_000_000, pa.timestamp("ns", tz="UTC")),
        "user_id": _strings("user_", user, users),
        "test_id": _strings("test_", test, N_TESTS),
        "variant": pa.DictionaryArray.from_arrays(pa.array(variant.astype(np.int32)),
                                                  pa.array(VARIANT_NAMES)).cast(pa.string()),
        "event_type": event_type,
        "conversion": pa.array(conversion),
        "revenue": pa.array(revenue),
        "session_id": _strings("session_", session, max(n // 3, 1)),
        "device": device,
        "country": pa.DictionaryArray.from_arrays(pa.array(country), pa.array(COUNTRIES)).cast(pa.string()),
    })


def _zipf(k: int) -> np.ndarray:
    w = 1.0 / np.arange(1, k + 1)
    return w / w.sum()


def load(n: int, seed: int = 42) -> pa.Table:
    """The dataset, from the cache when it is there (memory-mapped), else generated and cached."""
    path = CACHE / f"events-{n}-seed{seed}.arrow"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        table = generate(n, seed)
        tmp = path.with_suffix(".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=1_000_000)
        tmp.rename(path)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()
