"""Statistics end to end: the server's comparisons equal the pure functions on the same users."""

from __future__ import annotations

import random
import statistics
import sys

import grpc
import pytest
from abstream.stats import Arm, adjust_p_values, binomial_arm, compare, srm_p_value
from abstream.v1 import analytics_pb2 as pb

from tests.events import BASE_S, NS, ingest
from tests.test_service_queries import bad_request


@pytest.fixture
def server(any_engine_server):
    """Every test here runs on both engines."""
    return any_engine_server

METRIC_OF = {pb.METRIC_CONVERSION: "conversion", pb.METRIC_REVENUE_PER_USER: "revenue",
             pb.METRIC_CONVERSIONS_PER_USER: "conversions", pb.METRIC_REVENUE_PER_CONVERSION: "aov"}


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
        n = len(users)
        mx, my = statistics.fmean(revenue), statistics.fmean(conversions)
        vx, vy, cxy = statistics.variance(revenue), statistics.variance(conversions), statistics.covariance(
            revenue, conversions)
        out[variant] = {
            "conversion": binomial_arm(n, sum(1 for c in conversions if c > 0)),
            "revenue": Arm(n, mx, vx),
            "conversions": Arm(n, my, vy),
            # revenue per conversion: sum r / sum c, its delta-method variance times n (the textbook form)
            "aov": Arm(n, sum(revenue) / sum(conversions), vx / my**2 - 2 * mx * cxy / my**3 + mx**2 * vy / my**4),
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
                                                        pb.METRIC_CONVERSIONS_PER_USER,
                                                        pb.METRIC_REVENUE_PER_CONVERSION)]
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


def test_a_planned_variant_nobody_reached_is_a_sample_ratio_mismatch(loaded):
    """Weights naming a variant with no users at all (its assignment or its logging broke) count
    it with 0 users: the worst mismatch there is, not a perfect split of the others."""
    stub, events = loaded
    arms = arms_from_events(events)
    users = [arms[v]["revenue"].n for v in ("control", "faster", "slower")]
    options = pb.AnalysisOptions(expected_weights={"control": 1, "faster": 1, "slower": 1, "lost": 1})
    a = stub.Summary(pb.SummaryRequest(test_id="exp", analysis=options), timeout=30).analysis
    assert a.srm_p_value == pytest.approx(srm_p_value([*users, 0], [1, 1, 1, 1]), rel=1e-9, abs=1e-300)
    assert a.srm_p_value < 1e-100 and a.sample_ratio_mismatch
    assert {c.variant for c in a.comparisons} == {"faster", "slower"}


