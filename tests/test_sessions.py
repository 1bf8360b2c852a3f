"""Conversions and events per session (AnalysisOptions.session_metrics) on every engine: each
ratio and its delta-method variance written out here from per-user totals (numpy, the textbook
formula), compared by the Welch test on those arms; an A/A simulation of the intervals."""

from __future__ import annotations

import random

import grpc
import numpy as np
import pytest
from abstream import stats
from abstream.core import analysis
from abstream.core.engine import append
from abstream.core.errors import InvalidArgument
from abstream.core.types import (
    METRICS,
    SESSION_METRICS,
    AnalysisOptions,
    Dimension,
    Interval,
    SegmentsQuery,
    SummaryQuery,
    TimeseriesQuery,
)
from abstream.store import kernels
from abstream.store.execute import session_moments, user_moments
from abstream.v1 import analytics_pb2 as pb

from tests import engines
from tests.events import BASE_S, NS, ingest, to_table


def visits(seed: int = 11, test_id: str = "visits") -> list[dict]:
    """Users with 1-4 sessions of 1-5 events each; the treatment converts more per event. Some
    users send no session id, some share one id across users (sessions are counted per user),
    and one user is in both arms."""
    rng = random.Random(seed)
    events = []
    for u in range(900):
        variant = ["control", "treatment"][u % 2]
        p = 0.08 if variant == "control" else 0.12
        for k in range(rng.randint(1, 4)):
            session = "" if u % 17 == 0 else "shared" if k == 0 and u % 5 == 0 else f"s{u}-{k}"
            for j in range(rng.randint(1, 5)):
                events.append(dict(timestamp=(BASE_S + u * 60 + k * 10 + j) * NS, user_id=f"u{u}", test_id=test_id,
                                   variant=variant, event_type=["view", "purchase"][j % 2],
                                   conversion=int(rng.random() < p), revenue=0.0, session_id=session,
                                   device=["mobile", "desktop"][u % 3 == 0], country="ES"))
    events += [dict(events[0], variant="treatment", timestamp=events[0]["timestamp"] + 5 * NS, session_id="s0-9")]
    return events


def textbook_arms(events: list[dict]) -> dict[str, dict[str, stats.Arm]]:
    """Per variant, each session metric's arm: R = sum x / sum s over the users' totals, and
    Var(R) = (V_x - 2 R C_xs + R^2 V_s) / mean(s)^2, with sample (co)variances over users."""
    users: dict[str, dict[str, list]] = {}
    for e in events:
        t = users.setdefault(e["variant"], {}).setdefault(e["user_id"], [0, 0, set()])
        t[0] += 1
        t[1] += e["conversion"]
        t[2].add(e["session_id"])
    out = {}
    for variant, by_user in users.items():
        e = np.array([t[0] for t in by_user.values()], dtype=float)
        c = np.array([t[1] for t in by_user.values()], dtype=float)
        s = np.array([len(t[2]) for t in by_user.values()], dtype=float)
        out[variant] = {}
        for metric, x in (("conversions_per_session", c), ("events_per_session", e)):
            r = x.sum() / s.sum()
            cov = np.cov(x, s)
            variance = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / s.mean() ** 2
            out[variant][metric] = stats.Arm(len(s), r, variance)
    return out


def assert_compared_as_written(comparisons, arms: dict[str, dict[str, stats.Arm]], control: str = "control") -> None:
    seen = 0
    for c in comparisons:
        if c.metric not in SESSION_METRICS:
            continue
        want = stats.compare(arms[control][c.metric], arms[c.variant][c.metric])
        got = c.result
        assert got.control_mean == pytest.approx(want.control_mean, rel=1e-12)
        assert got.treatment_mean == pytest.approx(want.treatment_mean, rel=1e-12)
        for ours, theirs in ((got.absolute, want.absolute), (got.relative, want.relative)):
            assert ours.status == theirs.status == "ok"
            assert ours.se == pytest.approx(theirs.se, rel=1e-9)
            assert (ours.ci_low, ours.ci_high) == pytest.approx((theirs.ci_low, theirs.ci_high), rel=1e-9)
            assert ours.p_value == pytest.approx(theirs.p_value, rel=1e-7, abs=1e-12)
        seen += 1
    assert seen == 2 * (len(arms) - 1)


@pytest.fixture(scope="module", params=["many-parts", "tail-only", "chdb", "clickhouse"])
def store(request):
    s = engines.make(request.param, request)
    events = visits()
    for i in range(0, len(events), 113):
        assert append(s, to_table(events[i:i + 113])).rejections == []
    yield s
    s.close()


