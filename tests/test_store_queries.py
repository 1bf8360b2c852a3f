"""The store on its own (no gRPC): every query against DuckDB running the tutorial's SQL."""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa
import pytest
from abstream.core.engine import append
from abstream.core.types import AnalysisOptions
from abstream.store import (
    EVENT_SCHEMA,
    Dimension,
    EventStore,
    Filters,
    Interval,
    SegmentsQuery,
    SummaryQuery,
    TimeseriesQuery,
)

from tests import engines
from tests.events import BASE_S, NS, TESTS, random_events, to_table
from tests.oracle import Oracle

EVENTS = random_events(3000, seed=7)


def assert_metrics_match(ours, expected: dict) -> None:
    assert ours.users == expected["users"]
    assert ours.conversions == expected["conversions"]
    assert ours.events == expected["events"]
    assert ours.converted_users == expected["converted_users"]
    assert ours.total_revenue == pytest.approx(expected["total_revenue"], rel=1e-9, abs=1e-6)
    assert ours.conversion_rate == pytest.approx(expected["conversions"] / expected["users"], rel=1e-12)
    assert ours.revenue_per_user == pytest.approx(expected["total_revenue"] / expected["users"], rel=1e-9, abs=1e-9)
    assert ours.user_conversion_rate == pytest.approx(expected["converted_users"] / expected["users"], rel=1e-12)


@pytest.fixture(scope="module", params=["many-parts", "tail-only", "rolled-up", "chdb", "clickhouse"])
def store(request):
    """Every engine answers every query alike. The embedded one with a small seal size (events
    spread over merged parts and a tail), the same with rollups (whole-test Summary from them)
    and a large one (all in the tail); the cluster engine
    on chDB (current ClickHouse) and on a real 2 x 2 cluster (18.16)."""
    s = engines.make(request.param, request)
    for i in range(0, len(EVENTS), 97):  # several batches, uneven
        result = append(s, to_table(EVENTS[i:i + 97]))
        assert result.rejections == []
    if request.param == "rolled-up":  # asked for whole once: each test keeps a rollup from now on
        for test_id in TESTS:
            s.timeseries(TimeseriesQuery(test_id, Interval.DAY, cumulative=True))
        s.wait_rollups()
    yield s
    s.close()


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(EVENTS)


def ranges():
    """Unbounded, one-sided, and bounds that fall exactly on events' timestamps."""
    on_event = sorted(e["timestamp"] for e in EVENTS)
    yield None, None
    yield on_event[100], None
    yield None, on_event[-100]
    yield on_event[500], on_event[2000]
    yield on_event[700], on_event[700]  # a single instant, inclusive on both sides
    yield (BASE_S + 3 * 86400) * NS, (BASE_S + 5 * 86400) * NS - 1


@pytest.mark.parametrize("test_id", TESTS)
def test_summary_matches_tutorial_sql(store, oracle, test_id):
    for start, end in ranges():
        result = store.summary(SummaryQuery(test_id, start, end))
        expected = oracle.summary(test_id, start, end)
        assert result.variants == [row["variant"] for row in expected]
        for ours, theirs in zip(result.metrics.rows(), expected):
            assert_metrics_match(ours, theirs)
        assert result.stats.events_scanned == sum(row["events"] for row in expected)


@pytest.mark.parametrize("dimension", list(Dimension))
def test_segments_match_sql(store, oracle, dimension):
    for test_id in TESTS:
        for start, end in list(ranges())[:4]:
            for filters in ({}, {"device": "mobile"}, {"country": "日本", "event_type": "click"}, {"device": ""}):
                result = store.segments(SegmentsQuery(test_id, dimension, start, end, Filters(**filters)))
                expected = oracle.segments(test_id, dimension.value, start, end, filters)
                assert list(zip(result.variants, result.segments)) == [(r["variant"], r["segment"]) for r in expected]
                for ours, theirs in zip(result.metrics.rows(), expected):
                    assert_metrics_match(ours, theirs)


@pytest.mark.parametrize("interval", list(Interval))
@pytest.mark.parametrize("cumulative", [False, True], ids=["per-bucket", "cumulative"])
def test_timeseries_match_sql(store, oracle, interval, cumulative):
    for test_id in TESTS:
        for start, end in list(ranges())[:4]:
            for filters in ({}, {"country": "US"}):
                result = store.timeseries(TimeseriesQuery(test_id, interval, start, end, cumulative, Filters(**filters)))
                expected = oracle.timeseries(test_id, interval.name, start, end, filters, cumulative)
                assert [(int(b), v) for b, v in zip(result.bucket_start_ns, result.variants)] == \
                    [(r["bucket"], r["variant"]) for r in expected]
                for ours, theirs in zip(result.metrics.rows(), expected):
                    assert_metrics_match(ours, theirs)


def test_week_buckets_start_on_monday(store):
    result = store.timeseries(TimeseriesQuery("checkout", Interval.WEEK))
    import datetime as dt
    for b in set(result.bucket_start_ns.tolist()):
        day = dt.datetime.fromtimestamp(b / NS, dt.timezone.utc)
        assert (day.weekday(), day.hour, day.minute, day.second) == (0, 0, 0, 0)


def test_cumulative_counts_each_user_once():
    s = EventStore()
    day = 86400 * NS
    t0 = BASE_S * NS - (BASE_S * NS) % day
    events = [dict(timestamp=t0 + d * day + 5, user_id=u, test_id="t", variant="v", event_type="e",
                   conversion=c, revenue=1.0, session_id="", device="", country="")
              for d, u, c in [(0, "a", 0), (0, "b", 1), (1, "a", 1), (1, "c", 0), (2, "a", 0), (2, "b", 1)]]
    s.append(to_table(events))
    result = s.timeseries(TimeseriesQuery("t", Interval.DAY, cumulative=True))
    assert [m.users for m in result.metrics.rows()] == [2, 3, 3]
    assert [m.converted_users for m in result.metrics.rows()] == [1, 2, 2]
    assert [m.events for m in result.metrics.rows()] == [2, 4, 6]
    assert [m.conversions for m in result.metrics.rows()] == [1, 2, 3]


