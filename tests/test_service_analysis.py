"""Statistics end to end: the server's comparisons equal the pure functions on the same users."""

from __future__ import annotations

import random
import statistics

import grpc
import pytest

from abstream.stats import Arm, adjust_p_values, binomial_arm, compare, srm_p_value
from abstream.v1 import analytics_pb2 as pb
from tests.events import BASE_S, NS, ingest
from tests.test_service_queries import bad_request

METRIC_OF = {pb.METRIC_CONVERSION: "conversion", pb.METRIC_REVENUE_PER_USER: "revenue",
             pb.METRIC_CONVERSIONS_PER_USER: "conversions"}


def experiment(seed: int = 1, test_id: str = "exp") -> list[dict]:
    """Users in control, faster and slower arms; the faster arm converts more and spends more."""
    rng = random.Random(seed)
    events = []
    effect = {"control": (0.10, 30.0), "faster": (0.16, 36.0), "slower": (0.09, 29.0)}
    for u in range(3000):
        variant = ["control", "faster", "slower"][u % 3]
        p, spend = effect[variant]
        for k in range(rng.randint(1, 4)):
            converted = rng.random() < p
            events.append(dict(timestamp=(BASE_S + u * 10 + k) * NS, user_id=f"u{u}", test_id=test_id,
                               variant=variant, event_type="view", conversion=int(converted),
                               revenue=round(rng.expovariate(1 / spend), 2) if converted else 0.0,
                               session_id="", device=["mobile", "desktop"][u % 2], country="US"))
    return events


def arms_from_events(events: list[dict]) -> dict[str, dict[str, Arm]]:
    """Per variant and metric, an arm computed the plain way: per-user totals, then two passes."""
    per_user: dict[str, dict[str, list[float]]] = {}
    for e in events:
        totals = per_user.setdefault(e["variant"], {}).setdefault(e["user_id"], [0, 0.0])
        totals[0] += e["conversion"]
        totals[1] += e["revenue"]
    out = {}
    for variant, users in per_user.items():
        conversions = [t[0] for t in users.values()]
        revenue = [t[1] for t in users.values()]
        out[variant] = {
            "conversion": binomial_arm(len(users), sum(1 for c in conversions if c > 0)),
            "revenue": Arm(len(users), statistics.fmean(revenue), statistics.variance(revenue)),
            "conversions": Arm(len(users), statistics.fmean(conversions), statistics.variance(conversions)),
        }
    return out


def assert_matches(got: pb.MetricComparison, want, adjusted_abs=None, adjusted_rel=None) -> None:
    for mine, theirs in ((got.absolute, want.absolute), (got.relative, want.relative)):
        assert mine.estimate == pytest.approx(theirs.estimate, rel=1e-9, abs=1e-12)
        assert mine.standard_error == pytest.approx(theirs.se, rel=1e-9)
        assert mine.ci_low == pytest.approx(theirs.ci_low, rel=1e-9, abs=1e-12)
        assert mine.ci_high == pytest.approx(theirs.ci_high, rel=1e-9, abs=1e-12)
        assert mine.p_value == pytest.approx(theirs.p_value, rel=1e-7, abs=1e-15)
        assert mine.status == pb.COMPARISON_STATUS_OK
    assert got.degrees_of_freedom == pytest.approx(want.dof, rel=1e-9)
    assert got.chance_to_win == pytest.approx(want.chance_to_win, rel=1e-9, abs=1e-12)
    assert got.risk_control == pytest.approx(want.risk_control, rel=1e-7, abs=1e-12)
    assert got.risk_treatment == pytest.approx(want.risk_treatment, rel=1e-7, abs=1e-12)
    if adjusted_abs is not None:
        assert got.absolute.adjusted_p_value == pytest.approx(adjusted_abs, rel=1e-7, abs=1e-15)
        assert got.relative.adjusted_p_value == pytest.approx(adjusted_rel, rel=1e-7, abs=1e-15)


@pytest.fixture
def loaded(stub):
    events = experiment()
    ingest(stub, events, size=500)
    return stub, events


def test_summary_shows_what_the_pure_functions_give(loaded):
    stub, events = loaded
    arms = arms_from_events(events)
    response = stub.Summary(pb.SummaryRequest(test_id="exp"), timeout=30)
    a = response.analysis
    assert a.control_variant == "control"
    assert a.srm_p_value == pytest.approx(srm_p_value([arms[v]["revenue"].n for v in ("control", "faster", "slower")]))
    assert not a.sample_ratio_mismatch
    assert [(c.variant, c.metric) for c in a.comparisons] == [
        (v, m) for v in ("faster", "slower") for m in (pb.METRIC_CONVERSION, pb.METRIC_REVENUE_PER_USER,
                                                        pb.METRIC_CONVERSIONS_PER_USER)]
    for c in a.comparisons:
        metric = METRIC_OF[c.metric]
        want = compare(arms["control"][metric], arms[c.variant][metric])
        assert c.control_mean == pytest.approx(arms["control"][metric].mean, rel=1e-12)
        assert_matches(c, want, want.absolute.p_value, want.relative.p_value)
    revenue = next(c for c in a.comparisons if c.variant == "faster" and c.metric == pb.METRIC_REVENUE_PER_USER)
    assert revenue.absolute.estimate > 0 and revenue.absolute.p_value < 0.05 and revenue.chance_to_win > 0.95