def test_session_metrics_are_the_delta_method_over_each_users_sessions(store):
    events = visits()
    q = SummaryQuery("visits", analysis=AnalysisOptions(session_metrics=True))
    result = analysis.summary(q, store.summary(q))
    assert [c.metric for c in result.analysis.comparisons] == list(METRICS + SESSION_METRICS)
    assert_compared_as_written(result.analysis.comparisons, textbook_arms(events))
    treated = next(c for c in result.analysis.comparisons if c.metric == "conversions_per_session")
    assert treated.result.absolute.estimate > 0 and treated.result.absolute.p_value < 0.05

    plain = analysis.summary(SummaryQuery("visits"), store.summary(SummaryQuery("visits")))
    assert [c.metric for c in plain.analysis.comparisons] == list(METRICS)  # only when asked

    # Within a time range, with a filter, and without the user seen in both arms.
    start, end = (BASE_S + 200 * 60) * NS, (BASE_S + 700 * 60) * NS
    q = SummaryQuery("visits", start, end, analysis=AnalysisOptions(session_metrics=True,
                                                                    exclude_multi_variant_users=True))
    kept = [e for e in events if start <= e["timestamp"] <= end and e["user_id"] != "u0"]
    assert_compared_as_written(analysis.summary(q, store.summary(q)).analysis.comparisons, textbook_arms(kept))


def test_session_metrics_per_segment(store):
    events = visits()
    q = SegmentsQuery("visits", Dimension.DEVICE, analysis=AnalysisOptions(session_metrics=True))
    result = analysis.segments(q, store.segments(q))
    assert [name for name, _ in result.analyses] == ["desktop", "mobile"]
    for name, a in result.analyses:
        assert_compared_as_written(a.comparisons, textbook_arms([e for e in events if e["device"] == name]))


def test_session_metrics_are_refused_where_they_are_not_defined():
    with pytest.raises(InvalidArgument, match="session_metrics"):
        AnalysisOptions(guardrails={"events_per_session": 0.05}).check()
    AnalysisOptions(guardrails={"events_per_session": 0.05}, session_metrics=True).check()
    with pytest.raises(InvalidArgument, match="analysis.session_metrics"):
        TimeseriesQuery("visits", Interval.DAY, cumulative=True, lift=AnalysisOptions(session_metrics=True)).check()