@pytest.mark.parametrize("sequential", [False, True])
def test_guardrails_are_tested_for_non_inferiority_as_the_pure_function_does(loaded, sequential):
    """Guardrail metrics get a one-sided non-inferiority verdict per treatment, the others none;
    what the server says is the pure function's on the same arms (both engines); a bad metric
    or margin is INVALID_ARGUMENT naming the field."""
    from abstream.stats import non_inferiority

    stub, events = loaded
    arms = arms_from_events(events)
    options = pb.AnalysisOptions(guardrail_margins={"revenue_per_user": 0.05, "conversion": 0.5},
                                 sequential=sequential)
    a = stub.Summary(pb.SummaryRequest(test_id="exp", analysis=options), timeout=30).analysis
    verdicts = {}
    for c in a.comparisons:
        metric = METRIC_OF[c.metric]
        if c.metric in (pb.METRIC_CONVERSIONS_PER_USER, pb.METRIC_REVENUE_PER_CONVERSION):
            assert not c.HasField("guardrail")
            continue
        r = compare(arms["control"][metric], arms[c.variant][metric], sequential=sequential)
        want = non_inferiority(r.relative, options.guardrail_margins[
            "revenue_per_user" if metric == "revenue" else "conversion"], r.dof, sequential=sequential,
            n=arms["control"][metric].n + arms[c.variant][metric].n)
        g = c.guardrail
        assert (g.margin, g.non_inferior, g.status) == (want.margin, want.non_inferior, pb.COMPARISON_STATUS_OK)
        assert g.p_value == pytest.approx(want.p_value, rel=1e-9, abs=1e-15)
        assert g.lower_bound == pytest.approx(want.lower_bound, rel=1e-9, abs=1e-12)
        assert g.non_inferior == (g.p_value < 0.05) == (g.lower_bound > -g.margin)
        verdicts[(c.variant, metric)] = g.non_inferior
    assert verdicts[("faster", "revenue")] and verdicts[("faster", "conversion")]  # faster is better: non-inferior
    for bad, field in (({"sessions": 0.1}, "guardrails"), ({"conversion": 0.0}, "guardrails"),
                       ({"conversion": 2.0}, "guardrails")):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Summary(pb.SummaryRequest(test_id="exp", analysis=pb.AnalysisOptions(guardrail_margins=bad)),
                         timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(raised.value).field_violations[0].field == field


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
    (pb.AnalysisOptions(confidence_level=0.4, sequential=True, guardrail_margins={"conversion": 0.05}),
     "confidence_level"),  # its bound's 2 (1 - confidence) past 1 once raised a math domain error
    (pb.AnalysisOptions(prior_mean=0.1), "prior"),
    (pb.AnalysisOptions(prior_mean=0.1, prior_variance=-1), "prior"),
    (pb.AnalysisOptions(expected_weights={"control": 1}), "expected_weights"),
    (pb.AnalysisOptions(expected_weights={"control": 0, "faster": 1, "slower": 1}), "expected_weights"),
    (pb.AnalysisOptions(srm_threshold=2), "srm_threshold"),
    (pb.AnalysisOptions(control_variant="nope"), "control_variant"),
    (pb.AnalysisOptions(correction=17), "analysis.correction"),
    (pb.AnalysisOptions(sequential_tuning=-5), "sequential_tuning"),
    (pb.AnalysisOptions(sequential=True, sequential_tuning=float("inf")), "sequential_tuning"),
    (pb.AnalysisOptions(sequential=True, sequential_tuning=0.5), "sequential_tuning"),
    (pb.AnalysisOptions(prior_mean=0.0, prior_variance=1e-320), "prior"),
])
def test_bad_options_are_invalid_argument(loaded, options, field):
    stub, _ = loaded
    with pytest.raises(grpc.RpcError) as caught:
        stub.Summary(pb.SummaryRequest(test_id="exp", analysis=options), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(caught.value).field_violations] == [field]


# ---- no certainty from no variance -----------------------------------------------------------

def arm_events(test_id: str, variant: str, users: int, revenue: float, conversion: int, device: str = "") -> list[dict]:
    return [dict(timestamp=(BASE_S + u) * NS, user_id=f"{variant}-{u}", test_id=test_id, variant=variant,
                 event_type="", conversion=conversion, revenue=revenue, session_id="", device=device, country="")
            for u in range(users)]


def comparisons(stub, test_id: str, **options) -> dict[tuple[str, int], pb.MetricComparison]:
    a = stub.Summary(pb.SummaryRequest(test_id=test_id, analysis=pb.AnalysisOptions(**options)), timeout=10).analysis
    return {(c.variant, c.metric): c for c in a.comparisons}


def assert_not_computed(lift: pb.Lift, status: int, words: str) -> None:
    assert lift.status == status and words in lift.status_message
    assert (lift.estimate, lift.standard_error, lift.ci_low, lift.ci_high) == (0, 0, 0, 0)
    assert lift.p_value == 1 and lift.adjusted_p_value == 1


OPTIONS = [{}, {"sequential": True}, {"prior_mean": 0.0, "prior_variance": 0.1}, {"correction": pb.CORRECTION_HOLM}]


@pytest.mark.parametrize("options", OPTIONS)
def test_two_arms_without_spread_claim_nothing(stub, options):
    """Every control user has revenue 10, every treatment user 12: the lift is plain, its
    uncertainty unmeasurable; before, this was 'lift 2, CI [2, 2], p 0'."""
    ingest(stub, arm_events("flat", "control", 50, 10.0, 1) + arm_events("flat", "B", 50, 12.0, 1))
    c = comparisons(stub, "flat", **options)[("B", pb.METRIC_REVENUE_PER_USER)]
    assert (c.control_mean, c.treatment_mean) == (10, 12)
    for lift in (c.absolute, c.relative):
        assert_not_computed(lift, pb.COMPARISON_STATUS_ZERO_VARIANCE, "neither arm varies")
    assert c.status == pb.COMPARISON_STATUS_ZERO_VARIANCE and "every control user has 10" in c.status_message
    assert (c.chance_to_win, c.risk_control, c.risk_treatment, c.posterior_mean) == (0.5, 0, 0, 0)