def test_unknown_test_is_empty_not_an_error(store):
    result = store.summary(SummaryQuery("no-such-test"))
    assert result.variants == [] and len(result.metrics) == 0 and result.stats.events_scanned == 0
    assert store.segments(SegmentsQuery("no-such-test", Dimension.DEVICE)).variants == []
    assert len(store.timeseries(TimeseriesQuery("no-such-test", Interval.HOUR)).bucket_start_ns) == 0


def test_events_scanned_are_the_ranges_events_whatever_filters_and_exclusions_leave_out(store):
    """As every engine counts them (the cluster engine gave the events left after excluding users
    seen in several variants, and a first-exposure series' filtered events)."""
    everything = store.summary(SummaryQuery("checkout")).stats.events_scanned
    excluded = store.summary(SummaryQuery("checkout", analysis=AnalysisOptions(exclude_multi_variant_users=True)))
    assert excluded.multi_variant_users > 0 and excluded.stats.events_scanned == everything
    exposure = store.timeseries(TimeseriesQuery("checkout", Interval.DAY, filters=Filters(device="mobile"),
                                                lift=AnalysisOptions(), since_first_exposure=True))
    assert 0 < exposure.metrics.events.sum() < everything and exposure.stats.events_scanned == everything


def test_filter_on_unseen_value_is_empty(store):
    result = store.segments(SegmentsQuery("checkout", Dimension.COUNTRY, filters=Filters(country="ZZ")))
    assert result.variants == [] and result.stats.events_scanned > 0


def test_list_tests(store, oracle):
    tests = store.list_tests()
    assert [t.test_id for t in tests] == sorted(TESTS)
    for t in tests:
        mine = [e for e in EVENTS if e["test_id"] == t.test_id]
        assert t.events == len(mine)
        assert t.users == len({e["user_id"] for e in mine})
        assert t.variants == sorted({e["variant"] for e in mine})
        assert t.first_event_ns == min(e["timestamp"] for e in mine)
        assert t.last_event_ns == max(e["timestamp"] for e in mine)


def test_rates_are_full_precision():
    s = EventStore()
    events = [dict(timestamp=BASE_S * NS, user_id=u, test_id="t", variant="v", event_type="", conversion=c,
                   revenue=r, session_id="", device="", country="")
              for u, c, r in [("a", 1, 10.0), ("b", 0, 0.0), ("c", 0, 0.0), ("a", 1, 0.0)]]
    s.append(to_table(events))
    (m,) = s.summary(SummaryQuery("t")).metrics.rows()
    assert m.conversion_rate == 2 / 3 and m.user_conversion_rate == 1 / 3
    assert m.revenue_per_user == 10 / 3 and not math.isclose(m.revenue_per_user, round(10 / 3, 4), abs_tol=1e-6)


def test_distinct_counts_agree_between_flag_and_sort_paths():
    import numpy as np
    from abstream.store import kernels

    rng = np.random.default_rng(3)
    # The last two: keys of exactly 2^32 values (uint32), and of more (int64).
    for n, n_groups, n_users in [(1, 1, 1), (1000, 3, 50), (5000, 40, 100_000), (20_000, 7, 3_000_000),
                                 (20_000, 1 << 10, 1 << 22), (20_000, 1 << 10, (1 << 22) + 1)]:
        group = rng.integers(0, n_groups, n)
        user = rng.integers(0, n_users, n)
        group[:2], user[:2] = n_groups - 1, [0, n_users - 1][:n]  # the whole span, in the last group
        expected = np.array([len(set(user[group == g].tolist())) for g in range(n_groups)])
        assert np.array_equal(kernels.distinct_per_group(group, user, n_groups), expected)
        saved = kernels._FLAGS_MAX
        try:
            kernels._FLAGS_MAX = 0  # force the sort path
            assert np.array_equal(kernels.distinct_per_group(group, user, n_groups), expected)
        finally:
            kernels._FLAGS_MAX = saved