def test_requested_options_are_applied(loaded):
    stub, events = loaded
    arms = arms_from_events(events)
    options = pb.AnalysisOptions(control_variant="slower", confidence_level=0.9, sequential=True,
                                 sequential_tuning=2000, prior_mean=0.0, prior_variance=0.05,
                                 expected_weights={"control": 1, "faster": 1, "slower": 2},
                                 srm_threshold=0.01, correction=pb.CORRECTION_HOLM)
    a = stub.Summary(pb.SummaryRequest(test_id="exp", analysis=options), timeout=30).analysis
    assert a.control_variant == "slower"
    users = [arms[v]["revenue"].n for v in ("control", "faster", "slower")]
    assert a.srm_p_value == pytest.approx(srm_p_value(users, [1, 1, 2])) and a.sample_ratio_mismatch
    for metric_id, metric in METRIC_OF.items():
        got = [c for c in a.comparisons if c.metric == metric_id]
        want = [compare(arms["slower"][metric], arms[c.variant][metric], confidence=0.9, sequential=True,
                        n_star=2000, prior_mean=0.0, prior_variance=0.05) for c in got]
        adjusted_abs = adjust_p_values([w.absolute.p_value for w in want], "holm")
        adjusted_rel = adjust_p_values([w.relative.p_value for w in want], "holm")
        for c, w, aa, ar in zip(got, want, adjusted_abs, adjusted_rel):
            assert_matches(c, w, aa, ar)
            assert c.posterior_mean == pytest.approx(w.posterior_mean, rel=1e-9, abs=1e-12)


def test_segments_compare_variants_within_each_segment(loaded):
    stub, events = loaded
    response = stub.Segments(pb.SegmentsRequest(test_id="exp", dimension=pb.DIMENSION_DEVICE), timeout=30)
    assert [s.segment for s in response.analyses] == ["desktop", "mobile"]
    for s in response.analyses:
        arms = arms_from_events([e for e in events if e["device"] == s.segment])
        for c in s.analysis.comparisons:
            metric = METRIC_OF[c.metric]
            assert_matches(c, compare(arms["control"][metric], arms[c.variant][metric]))


def test_tiny_and_degenerate_arms_report_a_status_not_nan(stub):
    events = [dict(timestamp=BASE_S * NS, user_id=u, test_id="tiny", variant=v, event_type="", conversion=0,
                   revenue=0.0, session_id="", device="", country="")
              for u, v in [("a", "control"), ("b", "B"), ("c", "B")]]
    ingest(stub, events)
    a = stub.Summary(pb.SummaryRequest(test_id="tiny"), timeout=10).analysis
    assert {c.status for c in a.comparisons} == {pb.COMPARISON_STATUS_NOT_ENOUGH_DATA}
    rows = stub.Summary(pb.SummaryRequest(test_id="tiny"), timeout=10).rows
    assert [r.metrics.users for r in rows] == [2, 1]  # the counts are still there


@pytest.mark.parametrize("options,field", [
    (pb.AnalysisOptions(confidence_level=1.5), "confidence_level"),
    (pb.AnalysisOptions(prior_mean=0.1), "prior"),
    (pb.AnalysisOptions(prior_mean=0.1, prior_variance=-1), "prior"),
    (pb.AnalysisOptions(expected_weights={"control": 1}), "expected_weights"),
    (pb.AnalysisOptions(expected_weights={"control": 0, "faster": 1, "slower": 1}), "expected_weights"),
    (pb.AnalysisOptions(srm_threshold=2), "srm_threshold"),
    (pb.AnalysisOptions(control_variant="nope"), "control_variant"),
    (pb.AnalysisOptions(correction=17), "analysis.correction"),
    (pb.AnalysisOptions(sequential_tuning=-5), "sequential_tuning"),
])
def test_bad_options_are_invalid_argument(loaded, options, field):
    stub, _ = loaded
    with pytest.raises(grpc.RpcError) as caught:
        stub.Summary(pb.SummaryRequest(test_id="exp", analysis=options), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(caught.value).field_violations] == [field]