@pytest.mark.parametrize("options", OPTIONS)
def test_a_treatment_that_never_converts_has_an_absolute_lift_and_no_relative_one(stub, options):
    """80 users per arm; the control converts, the treatment never does. The relative lift's
    delta-method se is 0 only because the treatment's mean and variance are; before, it was
    reported as -1 with CI [-1, -1], p 0 and the text 'neither arm varies', which was false."""
    control = arm_events("never", "control", 80, 0.0, 0)
    for e in control[::4]:
        e["conversion"] = 1
    ingest(stub, control + arm_events("never", "B", 80, 0.0, 0))
    c = comparisons(stub, "never", **options)[("B", pb.METRIC_CONVERSION)]
    assert c.absolute.status == pb.COMPARISON_STATUS_OK and c.absolute.estimate == pytest.approx(-0.25)
    assert c.absolute.ci_low < -0.25 < c.absolute.ci_high and 0 < c.absolute.p_value < 1
    assert_not_computed(c.relative, pb.COMPARISON_STATUS_ZERO_TREATMENT, "every treatment user has 0")
    assert c.status == pb.COMPARISON_STATUS_ZERO_TREATMENT and "neither arm varies" not in c.status_message
    assert (c.chance_to_win, c.risk_control, c.risk_treatment) == (0.5, 0, 0)


def test_a_control_that_never_converts_has_no_relative_lift(stub):
    treatment = arm_events("zeroc", "B", 80, 0.0, 0)
    for e in treatment[::4]:
        e["conversion"] = 1
    ingest(stub, arm_events("zeroc", "control", 80, 0.0, 0) + treatment)
    c = comparisons(stub, "zeroc")[("B", pb.METRIC_CONVERSION)]
    assert c.absolute.status == pb.COMPARISON_STATUS_OK and c.absolute.estimate == pytest.approx(0.25)
    assert_not_computed(c.relative, pb.COMPARISON_STATUS_ZERO_CONTROL_MEAN, "control's mean is 0")


def test_a_one_user_arm_says_which_arm(stub):
    ingest(stub, arm_events("one", "control", 5, 1.0, 0) + arm_events("one", "B", 1, 2.0, 0))
    c = comparisons(stub, "one")[("B", pb.METRIC_REVENUE_PER_USER)]
    assert_not_computed(c.absolute, pb.COMPARISON_STATUS_NOT_ENOUGH_DATA, "the treatment has 1 user")


def test_segments_report_degenerate_lifts_the_same_way(stub):
    ingest(stub, arm_events("segflat", "control", 40, 10.0, 1, "mobile") + arm_events("segflat", "B", 40, 12.0, 1, "mobile"))
    response = stub.Segments(pb.SegmentsRequest(test_id="segflat", dimension=pb.DIMENSION_DEVICE), timeout=10)
    (segment,) = response.analyses
    c = next(c for c in segment.analysis.comparisons if c.metric == pb.METRIC_REVENUE_PER_USER)
    assert_not_computed(c.absolute, pb.COMPARISON_STATUS_ZERO_VARIANCE, "neither arm varies")


def test_a_segment_without_the_control_compares_nothing_and_says_so(stub):
    """control, t1 and t2; the tablet segment has no control users. Before, it silently took t1
    as its control and compared t2 against it."""
    rng = random.Random(3)
    events = []
    for variant in ("control", "t1", "t2"):
        for device in ("desktop", "tablet"):
            if (variant, device) == ("control", "tablet"):
                continue
            arm = arm_events("seg", variant, 30, 0.0, 0, device)
            for e in arm:
                e["user_id"] += device
                e["revenue"] = round(rng.uniform(0, 10), 2)
            events += arm
    ingest(stub, events)
    response = stub.Segments(pb.SegmentsRequest(test_id="seg", dimension=pb.DIMENSION_DEVICE), timeout=10)
    by_segment = {s.segment: s.analysis for s in response.analyses}
    assert by_segment["desktop"].control_variant == by_segment["tablet"].control_variant == "control"
    desktop = by_segment["desktop"].comparisons
    assert {c.variant for c in desktop} == {"t1", "t2"} and all(c.status == pb.COMPARISON_STATUS_OK
                                                               for c in desktop if c.metric == pb.METRIC_REVENUE_PER_USER)
    tablet = by_segment["tablet"].comparisons
    assert {c.variant for c in tablet} == {"t1", "t2"} and len(tablet) == 2 * 4  # 4 metrics each
    for c in tablet:
        assert c.status == pb.COMPARISON_STATUS_NO_CONTROL and "'control' has no users here" in c.status_message
        assert_not_computed(c.absolute, pb.COMPARISON_STATUS_NO_CONTROL, "nothing is compared")
        assert c.control_mean == 0
    # a control asked for by name is the control in every segment too
    named = stub.Segments(pb.SegmentsRequest(test_id="seg", dimension=pb.DIMENSION_DEVICE,
                                             analysis=pb.AnalysisOptions(control_variant="t1")), timeout=10)
    assert {s.analysis.control_variant for s in named.analyses} == {"t1"}
    assert all(c.variant != "t1" and c.status != pb.COMPARISON_STATUS_NO_CONTROL
               for s in named.analyses for c in s.analysis.comparisons)


