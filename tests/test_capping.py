"""Capping (winsorization) of revenue per user, end to end on both engines: the threshold is the
pooled users' percentile as written here from its definition (the inverted CDF, exact
arithmetic), and the comparison is the textbook Welch test on the capped per-user values."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import grpc
import numpy as np
import pytest
from abstream.stats import Arm, compare
from abstream.v1 import analytics_pb2 as pb
from scipy import stats as scipy_stats

from tests.events import BASE_S, NS, ingest
from tests.test_service_queries import bad_request


@pytest.fixture
def server(any_engine_server):
    return any_engine_server


def shop(seed: int = 5, test_id: str = "cap", paying: float = 0.3) -> list[dict]:
    """Two arms; a share of users pays, log-normal amounts (a heavy tail), a few refunds."""
    rng = random.Random(seed)
    events = []
    for u in range(2000):
        variant = ["control", "treatment"][u % 2]
        for k in range(rng.randint(1, 3)):
            pays = rng.random() < paying
            revenue = round(rng.lognormvariate(3.0, 1.5), 2) if pays else 0.0
            if pays and rng.random() < 0.03:
                revenue = -revenue  # a refund
            events.append(dict(timestamp=(BASE_S + u * 10 + k) * NS, user_id=f"u{u}", test_id=test_id,
                               variant=variant, event_type="purchase" if pays else "view", conversion=int(pays),
                               revenue=revenue, session_id="", device="mobile", country="US"))
    return events


def per_user(events: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for e in events:
        users = out.setdefault(e["variant"], {})
        users[e["user_id"]] = users.get(e["user_id"], 0.0) + e["revenue"]
    return out


def threshold_of(values: list[float], percentile: float) -> float:
    """The smallest value at or above which `percentile`% of the values lie."""
    rank = max(math.ceil(Fraction(repr(percentile)) * len(values) / 100), 1)
    return sorted(values)[rank - 1]


def summary(stub, test_id: str, **cap) -> pb.SummaryResponse:
    return stub.Summary(pb.SummaryRequest(test_id=test_id, analysis=pb.AnalysisOptions(
        revenue_cap=pb.RevenueCap(**cap))))


def revenue_comparison(response: pb.SummaryResponse) -> pb.MetricComparison:
    return next(c for c in response.analysis.comparisons if c.metric == pb.METRIC_REVENUE_PER_USER)


@pytest.mark.parametrize("cap", [{"percentile": 99}, {"percentile": 90, "nonzero_only": True}, {"value": 150.0},
                                 {"percentile": 97.5}])
def test_revenue_per_user_is_compared_capped_at_the_pooled_threshold(stub, cap):
    events = shop()
    ingest(stub, events, size=1000)
    users = per_user(events)
    pooled = [r for arm in users.values() for r in arm.values() if r != 0 or not cap.get("nonzero_only")]
    threshold = cap["value"] if "value" in cap else threshold_of(pooled, cap["percentile"])
    capped = {v: np.minimum(np.array(list(arm.values())), threshold) for v, arm in users.items()}

    response = summary(stub, "cap", **cap)
    applied = response.analysis.revenue_cap
    assert applied.threshold == threshold and applied.pooled_users == len(pooled)
    assert applied.capped_users == sum(int((np.array(list(arm.values())) > threshold).sum()) for arm in users.values())
    assert applied.cap == pb.RevenueCap(**cap)
    got = revenue_comparison(response)
    c, t = capped["control"], capped["treatment"]
    assert got.control_mean == pytest.approx(c.mean(), rel=1e-12)
    assert got.treatment_mean == pytest.approx(t.mean(), rel=1e-12)
    assert got.absolute.estimate == pytest.approx(t.mean() - c.mean(), rel=1e-9)
    welch = scipy_stats.ttest_ind(t, c, equal_var=False)
    assert got.absolute.p_value == pytest.approx(welch.pvalue, rel=1e-6)
    assert got.absolute.standard_error == pytest.approx(math.sqrt(t.var(ddof=1) / len(t) + c.var(ddof=1) / len(c)),
                                                        rel=1e-9)
    want = compare(Arm(len(c), c.mean(), c.var(ddof=1)), Arm(len(t), t.mean(), t.var(ddof=1)))
    assert got.relative.estimate == pytest.approx(want.relative.estimate, rel=1e-9)
    assert got.relative.standard_error == pytest.approx(want.relative.se, rel=1e-9)
    # The per-variant rows keep the revenue as it is; only the comparison is capped.
    rows = {r.variant: r.metrics for r in response.rows}
    assert rows["control"].total_revenue == pytest.approx(sum(users["control"].values()), rel=1e-12)
    uncapped = revenue_comparison(stub.Summary(pb.SummaryRequest(test_id="cap")))
    assert not stub.Summary(pb.SummaryRequest(test_id="cap")).analysis.HasField("revenue_cap")
    assert uncapped.control_mean == pytest.approx(sum(users["control"].values()) / len(users["control"]), rel=1e-12)
    assert uncapped.control_mean > got.control_mean


def test_mostly_zero_revenue_is_capped_above_zero_when_non_zero_only(stub):
    events = shop(seed=9, test_id="sparse", paying=0.025)  # ~95% of users never pay
    ingest(stub, events, size=1000)
    users = per_user(events)
    everyone = [r for arm in users.values() for r in arm.values()]
    assert sum(r == 0 for r in everyone) / len(everyone) > 0.9
    assert summary(stub, "sparse", percentile=90).analysis.revenue_cap.threshold == 0.0
    applied = summary(stub, "sparse", percentile=90, nonzero_only=True).analysis.revenue_cap
    paying = [r for r in everyone if r != 0]
    assert applied.threshold == threshold_of(paying, 90) > 0
    assert applied.pooled_users == len(paying)


def test_capping_follows_the_analysis_other_options(stub):
    events = shop(seed=3, test_id="both")
    events += [dict(e, variant="treatment", timestamp=e["timestamp"] + NS) for e in events
               if e["user_id"] in ("u0", "u2") and e["variant"] == "control"]  # two users in both arms
    ingest(stub, events, size=1000)
    response = stub.Summary(pb.SummaryRequest(test_id="both", analysis=pb.AnalysisOptions(
        revenue_cap=pb.RevenueCap(percentile=95), exclude_multi_variant_users=True, metric_event_type="purchase")))
    kept = [e for e in events if e["user_id"] not in ("u0", "u2")]
    users = per_user([dict(e, revenue=e["revenue"] if e["event_type"] == "purchase" else 0.0) for e in kept])
    pooled = [r for arm in users.values() for r in arm.values()]
    assert response.analysis.revenue_cap.threshold == threshold_of(pooled, 95)
    assert response.analysis.revenue_cap.pooled_users == len(pooled)


def test_segments_and_bad_caps_are_refused(stub):
    ingest(stub, shop(seed=1, test_id="bad"), size=1000)
    for cap, field in (({"percentile": 99, "value": 10}, "revenue_cap"), ({}, "revenue_cap"),
                       ({"percentile": 100}, "revenue_cap.percentile"), ({"value": -1}, "revenue_cap.value"),
                       ({"value": 10, "nonzero_only": True}, "revenue_cap.nonzero_only")):
        with pytest.raises(grpc.RpcError) as error:
            summary(stub, "bad", **cap)
        assert [v.field for v in bad_request(error.value).field_violations] == [field], cap
    with pytest.raises(grpc.RpcError) as error:
        stub.Segments(pb.SegmentsRequest(test_id="bad", dimension=pb.DIMENSION_DEVICE, analysis=pb.AnalysisOptions(
            revenue_cap=pb.RevenueCap(percentile=99))))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(error.value).field_violations] == ["revenue_cap"]
