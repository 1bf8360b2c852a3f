"""The embedded engine's rollups (store/rollup.py): Summary, cumulative Timeseries and Segments
over a whole test from per-(variant, user) totals must equal the same from a scan of the events,
after every batch, through every removal, and after recovery from a snapshot; and a store must
count their bytes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from abstream.core import analysis
from abstream.core.engine import append
from abstream.core.types import AnalysisOptions, Dimension, SegmentsQuery
from abstream.store import EventStore, Interval, SummaryQuery, TimeseriesQuery
from abstream.store.durability import Durability

from tests.events import TESTS, VARIANTS, random_events, to_table

EVENTS = random_events(3000, seed=11)
OPTIONS = [AnalysisOptions(), AnalysisOptions(exclude_multi_variant_users=True)]


def sticky(events: list[dict]) -> list[dict]:
    """The events with each user in one variant per test (assignment as it should be)."""
    return [{**e, "variant": VARIANTS[e["test_id"]][hash(e["user_id"]) % len(VARIANTS[e["test_id"]])]}
            for e in events]


def assert_same_groups(x, y) -> None:
    """Two answers' groups alike: their counts exactly, their sums and moments but for rounding."""
    assert x.variants == y.variants
    for name in ("events", "conversions", "users", "converted_users"):
        assert getattr(x.metrics, name).tolist() == getattr(y.metrics, name).tolist(), name
    assert x.metrics.total_revenue == pytest.approx(y.metrics.total_revenue, rel=1e-12, abs=1e-9)
    assert x.moments.users.tolist() == y.moments.users.tolist()
    for name, values in y.moments.sums.items():
        assert x.moments.sums[name] == pytest.approx(values, rel=1e-12, abs=1e-9), name
    for name, values in y.moments.m2.items():
        assert x.moments.m2[name] == pytest.approx(values, rel=1e-9, abs=1e-6), name
    assert x.stats.events_scanned == y.stats.events_scanned


def assert_same(rolled: EventStore, scanned: EventStore, test_ids=TESTS, analyses: bool = True) -> int:
    """Every test's Summary (with its analysis) alike on both stores, once each has been asked
    for on the first (so that it keeps a rollup); how many came from a rollup."""
    for test_id in test_ids:
        rolled.summary(SummaryQuery(test_id))
        rolled.timeseries(TimeseriesQuery(test_id, Interval.DAY, cumulative=True))  # and hourly
        for dimension in Dimension:  # and by each dimension
            rolled.segments(SegmentsQuery(test_id, dimension))
    rolled.wait_rollups()
    used = 0
    for test_id in test_ids:
        for options in OPTIONS:
            q = SummaryQuery(test_id, analysis=options)
            x, y = rolled.summary(q), scanned.summary(q)
            assert (x.users, x.multi_variant_users) == (y.users, y.multi_variant_users)
            assert_same_groups(x, y)
            if not analyses:
                continue
            a, b = analysis.summary(q, x).analysis, analysis.summary(q, y).analysis
            assert [(c.variant, c.metric) for c in a.comparisons] == [(c.variant, c.metric) for c in b.comparisons]
            for c, d in zip(a.comparisons, b.comparisons):
                assert (c.result.relative.ci_low, c.result.relative.ci_high) == pytest.approx(
                    (d.result.relative.ci_low, d.result.relative.ci_high), rel=1e-9, abs=1e-12)
        for interval, zone in [(Interval.HOUR, ""), (Interval.DAY, ""), (Interval.WEEK, ""),
                               (Interval.DAY, "Asia/Kolkata"), (Interval.MINUTE, "")]:
            q = TimeseriesQuery(test_id, interval, cumulative=True, time_zone=zone)
            x, y = rolled.timeseries(q), scanned.timeseries(q)
            assert (x.bucket_start_ns.tolist(), x.variants) == (y.bucket_start_ns.tolist(), y.variants)
            for name in ("events", "conversions", "users", "converted_users"):
                assert getattr(x.metrics, name).tolist() == getattr(y.metrics, name).tolist(), (interval, name)
            assert x.metrics.total_revenue == pytest.approx(y.metrics.total_revenue, rel=1e-12, abs=1e-9)
            assert x.stats.events_scanned == y.stats.events_scanned
        for dimension in Dimension:
            q = SegmentsQuery(test_id, dimension)
            x, y = rolled.segments(q), scanned.segments(q)
            assert_same_groups(x, y)
            assert x.segments == y.segments, dimension
        used += rolled._ingest.view.partitions.get(rolled._ingest.tests.code(test_id)) is not None and \
            rolled._ingest.view.partitions[rolled._ingest.tests.code(test_id)].rollup is not None
    return used