def test_health_counts_and_grades_what_went_wrong(stub, server):
    """Every Summary carries the experiment's health: users in two variants, events before the
    plan's start and from the future counted exactly (on both engines), each graded, the worst
    first; leaving the multi-variant users out takes them out of the per-variant rows."""
    import datetime as dt
    import time

    from abstream.clients import Client

    now_s = int(time.time())
    start_s = BASE_S + 10 * 86400
    events = []
    for u in range(1000):  # an even split after the start
        variant = ["control", "treatment"][u % 2]
        events.append(dict(timestamp=(start_s + 3600 + u) * NS, user_id=f"u{u}", test_id="sick", variant=variant,
                           event_type="view", conversion=int(u % 7 == 0), revenue=0.0, session_id="", device="mobile",
                           country="US"))
        if u < 30:  # 3% of users also logged in the other variant: unhealthy
            events.append(dict(events[-1], variant=["treatment", "control"][u % 2], timestamp=(start_s + 7200 + u) * NS))
    for k in range(50):  # before the start
        events.append(dict(events[k * 2], timestamp=(start_s - 86400 + k) * NS))
    for k in range(3):  # an hour ahead of the server's clock
        events.append(dict(events[k * 2], timestamp=(now_s + 3600) * NS))
    ingest(stub, events)
    with Client(server.address) as client:
        client.create_experiment("sick", control="control", split={"control": 50, "treatment": 50},
                                 start=dt.datetime.fromtimestamp(start_s, dt.timezone.utc))
        h = client.summary("sick").health
        assert (h.status, h.users, h.multi_variant_users, h.events_before_start, h.future_events) == (
            "unhealthy", 1000, 30, 50, 3)
        assert not h.multi_variant_users_excluded and h.srm == "healthy"
        assert h.reasons[0].startswith("30 users (3.00%) were seen in more than one variant")
        assert "50 events are before the experiment's start" in h.reasons[1]
        assert h.reasons[2].startswith("3 events are timestamped more than 5 minutes in the future")
        kept = client.summary("sick", exclude_multi_variant_users=True)
        assert kept.health.status == "warning" and kept.health.multi_variant_users_excluded
        assert sum(r.metrics.users for r in kept.rows) == 1000 - 30
        assert sum(r.metrics.events for r in kept.rows) == sum(
            1 for e in events if e["timestamp"] >= start_s * NS and int(e["user_id"][1:]) >= 30)

        # a split of 1000 against 880: a warning band or worse, as the pure function grades it
        skewed = [dict(timestamp=(BASE_S + u) * NS, user_id=f"s{u}", test_id="skewed",
                       variant="control" if u < 1000 else "treatment", event_type="view", conversion=0, revenue=0.0,
                       session_id="", device="mobile", country="US") for u in range(1880)]
        ingest(stub, skewed)
        p = srm_p_value([1000, 880])
        h = client.summary("skewed").health
        assert h.srm_p_value == pytest.approx(p)
        assert h.srm == ("unhealthy" if p < 0.001 else "warning" if p < 0.01 else "healthy") != "healthy"
        assert h.status == h.srm and "sample ratio" in h.reasons[0]

        clean = [dict(e, test_id="clean") for e in skewed[:1000]] + [
            dict(e, test_id="clean", variant="treatment") for e in skewed[1000:1880]] + [
            dict(skewed[0], user_id=f"c{u}", test_id="clean", variant="treatment") for u in range(120)]
        ingest(stub, clean)
        h = client.summary("clean").health
        assert (h.status, h.reasons, h.users, h.srm_p_value) == ("healthy", [], 2000, pytest.approx(1.0))