def test_session_metrics_through_the_server(server, stub):
    ingest(stub, visits(), size=500)
    options = pb.AnalysisOptions(session_metrics=True, guardrail_margins={"conversions_per_session": 0.5})
    a = stub.Summary(pb.SummaryRequest(test_id="visits", analysis=options), timeout=30).analysis
    by_metric = {c.metric: c for c in a.comparisons}
    assert {pb.METRIC_CONVERSIONS_PER_SESSION, pb.METRIC_EVENTS_PER_SESSION} <= set(by_metric)
    arms = textbook_arms(visits())
    assert by_metric[pb.METRIC_EVENTS_PER_SESSION].control_mean == pytest.approx(
        arms["control"]["events_per_session"].mean, rel=1e-12)
    assert by_metric[pb.METRIC_CONVERSIONS_PER_SESSION].guardrail.non_inferior
    plain = stub.Summary(pb.SummaryRequest(test_id="visits"), timeout=30).analysis
    assert pb.METRIC_EVENTS_PER_SESSION not in {c.metric for c in plain.comparisons}
    # a test with no events: no rows (it was INTERNAL: the columns of no events lacked their types)
    empty = stub.Summary(pb.SummaryRequest(test_id="no_such_test", analysis=options), timeout=30)
    assert list(empty.rows) == []
    segments = stub.Segments(pb.SegmentsRequest(test_id="no_such_test", dimension=pb.DIMENSION_DEVICE,
                                                analysis=options), timeout=30)
    assert list(segments.rows) == []
    with pytest.raises(grpc.RpcError) as caught:
        stub.Summary(pb.SummaryRequest(test_id="visits", analysis=pb.AnalysisOptions(
            guardrail_margins={"events_per_session": 0.1})), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_metrics" in caught.value.details()


def test_session_metrics_hold_their_level_in_aa_simulations():
    """600 A/A experiments, 1,000 users per arm, users of different propensities (sessions,
    events per session, conversion per event all vary by user): the share of significant
    differences at 95% stays near 5% for both session metrics."""
    rng = np.random.default_rng(3)
    runs, significant = 600, {m: 0 for m in SESSION_METRICS}
    for _ in range(runs):
        n = 2000
        sessions = 1 + rng.poisson(1.5, n)
        per_session = [1 + rng.poisson(rng.gamma(2.0, 1.0), k) for k in sessions]
        p = rng.beta(1.0, 12.0, n)
        user = np.repeat(np.arange(n), [int(s.sum()) for s in per_session])
        session = np.concatenate([np.repeat(np.arange(len(s)), s) for s in per_session])
        conversion = (rng.random(len(user)) < p[user]).astype(np.uint8)
        group = (user % 2).astype(np.int64)
        totals = kernels.group_totals(group, user, conversion, np.zeros(len(user)), 2)
        moments = user_moments(group, user, conversion, np.zeros(len(user)), n, totals)
        cols = {"user_id": user, "conversion": conversion, "session_id": _strings(user, session)}
        moments = session_moments(moments, group, cols, n)
        a = analysis.analyze(["control", "treatment"], moments, np.arange(2), AnalysisOptions())
        for c in a.comparisons:
            if c.metric in significant:
                significant[c.metric] += c.result.absolute.p_value < 0.05
    rates = {m: k / runs for m, k in significant.items()}
    print("A/A false positives at 95%:", rates)
    assert all(0.025 <= r <= 0.08 for r in rates.values()), rates


def _strings(user: np.ndarray, session: np.ndarray):
    import pyarrow as pa

    return pa.array([f"{u}:{s}" for u, s in zip(user.tolist(), session.tolist())], pa.string())


def test_session_moments_count_each_users_distinct_ids_and_conversions_exactly():
    """The C kernel behind the session metrics: runs short (insertion sort) and long (qsort) of
    rows read through a permutation, ids that share a prefix or 16 bytes, empty ones and ones not
    ASCII, in three groups (one without users), against Python sets and sums and numpy's centered
    moments of them; bad bounds and groups, rows past the strings and strings past the data
    refused."""
    import pyarrow as pa
    from abstream.core.events import string_buffers
    from abstream.store import _kernels

    rng = np.random.default_rng(5)
    lengths = [1, 2, 16, 17, 300, 5, 1, 40]
    groups = np.array([0, 2, 0, 2, 0, 2, 2, 0], np.int64)  # group 1 has no users
    choices = ["a", "ab", "abc", "", "b", "ab\x00", "séance", "session_1", "session_10", "x" * 256,
               "0123456789abcdefA", "0123456789abcdefB", "0123456789abcdef"]
    ids = [choices[i] for i in rng.integers(0, len(choices), sum(lengths))]
    offsets, data = string_buffers(pa.array(["pad", *ids], pa.string()).slice(1))  # an array that starts past 0
    conversion = rng.integers(0, 2, len(ids)).astype(np.uint8)
    order = rng.permutation(len(ids)).astype(np.int64)
    bounds = np.cumsum([0, *lengths]).astype(np.int64)
    got = np.zeros((6, 3))
    _kernels.session_moments(offsets, data, conversion, order, bounds, groups, got)

    runs = [order[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    e = np.array(lengths, np.float64)
    s = np.array([len({ids[i] for i in rows.tolist()}) for rows in runs], np.float64)
    c = np.array([conversion[rows].sum() for rows in runs], np.float64)
    assert s[4] > 1 and s.max() < e.max() and c[4] > 0  # the long run: distinct ids, repeated ones, conversions
    users = np.bincount(groups, minlength=3)
    mean = {name: np.divide(np.bincount(groups, x, 3), users, out=np.zeros(3), where=users > 0)
            for name, x in (("e", e), ("s", s), ("c", c))}
    de, ds, dc = e - mean["e"][groups], s - mean["s"][groups], c - mean["c"][groups]
    expected = [np.bincount(groups, x, 3) for x in (e, s, de * de, ds * ds, dc * ds, de * ds)]
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-12, atol=0)
    assert got[:, 1].tolist() == [0.0] * 6

    two = np.array([0, 1], np.int64)
    for bad in ((offsets, order, [0, 5, 3], [0, 0]), (offsets, order, [0, 2, len(ids) + 1], [0, 0]),
                (offsets, order, [0, 2, 4], [0, 3]), (offsets, order, [0, 2, 4], [-1, 0]),
                (offsets, np.array([0, 1, 2, len(ids)], np.int64), [0, 2, 4], [0, 0]),
                (offsets, np.array([0, 1, 2, -1], np.int64), [0, 2, 4], [0, 0]),
                (np.array([0, 3, 1 << 30], np.int32), two, [0, 2], [0]),  # a string past the data
                (np.array([0, 3, 2], np.int32), two, [0, 2], [0]),  # a string that ends before it starts
                (np.array([0, -8, 3], np.int32), np.array([1, 0], np.int64), [0, 2], [0])):  # one before the data
        bad_offsets, bad_order, bad_bounds, bad_groups = bad
        with pytest.raises(ValueError):
            _kernels.session_moments(bad_offsets, data, conversion[:len(bad_offsets) - 1], bad_order,
                                     np.array(bad_bounds, np.int64), np.array(bad_groups, np.int64), np.zeros((6, 3)))
    for bad_conversion, bad_out in ((conversion[:-1], np.zeros((6, 3))), (conversion, np.zeros((5, 3)))):
        with pytest.raises(ValueError):
            _kernels.session_moments(offsets, data, bad_conversion, order, bounds, groups, bad_out)