@pytest.mark.parametrize("events", [EVENTS, sticky(EVENTS)], ids=["several-variants", "sticky"])
def test_a_rollup_answers_like_the_scan_after_every_batch(events):
    rolled = EventStore(seal_rows=64, rollup_events=0)  # every test rolled up from its first part
    scanned = EventStore(seal_rows=64, rollup_events=None)
    for i in range(0, len(events), 97):
        batch = to_table(events[i:i + 97])
        append(rolled, batch)
        append(scanned, batch)
        used = assert_same(rolled, scanned)
    assert used == len(TESTS)
    several = [rolled.summary(SummaryQuery(t)).multi_variant_users for t in TESTS]
    assert any(several) if events is EVENTS else not any(several)


def test_only_tests_asked_for_whole_keep_a_rollup():
    """Ingest pays for the rollups of the tests whose whole-test Summary was asked for, no other;
    the first answer scans while its rollup is folded from the parts."""
    store = EventStore(seal_rows=64, rollup_events=0)
    append(store, to_table(EVENTS))
    store.wait_sealed()

    def rolled() -> set[str]:
        return {t for t in TESTS if store._ingest.view.partitions[store._ingest.tests.code(t)].rollup is not None}

    assert rolled() == set()
    middle = sorted(e["timestamp"] for e in EVENTS)[len(EVENTS) // 2]
    store.summary(SummaryQuery(TESTS[0], middle, None))  # a range: no rollup wanted
    store.wait_rollups()
    assert rolled() == set()
    first = store.summary(SummaryQuery(TESTS[0]))
    store.wait_rollups()
    assert rolled() == {TESTS[0]}
    assert store.summary(SummaryQuery(TESTS[0])).metrics.users.tolist() == first.metrics.users.tolist()

    def hourly() -> set[str]:
        return {t for t in rolled() if store._ingest.view.partitions[store._ingest.tests.code(t)].rollup.hourly}

    assert hourly() == set()  # Summary's rollup holds no hours: the list of tests asks only for it
    series = TimeseriesQuery(TESTS[0], Interval.DAY, cumulative=True)
    scanned = store.timeseries(series)
    store.wait_rollups()
    assert hourly() == {TESTS[0]}
    assert store.timeseries(series).metrics.users.tolist() == scanned.metrics.users.tolist()
    holds = store._ingest.view.partitions[store._ingest.tests.code(TESTS[0])].rollup.holds
    assert holds == {"hourly"}  # no segments: no Segments was asked for
    segments = SegmentsQuery(TESTS[0], Dimension.COUNTRY)
    scanned = store.segments(segments)
    store.wait_rollups()
    holds = store._ingest.view.partitions[store._ingest.tests.code(TESTS[0])].rollup.holds
    assert holds == {"hourly", "country"}  # by country only, and the hours kept
    assert store.segments(segments).metrics.users.tolist() == scanned.metrics.users.tolist()
    append(store, to_table(EVENTS[:500]))  # kept up at sealing from now on
    store.wait_sealed()
    assert rolled() == {TESTS[0]} and hourly() == {TESTS[0]}
    assert store.nbytes > 0


def test_a_range_that_leaves_out_sealed_events_is_scanned():
    rolled, scanned = EventStore(seal_rows=64, rollup_events=0), EventStore(seal_rows=64, rollup_events=None)
    append(rolled, to_table(EVENTS))
    append(scanned, to_table(EVENTS))
    middle = sorted(e["timestamp"] for e in EVENTS)[len(EVENTS) // 2]
    for test_id in TESTS:
        for start, end in [(middle, None), (None, middle), (0, 2**62)]:
            q = SummaryQuery(test_id, start, end)
            x, y = rolled.summary(q), scanned.summary(q)
            assert x.metrics.users.tolist() == y.metrics.users.tolist()
            assert x.stats.events_scanned == y.stats.events_scanned


def test_rollups_follow_removals_and_come_back_from_a_snapshot(tmp_path):
    def stores():
        return (EventStore(seal_rows=64, rollup_events=0, durability=Durability(tmp_path / "rolled")),
                EventStore(seal_rows=64, rollup_events=None, durability=Durability(tmp_path / "scanned")))

    rolled, scanned = stores()
    both = (rolled, scanned)
    for store in both:
        append(store, to_table(EVENTS[:2000]))
    assert assert_same(rolled, scanned) == len(TESTS)
    user = EVENTS[0]["user_id"]
    assert rolled.erase_user(user, [TESTS[0]]) == scanned.erase_user(user, [TESTS[0]]) > 0
    assert_same(rolled, scanned)
    assert rolled.erase_user(EVENTS[1]["user_id"]) == scanned.erase_user(EVENTS[1]["user_id"]) > 0
    assert_same(rolled, scanned)
    horizon = sorted(e["timestamp"] for e in EVENTS)[len(EVENTS) // 3]
    assert rolled.retain({TESTS[1]: horizon}) == scanned.retain({TESTS[1]: horizon}) > 0
    assert_same(rolled, scanned)
    assert rolled.delete_test(TESTS[2]) == scanned.delete_test(TESTS[2]) > 0
    for store in both:
        append(store, to_table(EVENTS[2000:]))  # the deleted test comes back, from scratch
    assert assert_same(rolled, scanned) == len(TESTS)
    for store in both:
        store.snapshot()
        append(store, to_table(EVENTS[:100]))  # and some in the log after the snapshot
        store.close(final_snapshot=False)
    rolled, scanned = stores()
    try:
        assert assert_same(rolled, scanned) == len(TESTS)
    finally:
        rolled.close()
        scanned.close()


def test_a_store_counts_its_rollups_bytes():
    rolled, scanned = EventStore(seal_rows=256, rollup_events=0), EventStore(seal_rows=256, rollup_events=None)
    append(rolled, to_table(EVENTS))
    append(scanned, to_table(EVENTS))
    for test_id in TESTS:
        rolled.timeseries(TimeseriesQuery(test_id, Interval.HOUR, cumulative=True))
    rolled.wait_rollups()
    scanned.wait_sealed()
    rollups = [p.rollup for p in rolled._ingest.view.partitions.values()]
    assert all(r is not None for r in rollups)
    held = sum(r.nbytes for r in rollups)
    assert held > 0 and rolled.nbytes - scanned.nbytes == held


def test_a_segments_rollup_of_few_users_among_many_codes_stays_small():
    """User codes are the whole server's: per (variant, segment), a few users with high codes are
    kept as their codes, not as a bitset over every code below them (200 devices x 2 variants of
    a test whose 1,200 users came after 200,000 others took ~10 MB), and answers stay the
    scan's as a segment grows dense enough for a bitset, as users with lower codes join, and as
    one with a far higher code makes its codes the smaller again."""
    from tests.events import BASE_S, NS

    def event(user: str, test_id: str, variant: str, device: str, i: int) -> dict:
        return {"timestamp": (BASE_S + i) * NS, "user_id": user, "test_id": test_id, "variant": variant,
                "event_type": "view", "conversion": int(i % 3 == 0), "revenue": float(i % 7), "session_id": "s",
                "device": device, "country": "AU"}

    crowd = [event(f"crowd_{i}", "crowd", "a", "d", i) for i in range(200_000)]
    sparse = [event(f"sparse_{i}", "sparse", "ab"[i % 2], f"device_{i // 3 % 200}", i) for i in range(1_200)]
    dense = [event(f"dense_{i}", "sparse", "a", "device_0", i) for i in range(8_000)]  # a bitset pays off
    crowded = [event(f"crowd_{i}", "sparse", "ab"[i % 2], f"device_{i % 200}", i) for i in range(0, 200_000, 997)]
    # 400,000 more users elsewhere, and one of them in device_0: its codes take less than a bitset again.
    later = [event(f"later_{i}", "crowd", "a", "d", i) for i in range(400_000)]
    later.append(event("later_399999", "sparse", "a", "device_0", 0))
    rolled, scanned = EventStore(seal_rows=256, rollup_events=0), EventStore(seal_rows=256, rollup_events=None)
    for batch in (crowd, sparse):
        append(rolled, to_table(batch))
        append(scanned, to_table(batch))
    q = SegmentsQuery("sparse", Dimension.DEVICE)
    rolled.segments(q)
    rolled.wait_rollups()
    rollup = rolled._ingest.view.partitions[rolled._ingest.tests.code("sparse")].rollup
    assert len(rollup.segments["device"]) == 400
    assert rollup.nbytes < 100_000
    assert_same_groups(rolled.segments(q), scanned.segments(q))
    for batch in (dense, crowded, later):  # codes above the segment's, below them, then far above
        append(rolled, to_table(batch))
        append(scanned, to_table(batch))
        rolled.wait_rollups()
        x, y = rolled.segments(q), scanned.segments(q)
        assert_same_groups(x, y)
        assert x.segments == y.segments
        assert_same(rolled, scanned, ["sparse"], analyses=False)


def test_a_rollup_keeps_large_near_constant_revenue_stable():
    """Revenue of 1e6 and some cents per event: the rollup's centered sums of squares are the
    scan's, never negative. (Not the analyses: revenue per conversion is then ~1e6 give or take
    cents, and its delta-method variance cancels terms of ~1e12 on either path.)"""
    rng = np.random.default_rng(3)
    events = [{**e, "revenue": 1e6 + float(rng.integers(0, 100)) / 100, "conversion": 1} for e in sticky(EVENTS)]
    rolled, scanned = EventStore(seal_rows=64, rollup_events=0), EventStore(seal_rows=64, rollup_events=None)
    append(rolled, to_table(events))
    append(scanned, to_table(events))
    assert_same(rolled, scanned, analyses=False)
    for test_id in TESTS:
        m2 = rolled.summary(SummaryQuery(test_id)).moments.m2["revenue_per_user"]
        assert (m2 > 0).all()


def held_first_rollup() -> tuple[EventStore, EventStore, threading.Event]:
    """Two stores of EVENTS[:1500] (rolled up, and scanned), the rolled one's first rollup of
    TESTS[0] asked for and its folding held until the event returned is set."""
    rolled, scanned = EventStore(seal_rows=64, rollup_events=0), EventStore(seal_rows=64, rollup_events=None)
    for store in (rolled, scanned):
        append(store, to_table(EVENTS[:1500]))
    rolled.wait_sealed()
    release = threading.Event()
    rolled._ingest._folder.submit(release.wait)  # the folding thread is busy until released
    rolled.summary(SummaryQuery(TESTS[0]))
    rolled._ingest._sealer.submit(lambda: None).result()  # the fold is queued behind the block
    return rolled, scanned, release


def test_rows_sealed_while_a_first_rollup_is_folded_are_folded_in_after():
    """The first rollup is folded beside sealing: what is sealed meanwhile is kept and folded in
    before the rollup is attached (here the folding thread is held until batches were sealed)."""
    rolled, scanned, release = held_first_rollup()
    assert rolled._ingest._folding  # and the test's sealed rows are now kept aside
    for store in (rolled, scanned):
        append(store, to_table(EVENTS[1500:]))
    rolled.wait_sealed()
    assert sum(len(r["timestamp"]) for rows in rolled._ingest._folding.values() for r in rows) > 0
    release.set()
    rolled.wait_rollups()
    assert rolled._ingest.view.partitions[rolled._ingest.tests.code(TESTS[0])].rollup is not None
    x, y = rolled.summary(SummaryQuery(TESTS[0])), scanned.summary(SummaryQuery(TESTS[0]))
    assert (x.metrics.events.tolist(), x.metrics.users.tolist()) == (y.metrics.events.tolist(), y.metrics.users.tolist())
    assert x.metrics.total_revenue == pytest.approx(y.metrics.total_revenue, rel=1e-12)
    assert assert_same(rolled, scanned, [TESTS[0]]) == 1


@pytest.mark.parametrize("removal", ["erase", "delete-other"])
def test_a_removal_while_a_first_rollup_takes_its_last_rows_is_not_undone(removal, monkeypatch):
    """A removal runs (in another thread, under the ingest lock) while the sealer folds the rows
    sealed meanwhile into a first rollup: the rollup is not attached to the partition as it was
    before, which would bring the erased user back, or lose the events the removal sealed."""
    from abstream.store import rollup as rollup_module

    rolled, scanned, release = held_first_rollup()
    for store in (rolled, scanned):
        append(store, to_table(EVENTS[1500:2500]))  # sealed
        append(store, to_table(EVENTS[2500:2520]))  # a third of a seal: stays in the tail
    rolled.wait_sealed()
    assert rolled._ingest._folding and rolled._ingest.tail.rows
    user = next(e["user_id"] for e in EVENTS[:1500] if e["test_id"] == TESTS[0])
    other = next(t for t in TESTS if t != TESTS[0])

    def remove(store: EventStore) -> None:
        if removal == "erase":
            store.erase_user(user)
        else:  # the tail's rows (fewer than a seal's) are sealed by the removal
            store.delete_test(other)

    merged, removed = rollup_module.Rollup.merged, []

    def merging(self, rows, *args, **kwargs):
        if threading.current_thread().name.startswith("abstream-seal") and not removed:
            removed.append(threading.Thread(target=remove, args=(rolled,)))
            removed[0].start()
            removed[0].join()
        return merged(self, rows, *args, **kwargs)

    monkeypatch.setattr(rollup_module.Rollup, "merged", merging)
    release.set()
    rolled.wait_rollups()
    monkeypatch.setattr(rollup_module.Rollup, "merged", merged)
    assert removed, "the removal ran while the sealed rows were folded in"
    remove(scanned)
    assert [(t.test_id, t.events, t.users) for t in rolled.list_tests()] == \
        [(t.test_id, t.events, t.users) for t in scanned.list_tests()]
    assert_same(rolled, scanned, [t for t in TESTS if t != other])
