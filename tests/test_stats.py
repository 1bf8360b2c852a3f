"""The statistics on their own: known-good vectors, and simulations with known truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from abstream.stats import Arm, adjust_p_values, arm_from_sums, binomial_arm, compare, srm_p_value
from abstream.stats.core import (
    NOT_ENOUGH_DATA,
    NOT_FINITE,
    OK,
    ZERO_CONTROL_MEAN,
    ZERO_TREATMENT,
    ZERO_VARIANCE,
)

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "shared" / "stats" / "vectors.json").read_text()) \
    if (Path(__file__).resolve().parents[2] / "shared" / "stats" / "vectors.json").exists() else None
TOL = 1e-6


def arm(d: dict):
    return arm_from_sums(d["n"], d["sum"], d["sum_squares"])


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOL, abs_tol=TOL)


needs_vectors = pytest.mark.skipif(VECTORS is None, reason="shared/stats/vectors.json is not beside the repository")


@needs_vectors
@pytest.mark.parametrize("case", VECTORS["welch_mean"] if VECTORS else [])
def test_welch_mean_vectors(case):
    c = compare(arm(case["a"]), arm(case["b"]))
    for name, got in (("relative", c.relative), ("absolute", c.absolute)):
        want = case[name]
        assert close(got.estimate, want["estimate"]) and close(got.se, want["se"])
        assert close(got.p_value, want["p_value"])
        assert close(got.ci_low, want["ci"][0]) and close(got.ci_high, want["ci"][1])
    assert close(c.dof, case["relative"]["dof"])


@needs_vectors
@pytest.mark.parametrize("case", VECTORS["welch_binomial"] if VECTORS else [])
def test_binomial_vectors(case):
    c = compare(binomial_arm(case["a"]["n"], case["a"]["conversions"]),
                binomial_arm(case["b"]["n"], case["b"]["conversions"]))
    want = case["relative"]
    assert close(c.relative.estimate, want["estimate"]) and close(c.relative.se, want["se"])
    assert close(c.relative.p_value, want["p_value"])
    assert close(c.relative.ci_low, want["ci"][0]) and close(c.relative.ci_high, want["ci"][1])


@needs_vectors
@pytest.mark.parametrize("case", VECTORS["sequential"] if VECTORS else [])
def test_sequential_vectors(case):
    c = compare(arm(case["a"]), arm(case["b"]), sequential=True, n_star=case["n_star"])
    want = case["relative"]
    assert close(c.relative.estimate, want["estimate"]) and close(c.relative.se, want["se"])
    assert close(c.relative.ci_low, want["ci"][0]) and close(c.relative.ci_high, want["ci"][1])


@needs_vectors
@pytest.mark.parametrize("case", VECTORS["bayesian"] if VECTORS else [])
def test_bayesian_vectors(case):
    prior = case.get("prior", {})
    c = compare(arm(case["a"]), arm(case["b"]), prior_mean=prior.get("mean"), prior_variance=prior.get("variance"))
    want = case["relative"]
    assert close(c.chance_to_win, want["chance_to_win"])
    if "risk" in want:
        assert close(c.relative.estimate, want["estimate"])
        assert close(c.risk_control, want["risk"][0]) and close(c.risk_treatment, want["risk"][1])
    if "posterior_mean" in want:
        assert close(c.posterior_mean, want["posterior_mean"])


@needs_vectors
@pytest.mark.parametrize("case", VECTORS["srm"] if VECTORS else [])
def test_srm_vectors(case):
    assert close(srm_p_value(case["users"], case["weights"]), case["p_value"])


def test_degenerate_arms_get_a_status_and_no_nan():
    cases = {
        NOT_ENOUGH_DATA: (arm_from_sums(1, 5.0, 25.0), arm_from_sums(10, 50.0, 300.0)),
        ZERO_VARIANCE: (arm_from_sums(10, 50.0, 250.0), arm_from_sums(10, 50.0, 250.0)),
        ZERO_CONTROL_MEAN: (arm_from_sums(10, 0.0, 0.0), arm_from_sums(10, 5.0, 20.0)),
        ZERO_TREATMENT: (binomial_arm(80, 20), binomial_arm(80, 0)),
        NOT_FINITE: (Arm(10, 1e300, float("inf")), Arm(10, 1e300, 1.0)),
    }
    for status, (a, b) in cases.items():
        for options in ({}, {"sequential": True}, {"prior_mean": 0.0, "prior_variance": 1.0}):
            c = compare(a, b, **options)
            assert c.status == status and c.message, (status, options)
            assert c.relative.status != OK and c.relative.p_value == 1.0 and c.relative.ci_low == c.relative.ci_high == 0
            assert (c.chance_to_win, c.risk_control, c.risk_treatment) == (0.5, 0.0, 0.0)
        c = compare(a, b)
        values = [c.dof, c.chance_to_win, c.risk_control, c.risk_treatment, c.posterior_mean]
        for e in (c.absolute, c.relative):
            values += [e.estimate, e.se, e.ci_low, e.ci_high, e.p_value]
        assert all(math.isfinite(v) for v in values), (status, c)
    assert compare(arm_from_sums(0, 0, 0), arm_from_sums(0, 0, 0)).status == NOT_ENOUGH_DATA
    assert srm_p_value([0, 0]) == 1.0 and srm_p_value([5]) == 1.0


def test_multiple_comparison_adjustments():
    p = [0.01, 0.04, 0.03, 0.20]
    assert adjust_p_values(p, "none") == p
    assert np.allclose(adjust_p_values(p, "holm"), [0.04, 0.09, 0.09, 0.20])
    assert np.allclose(adjust_p_values(p, "benjamini_hochberg"), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20])


# ---- simulations ----------------------------------------------------------------------------

def simulate_arms(rng, experiments: int, users: int, lift: float = 0.0):
    """Per-user revenue: 10% of users buy, log-normal amounts. Returns per-arm (n, sum, sum_sq)."""
    def arm_sums(scale: float):
        buys = rng.random((experiments, users)) < 0.1
        amounts = np.where(buys, rng.lognormal(3.0, 0.8, (experiments, users)) * scale, 0.0)
        return amounts.sum(axis=1), (amounts ** 2).sum(axis=1)
    return arm_sums(1.0), arm_sums(1.0 + lift)


def test_aa_simulation_false_positives_and_coverage():
    rng = np.random.default_rng(7)
    experiments, users = 2000, 2000
    (sa, qa), (sb, qb) = simulate_arms(rng, experiments, users)
    fp_abs = fp_rel = covered = 0
    for i in range(experiments):
        c = compare(arm_from_sums(users, sa[i], qa[i]), arm_from_sums(users, sb[i], qb[i]))
        assert c.status == OK
        fp_abs += c.absolute.p_value < 0.05
        fp_rel += c.relative.p_value < 0.05
        covered += c.absolute.ci_low <= 0 <= c.absolute.ci_high
    rates = fp_abs / experiments, fp_rel / experiments, covered / experiments
    print(f"A/A: false positives {rates[0]:.2%} (absolute), {rates[1]:.2%} (relative); coverage {rates[2]:.2%}")
    assert 0.04 <= rates[0] <= 0.06 and 0.04 <= rates[1] <= 0.06
    assert 0.94 <= rates[2] <= 0.96


def test_ab_simulation_intervals_cover_the_true_lift():
    rng = np.random.default_rng(11)
    experiments, users, lift = 2000, 2000, 0.10
    (sa, qa), (sb, qb) = simulate_arms(rng, experiments, users, lift)
    true_mean = 0.1 * math.exp(3.0 + 0.8 ** 2 / 2)
    covered_abs = covered_rel = 0
    for i in range(experiments):
        c = compare(arm_from_sums(users, sa[i], qa[i]), arm_from_sums(users, sb[i], qb[i]))
        covered_abs += c.absolute.ci_low <= true_mean * lift <= c.absolute.ci_high
        covered_rel += c.relative.ci_low <= lift <= c.relative.ci_high
    rates = covered_abs / experiments, covered_rel / experiments
    print(f"A/B (true lift {lift:.0%}): coverage {rates[0]:.2%} (absolute), {rates[1]:.2%} (relative)")
    assert 0.94 <= rates[0] <= 0.96 and 0.935 <= rates[1] <= 0.965


def test_sequential_stays_honest_when_peeking_every_day():
    """A/A experiments checked after each of 30 days: the fixed interval, peeked at, finds an
    effect far more often than 5% of the time; the confidence sequence stays at or below 5%."""
    rng = np.random.default_rng(3)
    experiments, days, per_day = 2000, 30, 40
    (sa, qa), (sb, qb) = [[np.cumsum(x.reshape(experiments, days, per_day).sum(axis=2), axis=1) for x in pair]
                          for pair in [(lambda a: (a[0], a[1]))(s) for s in [_daily(rng, experiments, days, per_day)
                                                                              for _ in range(2)]]]
    peeking_fixed = peeking_sequential = 0
    for i in range(experiments):
        fixed = sequential = False
        for d in range(days):
            n = per_day * (d + 1)
            a, b = arm_from_sums(n, sa[i, d], qa[i, d]), arm_from_sums(n, sb[i, d], qb[i, d])
            fixed |= compare(a, b).absolute.p_value < 0.05
            sequential |= compare(a, b, sequential=True, n_star=5000).absolute.p_value < 0.05
        peeking_fixed += fixed
        peeking_sequential += sequential
    rates = peeking_fixed / experiments, peeking_sequential / experiments
    print(f"A/A peeking daily for {days} days: fixed-horizon false positives {rates[0]:.2%}, sequential {rates[1]:.2%}")
    assert rates[1] <= 0.05
    assert rates[0] > 0.10


def _daily(rng, experiments, days, per_day):
    buys = rng.random((experiments, days * per_day)) < 0.1
    amounts = np.where(buys, rng.lognormal(3.0, 0.8, (experiments, days * per_day)), 0.0)
    return amounts, amounts ** 2


def test_fieller_interval_solves_its_pivot_and_agrees_with_the_absolute_test():
    """Each end r of Fieller's interval makes the absolute difference exactly q standard errors
    from 0 under ratio 1 + r (the textbook pivot, written here independently); it contains 0
    exactly when the absolute interval does; it is unbounded when the control's mean is within
    q of its standard error of 0; a negative control mean flips it like the lift."""
    from abstream.stats import fieller_interval
    from abstream.stats.core import UNBOUNDED

    rng = np.random.default_rng(11)
    agree = 0
    for _ in range(2000):
        c = Arm(int(rng.integers(20, 3000)), float(rng.uniform(0.5, 50)), float(rng.uniform(1, 900)))
        t = Arm(int(rng.integers(20, 3000)), c.mean * float(rng.uniform(0.8, 1.25)), float(rng.uniform(1, 900)))
        r = compare(c, t, relative_interval="fieller")
        if r.relative.status != OK:
            assert r.relative.status == UNBOUNDED
            continue
        q = (r.absolute.ci_high - r.absolute.ci_low) / 2 / r.absolute.se
        for end in (r.relative.ci_low, r.relative.ci_high):
            rho = 1 + end
            pivot = (t.mean - rho * c.mean) ** 2 - q * q * (t.variance / t.n + rho * rho * c.variance / c.n)
            assert abs(pivot) <= 1e-7 * (t.mean ** 2 + q * q * (t.variance / t.n + rho * rho * c.variance / c.n))
        assert (r.relative.ci_low <= 0 <= r.relative.ci_high) == (r.absolute.ci_low <= 0 <= r.absolute.ci_high)
        assert r.relative.p_value == r.absolute.p_value and r.relative.estimate == compare(c, t).relative.estimate
        agree += 1
    assert agree > 1500
    vague = compare(Arm(50, 1.0, 400.0), Arm(50, 2.0, 400.0), relative_interval="fieller")
    assert vague.relative.status == UNBOUNDED and "unbounded" in vague.relative.message
    assert vague.absolute.status == OK and vague.status == UNBOUNDED
    low, high = fieller_interval(Arm(1000, -10.0, 4.0), Arm(1000, -11.0, 4.0), 1.96)
    assert low < -0.1 < high  # lift (m_t - m_c) / |m_c| = -0.1


def test_fieller_holds_where_the_delta_method_under_covers_heavy_tailed_revenue(server):
    """A/A through the server: 500 tests, 2,000 users per arm, log-normal (sigma 1.5) revenue
    on 30% of users, 1-5 events each. Printed: false positives and coverage of the absolute
    lift, the delta-method relative lift and Fieller's, and of both lifts with revenue capped at
    the pooled 99th percentile; Fieller's coverage is the absolute lift's exactly, and each
    that should hold is within the band a 95% interval must hold over 500 tests."""
    import pyarrow as pa
    from abstream.clients import Client

    rng = np.random.default_rng(2024)
    tests, per_arm = 500, 2000
    users = tests * 2 * per_arm
    k = rng.integers(1, 6, users)
    paying = rng.random(users) < 0.3
    user = np.repeat(np.arange(users), k)
    n = len(user)
    revenue = np.where(np.repeat(paying, k), rng.lognormal(3.0, 1.5, n), 0.0)
    import pyarrow.compute as pc
    from scipy.stats import t as scipy_t

    def constant(text: str) -> pa.Array:
        return pa.array([text]).take(pa.array(np.zeros(n, dtype=np.int32)))

    test = user // (2 * per_arm)
    table = pa.table({"timestamp": pa.array((1_735_689_600 + (user % 86_400)) * 1_000_000_000, pa.int64()),
                      "user_id": pc.cast(pa.array(user), pa.string()),
                      "test_id": pc.binary_join_element_wise("aa_", pc.cast(pa.array(test), pa.string()), ""),
                      "variant": pa.array(["control", "treatment"]).take(pa.array((user // per_arm) % 2)),
                      "event_type": constant("purchase"), "conversion": pa.array((revenue > 0).astype(np.int64)),
                      "revenue": pa.array(revenue), "session_id": constant(""), "device": constant("mobile"),
                      "country": constant("US")})
    covered = {"absolute": 0, "delta": 0, "fieller": 0, "capped absolute": 0, "capped relative": 0}
    with Client(server.address, timeout=120) as client:
        client.ingest_table(table, batch_size=100_000)
        first = True
        for i in range(tests):
            fieller = next(c for c in client.summary(f"aa_{i}", relative_interval="fieller").analysis.comparisons
                           if c.metric == "revenue_per_user")
            # the delta method's interval is the estimate +- t(dof) se, se being the delta method's either way
            half = float(scipy_t.ppf(0.975, fieller.degrees_of_freedom)) * fieller.relative.standard_error
            if first:  # checked once against the server's own delta interval
                delta = next(c for c in client.summary(f"aa_{i}").analysis.comparisons if c.metric == "revenue_per_user")
                assert (delta.relative.ci_low, delta.relative.ci_high) == pytest.approx(
                    (fieller.relative.estimate - half, fieller.relative.estimate + half), rel=1e-9)
                first = False
            covered["absolute"] += fieller.absolute.ci_low <= 0 <= fieller.absolute.ci_high
            covered["delta"] += fieller.relative.estimate - half <= 0 <= fieller.relative.estimate + half
            covered["fieller"] += fieller.relative.ci_low <= 0 <= fieller.relative.ci_high
            capped = next(c for c in client.summary(f"aa_{i}", revenue_cap={"percentile": 99}).analysis.comparisons
                          if c.metric == "revenue_per_user")
            covered["capped absolute"] += capped.absolute.ci_low <= 0 <= capped.absolute.ci_high
            covered["capped relative"] += capped.relative.ci_low <= 0 <= capped.relative.ci_high
    coverage = {name: hits / tests for name, hits in covered.items()}
    print("A/A revenue per user, 500 tests: " + ", ".join(
        f"{name} coverage {c:.1%}, false positives {1 - c:.1%}" for name, c in coverage.items()))
    assert coverage["fieller"] == coverage["absolute"]
    assert 0.93 <= coverage["fieller"] <= 0.97
    # Capped at the pooled 99th percentile, both intervals of revenue per user hold their level.
    assert 0.93 <= coverage["capped absolute"] <= 0.97 and 0.93 <= coverage["capped relative"] <= 0.97


def test_non_inferiority_is_the_textbook_one_sided_test_and_holds_its_error_at_the_margin():
    """The one-sided test written here from the formula (scipy.stats.t); then simulations at a
    true lift of exactly -margin: the share of tests that wrongly declare non-inferiority is
    alpha, fixed-horizon, and at most alpha for the sequential test looked at 30 times."""
    from abstream.stats import non_inferiority
    from scipy import stats as scipy_stats

    c, t = Arm(50_000, 0.10, 0.09), Arm(50_000, 0.101, 0.0908)
    r = compare(c, t)
    g = non_inferiority(r.relative, 0.05, r.dof)
    z = (r.relative.estimate + 0.05) / r.relative.se
    assert g.p_value == pytest.approx(scipy_stats.t.sf(z, r.dof), rel=1e-9)
    assert g.lower_bound == pytest.approx(r.relative.estimate - scipy_stats.t.ppf(0.95, r.dof) * r.relative.se)
    assert g.non_inferior and g.p_value < 0.05
    assert non_inferiority(compare(Arm(1, 0.1, 0.0), t).relative, 0.05, 0.0).status == NOT_ENOUGH_DATA

    rng = np.random.default_rng(8)
    margin, p_c, n = 0.05, 0.10, 20_000
    p_t = p_c * (1 - margin)  # exactly at the margin: non-inferiority must be declared in 5% of tests
    sims = 4000
    wrong = 0
    for _ in range(sims):
        ca, ta = binomial_arm(n, int(rng.binomial(n, p_c))), binomial_arm(n, int(rng.binomial(n, p_t)))
        r = compare(ca, ta)
        wrong += non_inferiority(r.relative, margin, r.dof).non_inferior
    rate = wrong / sims
    looks, sequential_wrong, sequential_sims = 30, 0, 400
    for _ in range(sequential_sims):
        xc = rng.random(n) < p_c
        xt = rng.random(n) < p_t
        for k in range(1, looks + 1):
            m = n * k // looks
            ca, ta = binomial_arm(m, int(xc[:m].sum())), binomial_arm(m, int(xt[:m].sum()))
            r = compare(ca, ta, sequential=True, n_star=2 * n)
            if non_inferiority(r.relative, margin, r.dof, sequential=True, n=2 * m, n_star=2 * n).non_inferior:
                sequential_wrong += 1
                break
    print(f"non-inferiority at the margin: {rate:.2%} declared (fixed horizon, {sims} tests), "
          f"{sequential_wrong / sequential_sims:.2%} at any of {looks} looks (sequential)")
    assert 0.04 <= rate <= 0.06
    assert sequential_wrong / sequential_sims <= 0.06


@pytest.mark.parametrize("mean,variance", [(0.2, 0.16), (30.0, 2500.0), (0.05, 0.0475), (-4.0, 9.0)])
def test_power_detectable_effect_and_sample_size_undo_one_another(mean, variance):
    """mde(power) fed back into the power function gives the power back, for proportions and
    means, at several sizes and levels; and the sample size for that lift is the size again."""
    from abstream.stats import detectable_effect, power_of, sample_size
    from scipy.stats import norm

    for n in (100, 2_000, 50_000):
        for alpha, power in ((0.05, 0.8), (0.01, 0.9), (0.1, 0.5)):
            e = detectable_effect(mean, variance, n, alpha, power)
            assert power_of(mean, variance, n, e, alpha) == pytest.approx(power, rel=1e-12)
            assert sample_size(mean, variance, e, alpha, power)[0] in (n, n + 1)
            # and against the textbook normal formula, written out here
            assert e == pytest.approx((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * math.sqrt(2 * variance / n)
                                      / abs(mean), rel=1e-12)
    assert power_of(mean, variance, 0, 0.1) == 0.0 and detectable_effect(0.0, variance, 100) == 0.0


def test_a_fixed_price_per_conversion_has_no_spread_and_claims_no_certainty():
    """Every conversion in an arm worth the same price: revenue is R times conversions for every
    user, so the ratio has no spread, and comparing two such arms claims nothing (ZERO_VARIANCE,
    p = 1), whatever the prices (9.99 against 10.01 left rounding of 1e-14 and said p = 1e-22).
    One order at another price is a spread, and it is kept."""
    from abstream.stats import ratio_arm
    from abstream.stats.core import ZERO_VARIANCE

    def arm(x, y):
        x, y = np.asarray(x, float), np.asarray(y, float)
        return ratio_arm(len(x), x.sum(), y.sum(), ((x - x.mean()) ** 2).sum(), ((y - y.mean()) ** 2).sum(),
                         ((x - x.mean()) * (y - y.mean())).sum())

    for price_c, price_t in ((9.99, 10.01), (10.0, 20.0), (0.1, 0.3), (1234.57, 1234.58)):
        control = arm([price_c] * 3 + [2 * price_c] + [0, 0], [1, 1, 1, 2, 0, 0])
        treatment = arm([price_t] * 3 + [0] * 3, [1, 1, 1, 0, 0, 0])
        assert control.variance == 0.0 and treatment.variance == 0.0, (price_c, control, treatment)
        result = compare(control, treatment)
        assert result.status == ZERO_VARIANCE and result.absolute.p_value == 1.0
    x, y = np.array([9.99, 9.99, 10.99, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    spread = np.var(x - x.sum() / y.sum() * y, ddof=1) / y.mean() ** 2
    assert arm(x, y).variance == pytest.approx(spread, rel=1e-9) and spread > 0


def test_revenue_per_conversion_delta_method_covers_in_aa_and_says_when_undefined():
    """A ratio of per-user totals (revenue over conversions), users as the unit: the delta
    method's variance with the covariance term, against numpy's per-user computation, and an
    A/A simulation of its coverage (printed); an arm without conversions has no ratio."""
    from abstream.stats import ratio_arm

    rng = np.random.default_rng(21)

    def users(n):
        conversions = rng.poisson(0.4, n)
        orders = rng.lognormal(3.0, 1.0, int(conversions.sum()))
        return np.bincount(np.repeat(np.arange(n), conversions), weights=orders, minlength=n), conversions

    r, c = users(3000)
    n = len(r)
    arm = ratio_arm(n, r.sum(), c.sum(), ((r - r.mean()) ** 2).sum(), ((c - c.mean()) ** 2).sum(),
                    ((r - r.mean()) * (c - c.mean())).sum())
    cov = np.cov(r, c, ddof=1)
    g = np.array([1 / c.mean(), -r.mean() / c.mean() ** 2])  # gradient of mean_r / mean_c
    assert arm.mean == pytest.approx(r.sum() / c.sum(), rel=1e-12)
    assert arm.variance == pytest.approx(g @ cov @ g, rel=1e-9)
    assert ratio_arm(100, 0.0, 0.0, 0.0, 0.0, 0.0).n == 0

    sims, covered = 1000, 0
    for _ in range(sims):
        (rc, cc), (rt, ct) = users(2000), users(2000)
        arms = [ratio_arm(len(x), x.sum(), y.sum(), ((x - x.mean()) ** 2).sum(), ((y - y.mean()) ** 2).sum(),
                          ((x - x.mean()) * (y - y.mean())).sum()) for x, y in ((rc, cc), (rt, ct))]
        result = compare(*arms)
        covered += result.absolute.ci_low <= 0 <= result.absolute.ci_high
    print(f"A/A revenue per conversion, {sims} tests: coverage {covered / sims:.1%}")
    assert 0.93 <= covered / sims <= 0.97