def test_parts_give_back_every_column_exactly():
    """Sparse revenue and packed session ids come back as they went in, in timestamp order."""
    import numpy as np

    s = EventStore(seal_rows=100)
    events = EVENTS[:1000]
    for i in range(0, len(events), 50):
        s.append(to_table(events[i:i + 50]))
    s.wait_sealed()
    assert len(s._ingest.view.tail["test"]) == 0  # every event is in a part: sealed at 100, 200, ... 1000
    for code, partition in s._ingest.view.partitions.items():
        test_id = s._ingest.tests.decode(np.array([code]))[0]
        got = []
        for part in partition.parts:
            batch = part.batch()
            ts = batch.column("timestamp").to_pylist()
            assert ts == sorted(ts)
            got += zip(ts, batch.column("revenue").to_pylist(), batch.column("session_id").to_pylist())
            revenue = part.column("revenue")
            for lo, hi in [(0, part.num_rows), (1, part.num_rows - 1), (3, 3), (part.num_rows // 2, part.num_rows)]:
                assert np.array_equal(part.column("revenue", slice(lo, hi)), revenue[lo:hi])
        expected = [(e["timestamp"], e["revenue"], e["session_id"]) for e in events if e["test_id"] == test_id]
        assert sorted(got) == sorted(expected)


def test_user_bitsets_count_each_user_once_and_say_how_many_were_new():
    import numpy as np
    from abstream.store.kernels import add_users

    rng = np.random.default_rng(5)
    bits = np.zeros(0, dtype=np.uint8)
    seen: set[int] = set()
    for size, top, dtype in [(10, 2_000_000, np.int64), (50_000, 100_000, np.int32), (3, 5, np.uint8),
                             (1000, 3_000_000, np.int64), (20_000, 20_000, np.uint16)]:
        users = rng.integers(0, top, size).astype(dtype)
        old, before = bits, bits.copy()
        bits, added = add_users(old, users)
        assert added == len(set(users.tolist()) - seen)
        seen |= set(users.tolist())
        assert int(np.bitwise_count(bits).sum()) == len(seen)
        flags = np.unpackbits(bits, bitorder="little")
        assert set(np.flatnonzero(flags).tolist()) == seen
        assert np.array_equal(old, before)  # a published view's bitset is never written
    with pytest.raises(ValueError, match="outside the bitset"):
        add_users(bits, np.array([5, -1], dtype=np.int64))


def test_centered_m2_is_exact_and_stable_for_large_means():
    import numpy as np
    from abstream.store import kernels

    rng = np.random.default_rng(1)
    # Two groups; per-user totals from several rows; many users without rows (x = 0).
    group = rng.integers(0, 2, 5000)
    user = rng.integers(0, 3000, 5000)
    value = rng.normal(1e9, 0.5, 5000)  # huge mean, tiny spread
    users = np.array([4000, 4000])
    total = np.bincount(group, weights=value, minlength=2)
    other = rng.normal(1e6, 0.01, 5000)  # near-constant around 1e6 (the co-moment's other side)
    m2, m2_other, comoment = kernels.centered_user_moments(group, user, value, other, 3000, users, total,
                                                           np.bincount(group, weights=other, minlength=2))
    for g in range(2):
        per_user_other: dict[int, float] = {}
        for u, v in zip(user[group == g].tolist(), other[group == g].tolist()):
            per_user_other[u] = per_user_other.get(u, 0.0) + v
        ys = np.array(list(per_user_other.values()) + [0.0] * (users[g] - len(per_user_other)))
        assert np.isclose(m2_other[g], ((ys - ys.mean()) ** 2).sum(), rtol=1e-9) and m2_other[g] > 0
    for g in range(2):
        per_user: dict[int, float] = {}
        for u, v in zip(user[group == g].tolist(), value[group == g].tolist()):
            per_user[u] = per_user.get(u, 0.0) + v
        xs = np.array(list(per_user.values()) + [0.0] * (users[g] - len(per_user)))
        assert np.isclose(m2[g], ((xs - xs.mean()) ** 2).sum(), rtol=1e-9)
        per_user_other = {}
        for u, v in zip(user[group == g].tolist(), other[group == g].tolist()):
            per_user_other[u] = per_user_other.get(u, 0.0) + v
        ys = np.array([per_user_other[u] for u in per_user] + [0.0] * (users[g] - len(per_user)))
        assert np.isclose(comoment[g], ((xs - xs.mean()) * (ys - ys.mean())).sum(), rtol=1e-9)
    # All users have the same huge value: variance exactly zero, not rounding noise
    same, same_other, same_co = kernels.centered_user_moments(
        np.zeros(100, dtype=np.int64), np.arange(100), np.full(100, 1e12), np.full(100, 1e6), 100, np.array([100]),
        np.array([1e14]), np.array([1e8]))
    assert same[0] == 0.0 and same_other[0] == 0.0 and same_co[0] == 0.0


def test_producer_sequences_dedupe_in_a_memory_only_store():
    s = EventStore()
    batch = to_table(EVENTS[:10])
    assert s.append(batch, "p", 1).accepted == 10
    again = s.append(batch, "p", 1)
    assert again.duplicate and again.accepted == 0
    assert s.append(batch, "p", 0).duplicate
    assert s.append(batch, "q", 1).accepted == 10  # another producer
    assert s.append(batch).accepted == 10 and s.append(batch).accepted == 10  # untagged: at least once
    assert s.event_count == 40


def test_a_query_past_its_deadline_stops():
    import time as _time

    from abstream.store import DeadlineExceeded

    s = EventStore()
    s.append(to_table(EVENTS))
    for query, run in [(SummaryQuery("checkout"), s.summary),
                       (SegmentsQuery("checkout", Dimension.COUNTRY), s.segments),
                       (TimeseriesQuery("checkout", Interval.HOUR), s.timeseries)]:
        with pytest.raises(DeadlineExceeded):
            run(dataclasses.replace(query, deadline=_time.monotonic() - 1))
        assert run(dataclasses.replace(query, deadline=_time.monotonic() + 60)).stats.events_scanned > 0


def test_compacted_parts_answer_like_the_events_they_hold():
    """Whole-second timestamps are kept as 16- or 32-bit offsets and small codes as uint8: range
    bounds one nanosecond either side of an event, and every column, come out as with wide parts."""
    import numpy as np

    whole = [{**e, "timestamp": e["timestamp"] // NS * NS} for e in EVENTS]
    s = EventStore(seal_rows=64)
    for i in range(0, len(whole), 97):
        s.append(to_table(whole[i:i + 97]))
    s.wait_sealed()
    parts = [p for partition in s._ingest.view.partitions.values() for p in partition.parts]
    assert parts and all(p._ts_base is not None for p in parts)
    assert {p._cols["timestamp"].dtype for p in parts} == {np.dtype(np.uint16), np.dtype(np.uint32)}
    # Variants take a byte: of their own, or in the byte small codes share (a part of few events, late
    # ones, may have few enough distinct values for it).
    assert all(("variant" in p._layout or p._cols["variant"].dtype == np.uint8) and p.column("variant").dtype == np.uint16
               for p in parts)
    oracle = Oracle(whole)
    on_event = sorted(e["timestamp"] for e in whole)
    bounds = [(on_event[300] + d, on_event[2500] + e) for d in (-1, 0, 1) for e in (-1, 0, 1)]
    bounds += [(on_event[0] - 10**18, on_event[-1] + 10**18), (on_event[-1] + 1, None), (None, on_event[0] - 1)]
    for test_id in TESTS:
        for start, end in bounds:
            result = s.summary(SummaryQuery(test_id, start, end))
            expected = oracle.summary(test_id, start, end)
            assert result.variants == [row["variant"] for row in expected]
            for ours, theirs in zip(result.metrics.rows(), expected):
                assert_metrics_match(ours, theirs)


def test_small_codes_share_a_byte_and_come_back_as_they_went_in():
    """The narrowest code columns that fit in 8 bits together share one byte per event; every
    column, whole or sliced, comes back with its values and type, also from parts packed
    differently and merged end to end (packed anew) or packed alike (their bytes concatenated)."""
    import numpy as np
    from abstream.store.partition import COLUMNS, DTYPES, Part

    rng = np.random.default_rng(7)

    def part(first_s: int, n: int, variants: int, countries: int, event_types: int) -> tuple[Part, dict]:
        cols = {"timestamp": (first_s + np.arange(n, dtype=np.int64)) * NS,
                "variant": rng.integers(0, variants, n).astype(np.uint16),
                "user_id": rng.integers(0, 70_000, n).astype(np.int32),
                "conversion": rng.integers(0, 2, n).astype(np.uint8), "revenue": np.zeros(n),
                "event_type": rng.integers(0, event_types, n).astype(np.uint16),
                "device": rng.integers(0, 3, n).astype(np.uint16),
                "country": rng.integers(0, countries, n).astype(np.uint16),
                "session_id": pa.array([f"s{i % 97}" for i in range(n)])}
        cols["variant"][-1], cols["country"][-1] = variants - 1, countries - 1  # the widest values are there
        return Part(cols), cols

    def assert_holds(p: Part, cols: dict) -> None:
        for c in COLUMNS:
            if c in DTYPES:
                assert p.column(c).dtype == DTYPES[c] and p.column(c).tolist() == cols[c].tolist(), c
                assert p.column(c, slice(3, 50)).tolist() == cols[c][3:50].tolist(), c
        assert p.strings("session_id", slice(0, p.num_rows)).equals(cols["session_id"])

    # conversion 1 bit, variant 2, device 2, event type 3 share a byte; country (8 bits) does not fit.
    a, cols_a = part(0, 500, variants=4, countries=200, event_types=5)
    assert a._layout == {"conversion": (0, 1), "device": (1, 2), "variant": (3, 2), "event_type": (5, 3)}
    assert set(a._cols) == {"packed", "country", "user_id", "timestamp"} and a._cols["packed"].nbytes == 500
    assert_holds(a, cols_a)
    # One event type only: its column takes no bits, and country (now 7 bits) does not fit beside the rest.
    b, cols_b = part(1_000, 300, variants=8, countries=100, event_types=1)
    assert b._layout == {"event_type": (0, 0), "conversion": (0, 1), "device": (1, 2), "variant": (3, 3)}
    assert_holds(b, cols_b)
    merged = Part.merge([a, b])
    # Event types take 3 bits again, and variant (3 bits) no longer fits.
    assert merged._layout == {"conversion": (0, 1), "device": (1, 2), "event_type": (3, 3)}
    assert_holds(merged, {c: pa.concat_arrays([cols_a[c], cols_b[c]]) if c == "session_id" else
                          np.concatenate([cols_a[c], cols_b[c]]) for c in COLUMNS})
    c, cols_c = part(2_000, 400, variants=4, countries=200, event_types=5)
    alike = Part.merge([a, c])
    assert alike._layout == a._layout and alike._cols["packed"].tolist() == a._cols["packed"].tolist() + \
        c._cols["packed"].tolist()
    assert_holds(alike, {c: pa.concat_arrays([cols_a[c], cols_c[c]]) if c == "session_id" else
                         np.concatenate([cols_a[c], cols_c[c]]) for c in COLUMNS})
    # Nothing is packed when fewer than two columns would share the byte.
    wide, cols_w = part(3_000, 200, variants=300, countries=300, event_types=300)
    cols_w["device"] = cols_w["device"] * 100
    wide = Part(cols_w)
    assert wide._layout == {} and "packed" not in wide._cols
    assert_holds(wide, cols_w)


def test_timestamps_kept_in_16_bits_by_block_find_every_range_as_a_search_of_the_events_would():
    """Offsets of 65,535, 65,536 and 65,537 seconds, an empty block between two full ones, ties:
    the 16-bit offsets with the first row of each 65,536-second block give back every timestamp,
    whole and in slices, and the rows of any range, in a part and in parts merged end to end."""
    import numpy as np
    from abstream.store.partition import Part

    rng = np.random.default_rng(11)
    base = 1_700_000_000
    offsets = np.sort(np.concatenate([rng.integers(0, 65_536 * 2, 3_000), [65_535, 65_536, 65_536, 65_537],
                                      rng.integers(65_536 * 3, 65_536 * 4 + 10, 2_000)]))  # block 2 empty
    n = len(offsets)

    def part(seconds: np.ndarray) -> Part:
        k = len(seconds)
        zeros = np.zeros(k, np.uint16)
        return Part({"timestamp": (base + seconds) * NS, "user_id": np.arange(k, dtype=np.int32),
                     "conversion": np.zeros(k, np.uint8), "revenue": np.zeros(k), "variant": zeros,
                     "event_type": zeros, "device": zeros, "country": zeros, "session_id": pa.array([""] * k)})

    ts = (base + offsets) * NS
    whole, halves = part(offsets), Part.merge([part(offsets[:2_500]), part(offsets[2_500:])])
    for p in (whole, halves):
        assert p._cols["timestamp"].dtype == np.uint16 and p._ts_edges.tolist()[-1] == n
        assert p.column("timestamp").tolist() == ts.tolist()
        assert p.column("timestamp", slice(2_990, 3_010)).tolist() == ts[2_990:3_010].tolist()
        picks = [*rng.choice(ts, 40), *((base + np.array([0, 65_535, 65_536, 65_537, 65_536 * 2, 65_536 * 3]))
                                        * NS)]
        for start in picks:
            for end in picks:
                for d, e in ((-1, 0), (0, 0), (1, 1), (-NS, NS)):
                    expected = np.flatnonzero((ts >= start + d) & (ts <= end + e))
                    rows = p.time_slice(start + d, end + e)
                    assert (rows.start, rows.stop) == ((expected[0], expected[-1] + 1) if len(expected) else
                                                       (rows.start, rows.start)), (start + d, end + e)
    # Few events over many blocks: 32-bit offsets, as blocks would cost more than they save.
    sparse_s = np.arange(0, 65_536 * 40, 65_536 * 2)
    sparse = part(sparse_s)
    assert sparse._cols["timestamp"].dtype == np.uint32 and sparse._ts_edges is None
    assert sparse.column("timestamp").tolist() == ((base + sparse_s) * NS).tolist()
    # Merged end to end with 16-bit parts, before and after them: back to 16 bits, every time.
    later = offsets + int(sparse_s[-1]) + 1
    both = Part.merge([sparse, part(later)])
    both_s = np.concatenate([sparse_s, later])
    assert both._cols["timestamp"].dtype == np.uint16
    assert both.column("timestamp").tolist() == ((base + both_s) * NS).tolist()
    for second in (0, int(sparse_s[-1]), int(later[0]), int(later[2_999]), int(later[-1])):
        rows = both.time_slice((base + second) * NS, (base + second) * NS)
        assert both_s[rows].tolist() == [second] * int((both_s == second).sum())


def test_a_part_with_sub_second_or_wide_values_keeps_them_exactly():
    import numpy as np
    from abstream.store.partition import Part

    ts = np.array([10**18, 10**18 + 1, 10**18 + 2 * NS], dtype=np.int64)
    cols = {"timestamp": ts, "variant": np.array([0, 300, 2], np.uint16), "user_id": np.array([5, 6, 7], np.int32),
            "conversion": np.array([0, 1, 0], np.uint8), "revenue": np.array([0.0, 2.5, 0.0]),
            "event_type": np.zeros(3, np.uint16), "device": np.zeros(3, np.uint16), "country": np.zeros(3, np.uint16),
            "session_id": pa.array(["a", "", "c"])}
    part = Part(cols)
    assert part._ts_base is None and part._cols["variant"].dtype == np.uint16
    assert part.column("timestamp").tolist() == ts.tolist() and part.column("variant").tolist() == [0, 300, 2]
    assert part.rows_between(10**18 + 1, 10**18 + 1, ["user_id"])[0].tolist() == [6]
    far = Part({**cols, "timestamp": np.array([0, NS, (1 << 32) * NS], np.int64)})  # spans more than uint32 seconds
    assert far._ts_base is None and far.column("timestamp").tolist() == [0, NS, (1 << 32) * NS]


def test_a_tail_is_sealed_when_the_next_batch_like_the_last_would_not_fit():
    """Batches of 400 into a tail with room for 1,000: sealed at 800 rows, never grown (a grown
    tail is copied into arrays twice its size); every event is counted once."""
    events = EVENTS[:1_600]
    s = EventStore(seal_rows=1_000)
    rooms, tail_rows = [], []
    for i in range(0, 1_600, 400):
        s.append(to_table(events[i:i + 400]))
        s.wait_sealed()
        rooms.append(s._ingest.tail.room)
        tail_rows.append(s._ingest.view.tail_rows)
    assert tail_rows == [400, 0, 400, 0] and rooms == [1_000] * 4
    oracle = Oracle(events)
    for test_id in TESTS:
        assert s.summary(SummaryQuery(test_id)).metrics.events.tolist() == [
            row["events"] for row in oracle.summary(test_id)]


def test_a_tail_being_sealed_stays_visible_exactly_once():
    """While the sealer works on a full tail, queries see it beside the new tail; after, in parts."""
    import threading

    events = [e for e in EVENTS if e["test_id"] == TESTS[0]][:150]
    oracle = Oracle(events)
    s = EventStore(seal_rows=100)
    gate = threading.Event()
    s._ingest._sealer.submit(gate.wait)  # hold the sealer: the full tail waits, drained, beside the next rows
    try:
        s.append(to_table(events[:120]))
        s.append(to_table(events[120:]))
        assert s._ingest._sealing is not None and len(s._ingest.view.tails) == 2 and s.event_count == 150
        for expected, ours in zip(oracle.summary(TESTS[0], None, None), s.summary(SummaryQuery(TESTS[0])).metrics.rows()):
            assert_metrics_match(ours, expected)
        assert [t.events for t in s.list_tests()] == [150]
    finally:
        gate.set()
    s.wait_sealed()
    assert s._ingest._sealing is None and len(s._ingest.view.tails) == 1 and s.event_count == 150
    for expected, ours in zip(oracle.summary(TESTS[0], None, None), s.summary(SummaryQuery(TESTS[0])).metrics.rows()):
        assert_metrics_match(ours, expected)


def test_a_sealer_finishing_before_the_appender_publishes_counts_each_event_once():
    """The sealer publishes its parts beside the newest tail view: the appender publishes the
    view of the drained tail before the sealer may run, so a sealer that wins the race never
    pairs its parts with a tail view that still holds their rows."""
    events = [e for e in EVENTS if e["test_id"] == TESTS[0]][:120]
    s = EventStore(seal_rows=100)
    s.append(to_table(events[:60]))
    publish, seen = s._ingest.publish_view, []

    def sealer_first() -> None:
        s._ingest.wait_sealed()  # the sealer wins: its view is published before the appender's
        seen.append(s.event_count)
        publish()

    s._ingest.publish_view = sealer_first
    s.append(to_table(events[60:]))  # the tail reaches 120 events: sealed
    assert seen == [120] and s.event_count == 120


def test_a_part_holds_memory_only_for_its_own_rows():
    """A part sealed from a slice of a larger sorted tail copies its rows (a view would keep the
    whole tail alive after its siblings merge), and packed strings hold their compressed size,
    not the codec's worst case."""
    import numpy as np
    from abstream.store.partition import Part

    n, rows = 200_000, slice(1000, 1500)
    rng = np.random.default_rng(3)
    tail = {"timestamp": np.sort(rng.integers(BASE_S, BASE_S + 86400, n)) * NS,
            "variant": rng.integers(0, 3, n).astype(np.uint16), "user_id": rng.integers(0, 10**6, n).astype(np.int32),
            "conversion": (rng.random(n) < 0.05).astype(np.uint8), "revenue": rng.random(n),
            "event_type": rng.integers(0, 4, n).astype(np.uint16), "device": rng.integers(0, 3, n).astype(np.uint16),
            "country": rng.integers(0, 5, n).astype(np.uint16),
            "session_id": pa.array([f"session_{i}" for i in rng.integers(0, 10**7, n)])}
    tail["timestamp"][1200] += 1  # a sub-second timestamp: the part keeps int64 nanoseconds
    tail["revenue"][::4] = 0  # mostly non-zero: revenue stays dense
    before = pa.total_allocated_bytes()
    part = Part({c: a[rows] for c, a in tail.items()})
    held_by_arrow = pa.total_allocated_bytes() - before
    for name in ("timestamp", "variant", "user_id", "conversion", "revenue", "event_type", "device", "country"):
        assert not np.shares_memory(part.column(name), tail[name]), name
        assert part.column(name).tolist() == tail[name][rows].tolist(), name
    assert part._ts_base is None and part._revenue_at is None  # the paths that kept views before
    assert held_by_arrow <= part._strings["session_id"].nbytes
    assert part._strings["session_id"].nbytes < 500 * 14  # compressed: under the raw bytes
    assert part.batch().column("session_id").to_pylist() == tail["session_id"][rows].to_pylist()


@pytest.mark.parametrize("overlap", [False, True], ids=["end-to-end", "overlapping"])
def test_merged_parts_equal_their_events_sorted(overlap):
    """Parts in time order are merged by concatenation (compacted columns and packed strings kept
    as they are), overlapping ones by sorting: both give the events in stable timestamp order,
    whatever mix of layouts the parts had (uint8 or wide codes, seconds or nanoseconds, sparse or
    dense revenue, small or large string chunks)."""
    import numpy as np
    from abstream.store.partition import COLUMNS, Part

    rng = np.random.default_rng(11)

    def columns(n: int, t0: int, *, wide: bool, sub_second: bool, dense: bool, long_strings: bool) -> dict:
        ts = t0 + np.sort(rng.integers(0, 3600, n)) * NS
        ts[0] = t0  # a tie with the previous part's last event
        if sub_second:
            ts[n // 2:] += 1
        top = 1000 if wide else 4
        text = "x" * 240 if long_strings else ""  # long: a chunk is past PackedStrings.JOIN_BELOW
        return {"timestamp": ts, "variant": rng.integers(0, top, n).astype(np.uint16),
                "user_id": rng.integers(0, 10**6, n).astype(np.int32), "conversion": (rng.random(n) < 0.3).astype(np.uint8),
                "revenue": np.where(rng.random(n) < (0.9 if dense else 0.02), rng.random(n), 0.0),
                "event_type": rng.integers(0, 3, n).astype(np.uint16), "device": rng.integers(0, top, n).astype(np.uint16),
                "country": rng.integers(0, 5, n).astype(np.uint16),
                "session_id": pa.array([f"s{i}{text}" for i in rng.integers(0, 10**6, n)])}

    layouts = [dict(wide=False, sub_second=False, dense=False, long_strings=True),
               dict(wide=True, sub_second=False, dense=True, long_strings=True),
               dict(wide=False, sub_second=True, dense=False, long_strings=False),
               dict(wide=False, sub_second=False, dense=False, long_strings=True)]
    for order in ([0, 1, 2, 3], [0, 3], [2, 0], [1, 1, 1, 1], [2, 2]):
        pieces, t0 = [], BASE_S * NS
        for i in order:
            n = int(rng.integers(300, 1500))
            pieces.append(columns(n, t0, **layouts[i]))
            last = int(pieces[-1]["timestamp"][-1])
            t0 = last - 1800 * NS if overlap else last  # ties at the boundary, or interleaved
        parts = [Part(c) for c in pieces]
        merged = Part.merge(parts)
        whole = {c: pa.concat_arrays([p[c] for p in pieces]) if c == "session_id"
                 else np.concatenate([p[c] for p in pieces]) for c in COLUMNS}
        expected = Part.sorted_from(whole).batch()
        assert merged.batch().equals(expected)
        assert (merged.first_ns, merged.last_ns) == (int(whole["timestamp"].min()), int(whole["timestamp"].max()))
        if not overlap and order == [0, 3]:  # two large chunks: kept as they are, not joined
            assert len(merged._strings["session_id"]._chunks) == 2
        if order == [2, 2]:  # small chunks: joined into one (their zstd frames one after the other)
            assert len(merged._strings["session_id"]._chunks) == 1


def test_late_rows_go_to_a_run_of_their_own_and_the_main_run_stays_in_time_order():
    """Four streams of one test, each a few batches behind another (as their requests interleave),
    and a backfill of older events: every seal's rows older than the newest part go to the late
    run. The main run's parts follow one another in time (merged by concatenation), and the
    partition answers, and hands its events out, as the events sent."""
    import numpy as np

    events = sorted((e for e in random_events(6000, seed=3) if e["test_id"] == "checkout"), key=lambda e: e["timestamp"])
    live, backfill = events[len(events) // 5:], events[: len(events) // 5]
    chunks = [live[i:i + 25] for i in range(0, len(live), 25)]
    arrivals = [c for k in range(0, len(chunks), 4) for c in chunks[k:k + 4][::-1]]  # the 4th stream first
    s = EventStore(seal_rows=100)
    for batch in [*arrivals[:len(arrivals) // 2], backfill, *arrivals[len(arrivals) // 2:]]:
        s.append(to_table(batch))
    s.wait_sealed()
    sealed = s._ingest.view.partitions[s._ingest.tests.code("checkout")]
    main, late = sealed.parts[:len(sealed.parts) - sealed.late], sealed.parts[len(sealed.parts) - sealed.late:]
    assert late and sum(p.num_rows for p in late) >= len(backfill)
    assert all(a.last_ns <= b.first_ns for a, b in zip(main, main[1:]))
    assert sum(p.num_rows for p in sealed.parts) + s._ingest.tail.rows == len(events)

    expected = Oracle(events).summary("checkout", None, None)
    result = s.summary(SummaryQuery("checkout"))
    assert result.variants == [row["variant"] for row in expected]
    for ours, theirs in zip(result.metrics.rows(), expected):
        assert_metrics_match(ours, theirs)
    exported = pa.concat_tables(s.export("checkout")).to_pylist()
    key = lambda e: (e["timestamp"], e["user_id"], e["session_id"], e["revenue"], e["event_type"])  # noqa: E731
    assert sorted(exported, key=key) == sorted(events, key=key)
    assert all(np.all(np.diff(p.column("timestamp")) >= 0) for p in sealed.parts)  # each part sorted


def test_radix_sort_orders_keys_like_numpy():
    """The C sort behind distinct counts, on every width and shape it is given, including keys
    that share their low or high digits (passes skipped) and a strided view (numpy's sort)."""
    import numpy as np
    from abstream.store import kernels

    rng = np.random.default_rng(5)
    cases = [np.zeros(0, np.uint32), np.array([7], np.uint32), np.full(1000, 2**32 - 1, np.uint32),
             np.full(1000, 5, np.int64), rng.integers(0, 2**11, 5000).astype(np.uint32) << 11,
             rng.integers(0, 2**32, 100_000).astype(np.uint32), rng.integers(0, 2**63 - 1, 100_000, dtype=np.int64),
             rng.integers(0, 2**64 - 1, 100_000, dtype=np.uint64), np.arange(50_000, 0, -1, dtype=np.int32),
             rng.integers(0, 1000, 20_000)[::2]]
    for keys in cases:
        expected = np.sort(keys)
        kernels.sort_keys(keys)
        assert np.array_equal(keys, expected) and keys.dtype == expected.dtype


def test_radix_sort_skipping_low_bits_sorts_stably_by_the_bits_above():
    """With `in_order_bits`, the sort orders keys by the bits above them only, stably: low bits
    that ascend already (row numbers) end up fully sorted in fewer passes, and low bits that do
    not are left in their order; as many bits as a key has are refused."""
    import numpy as np
    import pytest
    from abstream.store import _kernels, kernels

    rng = np.random.default_rng(11)
    high = rng.integers(0, 2**30, 50_000, dtype=np.int64)
    rows = (high << 20) | np.arange(50_000, dtype=np.int64)
    expected = np.sort(rows)
    kernels.sort_keys(rows, 20)
    assert np.array_equal(rows, expected)
    scrambled = (high << 20) | rng.integers(0, 2**20, 50_000, dtype=np.int64)
    expected = scrambled[np.argsort(scrambled >> 20, kind="stable")]
    assert not np.array_equal(expected, np.sort(scrambled))  # the low bits are not sorted by
    kernels.sort_keys(scrambled, 20)
    assert np.array_equal(scrambled, expected)
    with pytest.raises(ValueError):
        _kernels.sort_unsigned(np.zeros(4, np.uint32), 32)


def test_sorted_with_order_is_numpys_stable_argsort():
    """Row numbers packed under the keys give the stable order (ties keep row order); keys too
    large to share 63 bits with them take numpy's argsort."""
    import numpy as np
    from abstream.store import kernels

    rng = np.random.default_rng(9)
    for keys in [np.zeros(0, np.int64), np.array([3], np.int64), rng.integers(0, 50, 10_000),
                 rng.integers(0, 2**40, 30_000), rng.integers(2**55, 2**62, 1000)]:
        order = np.argsort(keys, kind="stable")
        got_keys, got_order = kernels.sorted_with_order(keys)
        assert np.array_equal(got_order, order) and np.array_equal(got_keys, keys[order])


def test_export_gives_back_every_event_exactly(store):
    """A test's events as stored, whichever engine holds them (the embedded one streams them)."""
    for test_id in TESTS:
        got = pa.concat_tables(list(store.export(test_id, rows=50))).to_pylist() if test_id else []
        mine = [e for e in EVENTS if e["test_id"] == test_id]
        key = lambda e: (e["timestamp"], e["user_id"], e["session_id"], e["revenue"], e["variant"])  # noqa: E731
        assert sorted(got, key=key) == sorted(mine, key=key)
    start, end = sorted(e["timestamp"] for e in EVENTS)[500], sorted(e["timestamp"] for e in EVENTS)[2000]
    ranged = pa.concat_tables(list(store.export(TESTS[0], start, end))).to_pylist()
    assert len(ranged) == sum(1 for e in EVENTS if e["test_id"] == TESTS[0] and start <= e["timestamp"] <= end)


def test_export_names_users_from_packed_values_and_none_erased_meanwhile():
    """150,000 users (two chunks of packed values and the newest unpacked), exported 20,000 at a
    time: every event with its own user id, in order; a user erased after the first page is not
    named by the pages after it."""
    n = 150_000
    users = [f"u{i * 7919 % 300_007}" for i in range(n)]  # distinct
    seconds = pa.array([(BASE_S + i) * NS for i in range(n)], pa.timestamp("ns", tz="UTC"))
    table = pa.table({"timestamp": seconds,
                      "user_id": users, "test_id": ["big"] * n, "variant": ["a", "b"] * (n // 2),
                      "event_type": ["click"] * n, "conversion": pa.array([0] * n, pa.int64()),
                      "revenue": [0.0] * n, "session_id": [""] * n, "device": [""] * n, "country": [""] * n})
    s = EventStore(seal_rows=40_000)
    for piece in table.to_batches(max_chunksize=25_000):
        s.append(pa.Table.from_batches([piece]).cast(EVENT_SCHEMA))
    s.wait_sealed()
    assert len(s._ingest.dicts["user_id"]._packed) == 2
    pages = s.export("big", rows=20_000)
    first = next(pages)
    assert first.column("user_id").to_pylist() == users[:len(first)]
    secret = users[30_000]  # in the first chunk of values, unpacked for the first page
    assert s.erase_user(secret) == 1
    rest = pa.concat_tables(list(pages)).column("user_id").to_pylist()
    assert len(first) + len(rest) == n and secret not in rest
    at = 30_000 - len(first)
    assert rest[:at] + rest[at + 1:] == users[len(first):30_000] + users[30_001:]
    assert rest[at].startswith("\x00erased:")


@pytest.mark.parametrize("test_id", TESTS)
def test_users_in_several_variants_are_counted_and_can_be_left_out(store, oracle, test_id):
    """Summary's health counts, on every engine, against the events themselves: distinct users,
    users seen in more than one variant, and with those left out, the tutorial's metrics over the
    other users' events only."""
    for start, end in ranges():
        mine = [e for e in EVENTS if e["test_id"] == test_id and (start is None or e["timestamp"] >= start)
                and (end is None or e["timestamp"] <= end)]
        variants_of: dict[str, set] = {}
        for e in mine:
            variants_of.setdefault(e["user_id"], set()).add(e["variant"])
        several = {u for u, vs in variants_of.items() if len(vs) > 1}
        result = store.summary(SummaryQuery(test_id, start, end))
        assert (result.users, result.multi_variant_users) == (len(variants_of), len(several))
        if start is None and end is None and len({e["variant"] for e in mine}) > 1:
            assert several, "the events put some users in several variants"
        assert store.count_events(test_id, start, end) == len(mine)
        if start is not None or end is not None:
            continue  # the exclusion, over the whole test (an oracle of its own)
        excluded = store.summary(SummaryQuery(test_id, start, end, AnalysisOptions(exclude_multi_variant_users=True)))
        expected = Oracle([e for e in EVENTS if e["user_id"] not in several or e["test_id"] != test_id]).summary(
            test_id, start, end)
        assert excluded.variants == [row["variant"] for row in expected]
        for ours, theirs in zip(excluded.metrics.rows(), expected):
            assert_metrics_match(ours, theirs)


def test_users_in_several_groups_agree_between_flag_and_sort_paths():
    """The dense-flag path and the sort path (user codes too sparse for flags) of the kernel."""
    import numpy as np
    from abstream.store import kernels

    rng = np.random.default_rng(3)
    for n_groups in (1, 2, 3, 7):
        group = rng.integers(0, n_groups, 20_000)
        user = rng.integers(0, 5_000, 20_000)
        for offset in (0, 1 << 40):  # far apart codes take the sort path
            u = user + np.where(user % 2 == 0, offset, 0)
            counts, distinct, several = kernels.distinct_per_group(group, u, n_groups, across=True)
            assert counts.tolist() == [len({x for g, x in zip(group, u) if g == k}) for k in range(n_groups)]
            pairs = {(int(g), int(x)) for g, x in zip(group, u)}
            per_user: dict[int, int] = {}
            for _, x in pairs:
                per_user[x] = per_user.get(x, 0) + 1
            assert distinct == len(per_user)
            assert several.tolist() == sorted(x for x, k in per_user.items() if k > 1)


@pytest.mark.parametrize("event_type", ["purchase", "click", "never_seen"])
def test_metrics_of_one_event_type_keep_every_user(store, event_type):
    """metric_event_type: conversions and revenue from that type's events only, users from all:
    the tutorial's metrics over the same events with the others' conversions and revenue zeroed
    (every engine, Summary and Segments, with a range)."""
    zeroed = [e if e["event_type"] == event_type else {**e, "conversion": 0, "revenue": 0.0} for e in EVENTS]
    oracle = Oracle(zeroed)
    options = AnalysisOptions(metric_event_type=event_type)
    on_event = sorted(e["timestamp"] for e in EVENTS)
    for test_id in TESTS:
        for start, end in ((None, None), (on_event[500], on_event[2000])):
            result = store.summary(SummaryQuery(test_id, start, end, options))
            expected = oracle.summary(test_id, start, end)
            assert result.variants == [row["variant"] for row in expected]
            for ours, theirs in zip(result.metrics.rows(), expected):
                assert_metrics_match(ours, theirs)
    result = store.segments(SegmentsQuery(TESTS[0], Dimension.COUNTRY, analysis=options))
    expected = {(r["variant"], r["segment"]): r for r in oracle.segments(TESTS[0], "country")}
    assert len(result.metrics) == len(expected)
    for variant, segment, ours in zip(result.variants, result.segments, result.metrics.rows()):
        assert_metrics_match(ours, expected[(variant, segment)])


@pytest.mark.parametrize("test_id", TESTS)
def test_the_revenue_conversions_comoment_is_the_per_user_one(store, test_id):
    """Revenue per conversion's covariance term, from every engine, against numpy over the
    per-user totals of the events (refunds and revenue without a conversion included)."""
    import numpy as np
    from abstream.core.types import RATIO_COMOMENT

    for start, end in ranges():
        result = store.summary(SummaryQuery(test_id, start, end))
        for i, variant in enumerate(result.variants):
            totals: dict[str, list[float]] = {}
            for e in EVENTS:
                in_range = (start is None or e["timestamp"] >= start) and (end is None or e["timestamp"] <= end)
                if e["test_id"] == test_id and e["variant"] == variant and in_range:
                    t = totals.setdefault(e["user_id"], [0.0, 0.0])
                    t[0] += e["revenue"]
                    t[1] += e["conversion"]
            r, c = np.array(list(totals.values())).T
            expected = float(((r - r.mean()) * (c - c.mean())).sum())
            assert result.moments.m2[RATIO_COMOMENT][i] == pytest.approx(expected, rel=1e-9, abs=1e-7)
