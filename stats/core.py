"""Frequentist, sequential and Bayesian comparisons of a treatment arm against a control arm.

The experiment unit is the user: an arm's n is its users, and its mean and variance are those
of a per-user metric (a user's revenue total, say). Formulas, one line each (README, Statistics):

- absolute lift d = m_t - m_c, se = sqrt(v_c/n_c + v_t/n_t)
- relative lift r = d / |m_c|, delta-method se = sqrt(v_t/(n_t m_c^2) + v_c m_t^2/(n_c m_c^4));
  or Fieller's interval (`fieller_interval`), whose test of r = 0 is the absolute lift's
- Welch-Satterthwaite dof = (v_c/n_c + v_t/n_t)^2 / ((v_c/n_c)^2/(n_c-1) + (v_t/n_t)^2/(n_t-1))
- fixed-horizon interval: estimate +- t_{1-alpha/2, dof} se; p = 2 (1 - T_dof(|estimate| / se))
- asymptotic confidence sequence (Waudby-Smith et al.), tuned for N* users:
  rho = sqrt((-2 ln alpha + ln(-2 ln alpha + 1)) / N*), n = n_c + n_t,
  half-width = se sqrt(n) sqrt(2 (n rho^2 + 1) ln(sqrt(n rho^2 + 1) / alpha) / (n rho)^2);
  its p-value is the smallest alpha whose sequence excludes 0
- Bayesian: the relative lift ~ Normal(r, se^2) (flat prior) or combined with a Normal(m0, v0)
  prior by precision weighting; chance to win = P(lift > 0); risk = (E[max(lift, 0)],
  E[max(-lift, 0)]): the expected loss of keeping the control, and of shipping the treatment
- sample ratio mismatch: Pearson chi-square of users per arm against expected weights

Nothing is claimed from no variance: a lift whose standard error is 0 or not finite gets a status
saying which arm is degenerate and why (`_degenerate`), zeros, p = 1 and no posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class _Special:
    """scipy.special, imported when a function of it is first used (then kept, as an attribute):
    importing it, with the array API machinery it brings, took every server process 0.2 s to
    start, before it had anything to compare."""

    def __getattr__(self, name: str):
        from scipy import special as loaded

        value = getattr(loaded, name)
        setattr(self, name, value)
        return value


special = _Special()

OK = "ok"
NOT_ENOUGH_DATA = "not_enough_data"  # an arm has fewer than two users
NOT_FINITE = "not_finite"  # values so large that a variance overflows
ZERO_VARIANCE = "zero_variance"  # neither arm varies: nothing to measure uncertainty against
ZERO_TREATMENT = "zero_treatment"  # the treatment is all zeros: the relative lift's delta-method se is 0
ZERO_CONTROL_MEAN = "zero_control_mean"  # the control's mean is 0: a relative lift is undefined
NO_CONTROL = "no_control"  # the control has no users here (a segment): nothing is compared
UNBOUNDED = "unbounded"  # Fieller's interval has no finite ends: the control's mean is not clearly away from 0
#: Statuses from the least to the most severe: a comparison takes its worse lift's.
SEVERITY = (OK, UNBOUNDED, ZERO_CONTROL_MEAN, ZERO_TREATMENT, ZERO_VARIANCE, NOT_FINITE, NOT_ENOUGH_DATA, NO_CONTROL)
RELATIVE_INTERVALS = ("delta", "fieller")


@dataclass(frozen=True)
class Arm:
    """One arm's users and the mean and (sample) variance of a per-user metric."""

    n: int
    mean: float
    variance: float


def arm_from_sums(n: int, total: float, sum_squares: float) -> Arm:
    """An arm from n, sum and sum of squares (as exported by other engines).

    Prefer building arms from a centered sum of squares (`Arm(n, mean, m2 / (n - 1))`): this
    form cancels catastrophically when the mean is large against the spread.
    """
    if n <= 0:
        return Arm(0, 0.0, 0.0)
    mean = total / n
    variance = max(sum_squares - total * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return Arm(n, mean, variance)


#: Var(x - R y) below this share of its terms is their rounding, not a spread: none.
RATIO_ROUNDING = 1e-9


def ratio_arm(n: int, total_x: float, total_y: float, m2_x: float, m2_y: float, comoment: float) -> Arm:
    """A ratio metric's arm (sum x / sum y over users, say revenue per conversion) as an Arm whose
    variance over n is the delta method's variance of the ratio, with the covariance term:
    Var(R) = (V_x / ybar^2 - 2 xbar C / ybar^3 + xbar^2 V_y / ybar^4) / n = Var(x - R y) / ybar^2 / n,
    from the users' centered sums of squares and co-moment. The unit stays the user. An arm
    without any y (no conversions) has no ratio: n = 0."""
    if n < 1 or total_y == 0:
        return Arm(0, 0.0, 0.0)
    my = total_y / n
    ratio = total_x / total_y
    if n < 2:
        return Arm(n, ratio, 0.0)
    vx, vy, c = m2_x / (n - 1), m2_y / (n - 1), comoment / (n - 1)
    spread = vx - 2 * ratio * c + ratio * ratio * vy  # Var(x - R y): 0 when every user's x is R times their y
    if spread <= RATIO_ROUNDING * (vx + 2 * abs(ratio * c) + ratio * ratio * vy):
        spread = 0.0  # within its terms' rounding (a fixed price: 9.99 per conversion made 1e-14, and p = 1e-22)
    return Arm(n, ratio, spread / (my * my))


def binomial_arm(n: int, successes: int) -> Arm:
    """A 0/1 metric: variance p (1 - p), with an n denominator."""
    p = successes / n if n > 0 else 0.0
    return Arm(n, p, p * (1 - p))


@dataclass(frozen=True)
class Estimate:
    """A lift with its uncertainty. All zeros and p = 1 when `status` says it could not be
    computed, and then `message` says which arm is degenerate and why."""

    estimate: float = 0.0
    se: float = 0.0
    ci_low: float = 0.0
    ci_high: float = 0.0
    p_value: float = 1.0
    status: str = NOT_ENOUGH_DATA
    message: str = ""


@dataclass(frozen=True)
class Comparison:
    """A treatment against the control for one metric."""

    control_mean: float
    treatment_mean: float
    absolute: Estimate
    relative: Estimate
    dof: float = 0.0
    chance_to_win: float = 0.5
    risk_control: float = 0.0  # expected loss (relative) of keeping the control
    risk_treatment: float = 0.0  # expected loss (relative) of shipping the treatment
    posterior_mean: float = 0.0
    status: str = NOT_ENOUGH_DATA
    message: str = ""


def welch_dof(c: Arm, t: Arm) -> float:
    a, b = c.variance / c.n, t.variance / t.n
    denominator = (a * a / (c.n - 1) if c.n > 1 else 0.0) + (b * b / (t.n - 1) if t.n > 1 else 0.0)
    return (a + b) ** 2 / denominator if denominator > 0 else float(c.n + t.n - 2)


def sequential_half_width(se: float, n: int, alpha: float, n_star: float) -> float:
    """Half-width of the asymptotic confidence sequence at `n` total users, tuned for `n_star`."""
    log_term = -2 * math.log(alpha)
    rho = math.sqrt((log_term + math.log(log_term + 1)) / n_star)
    nr2 = n * rho * rho
    return se * math.sqrt(n) * math.sqrt(2 * (nr2 + 1) * math.log(math.sqrt(nr2 + 1) / alpha) / (n * rho) ** 2)


def _sequential_p_value(estimate: float, se: float, n: int, n_star: float) -> float:
    """The smallest alpha whose confidence sequence excludes 0 (1 when none below 1 does)."""
    if se <= 0:  # no spread is no evidence (callers give such lifts a status first)
        return 1.0
    gap = abs(estimate)

    def excess(log_alpha: float) -> float:
        return sequential_half_width(se, n, math.exp(log_alpha), n_star) - gap

    high = math.log(1 - 1e-12)
    if excess(high) > 0:  # even at alpha ~ 1 the sequence covers 0
        return 1.0
    low = math.log(1e-300)
    if excess(low) <= 0:
        return 1e-300
    from scipy import optimize  # here: importing it took every server process 0.37 s to start

    return float(min(1.0, math.exp(optimize.brentq(excess, low, high, xtol=1e-12))))


def _g(x: float) -> str:
    return f"{x:.6g}"


def _degenerate(control: Arm, treatment: Arm, relative: bool) -> Estimate | None:
    """The status of a lift whose standard error is not usable, with words that say why; None
    when it is usable. The absolute lift's se is 0 only when neither arm varies; the relative
    lift's (delta method) also when the treatment is all zeros, and it is undefined when the
    control's mean is 0."""
    arms = (("control", control), ("treatment", treatment))
    for name, arm in arms:
        if arm.n < 2:
            return Estimate(status=NOT_ENOUGH_DATA, message=f"the {name} has {arm.n} user{'s' * (arm.n != 1)}; "
                                                            "at least 2 per arm are needed")
    for name, arm in arms:
        if not (math.isfinite(arm.mean) and math.isfinite(arm.variance)):
            return Estimate(status=NOT_FINITE, message=f"the {name}'s values are too large: their variance "
                                                       "overflows")
    if control.variance == 0 and treatment.variance == 0:
        return Estimate(status=ZERO_VARIANCE, message=f"neither arm varies (every control user has "
                                                      f"{_g(control.mean)}, every treatment user {_g(treatment.mean)}):"
                                                      " there is no spread to measure uncertainty against")
    if relative and control.mean == 0:
        return Estimate(status=ZERO_CONTROL_MEAN, message="the control's mean is 0: a lift relative to it is undefined")
    if relative and treatment.variance == 0 and treatment.mean == 0:
        return Estimate(status=ZERO_TREATMENT, message="every treatment user has 0: the delta method gives the "
                                                       "relative lift no standard error (the absolute lift has one)")
    return None


def _multiplier(dof: float, alpha: float, sequential: bool, n: int, n_star: float) -> float:
    """How many standard errors an interval reaches either side (the confidence sequence's is
    linear in the standard error too)."""
    if sequential:
        return sequential_half_width(1.0, n, alpha, n_star)
    # scipy.special's ufuncs: the same functions as scipy.stats.t, without its per-call overhead
    return float(special.stdtrit(dof, 1 - alpha / 2))


def _estimate(value: float, se: float, dof: float, alpha: float, sequential: bool, n: int,
              n_star: float) -> Estimate:
    if not (se > 0 and math.isfinite(se) and math.isfinite(value)):
        return Estimate(status=NOT_FINITE, message="the standard error is not a finite positive number")
    half = _multiplier(dof, alpha, sequential, n, n_star) * se
    p_value = _sequential_p_value(value, se, n, n_star) if sequential else float(2 * special.stdtr(dof, -abs(value) / se))
    return Estimate(value, se, value - half, value + half, min(max(p_value, 0.0), 1.0), OK)


def fieller_interval(control: Arm, treatment: Arm, q: float) -> tuple[float, float] | None:
    """Fieller's interval for the relative lift m_t / m_c - 1 (signed by the control's mean,
    like the lift), reaching q standard errors: the lifts r for which the absolute difference
    m_t - (1 + r) m_c is within q of its standard error, the roots of
    (b - rho a)^2 = q^2 (s_b^2 + rho^2 s_a^2) with a, b the means and s^2 = v / n. None when
    they are not a finite interval (q^2 s_a^2 >= a^2: the control's mean is not clearly away
    from 0)."""
    a, b = control.mean, treatment.mean
    sa2, sb2 = control.variance / control.n, treatment.variance / treatment.n
    leading = a * a - q * q * sa2
    if not leading > 0:
        return None
    reach = q * math.sqrt(max(a * a * sb2 + b * b * sa2 - q * q * sa2 * sb2, 0.0))
    low, high = (a * b - reach) / leading, (a * b + reach) / leading
    return (low - 1, high - 1) if a > 0 else (1 - high, 1 - low)


def worse(a: str, b: str) -> str:
    return max(a, b, key=SEVERITY.index)


def compare(control: Arm, treatment: Arm, *, confidence: float = 0.95, sequential: bool = False,
            n_star: float = 5000, prior_mean: float | None = None, prior_variance: float | None = None,
            relative_interval: str = "delta") -> Comparison:
    """Lift of `treatment` over `control`: intervals, p-values, chance to win and risk.

    A lift whose standard error is not usable has a status that says why, zeros and p = 1;
    without a relative lift there is no posterior: chance to win 0.5, risks 0."""
    alpha = 1 - confidence
    n = control.n + treatment.n
    mc, mt = control.mean, treatment.mean
    absolute = _degenerate(control, treatment, relative=False)
    relative = _degenerate(control, treatment, relative=True)
    dof = welch_dof(control, treatment) if absolute is None else 0.0
    if absolute is None:
        absolute = _estimate(mt - mc, math.sqrt(control.variance / control.n + treatment.variance / treatment.n),
                             dof, alpha, sequential, n, n_star)
    if relative is None:
        rel_var = treatment.variance / (treatment.n * mc * mc) + control.variance * mt * mt / (control.n * mc ** 4)
        relative = _estimate((mt - mc) / abs(mc), math.sqrt(rel_var), dof, alpha, sequential, n, n_star)
        if relative_interval == "fieller" and relative.status == OK:
            # Fieller's test of no lift is the absolute lift's: the same p-value, the same decision
            ends = fieller_interval(control, treatment, _multiplier(dof, alpha, sequential, n, n_star))
            relative = (Estimate(status=UNBOUNDED, message=(
                "the control's mean is not clearly away from 0 at this confidence: Fieller's interval for the "
                "relative lift is unbounded (the absolute lift has one)")) if ends is None else
                Estimate(relative.estimate, relative.se, ends[0], ends[1], absolute.p_value, OK))
    status = worse(absolute.status, relative.status)
    message = next((e.message for e in (absolute, relative) if e.status == status), "")
    if relative.status != OK:
        return Comparison(mc, mt, absolute, relative, dof, status=status, message=message)
    mean, variance = relative.estimate, relative.se ** 2
    if prior_mean is not None and prior_variance is not None and prior_variance > 0:
        precision = 1 / prior_variance + 1 / variance
        mean, variance = (prior_mean / prior_variance + mean / variance) / precision, 1 / precision
    sd = math.sqrt(variance)
    if not sd > 0:  # a prior so sure that nothing is left uncertain: the limits as sd goes to 0
        return Comparison(mc, mt, absolute, relative, dof, chance_to_win=0.5 if mean == 0 else float(mean > 0),
                          risk_control=max(mean, 0.0), risk_treatment=max(-mean, 0.0), posterior_mean=mean,
                          status=status, message=message)
    z = mean / sd
    density, below = math.exp(-z * z / 2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(-z / math.sqrt(2))
    return Comparison(mc, mt, absolute, relative, dof, chance_to_win=below,
                      risk_control=mean * below + sd * density,
                      risk_treatment=-mean * (1 - below) + sd * density,
                      posterior_mean=mean, status=status, message=message)


@dataclass(frozen=True)
class NonInferiority:
    """A guardrail: whether the treatment is no worse than the control by more than `margin`
    (relative), by a one-sided test of H0: lift <= -margin."""

    margin: float
    non_inferior: bool
    p_value: float  # of H0; non-inferior when below alpha
    lower_bound: float  # the one-sided (1 - alpha) lower confidence bound of the relative lift
    status: str = OK
    message: str = ""


def non_inferiority(relative: Estimate, margin: float, dof: float, *, confidence: float = 0.95,
                    sequential: bool = False, n: int = 0, n_star: float = 5000) -> NonInferiority:
    """The one-sided test of a relative lift against -margin: t = (r + margin) / se, p = 1 -
    T_dof(t), bound r - t_{1-alpha, dof} se; sequential, the confidence sequence at 2 alpha
    (one side of it holds at alpha at every look) and its p-value halved."""
    if relative.status != OK:
        return NonInferiority(margin, False, 1.0, 0.0, relative.status, relative.message or
                              "the relative lift could not be computed")
    alpha = 1 - confidence
    r, se = relative.estimate, relative.se
    if sequential:
        bound = r - sequential_half_width(se, n, 2 * alpha, n_star)
        p = _sequential_p_value(r + margin, se, n, n_star) / 2 if r + margin > 0 else 1.0
    else:
        bound = r - float(special.stdtrit(dof, confidence)) * se
        p = float(special.stdtr(dof, -(r + margin) / se))
    return NonInferiority(margin, bool(bound > -margin), min(max(p, 0.0), 1.0), bound)


def srm_p_value(users: list[int] | np.ndarray, weights: list[float] | np.ndarray | None = None) -> float:
    """Pearson chi-square p-value of users per arm against expected weights (equal when None)."""
    users = np.asarray(users, dtype=np.float64)
    k = len(users)
    total = users.sum()
    if k < 2 or total <= 0:
        return 1.0
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != k or np.any(w <= 0):
        return 1.0
    w = w / w.max()  # weights of 1e308 summed to infinity, and every expected count to 0
    expected = total * w / w.sum()
    statistic = float(((users - expected) ** 2 / expected).sum())
    return float(special.chdtrc(k - 1, statistic))  # scipy.stats.chi2.sf, without its per-call overhead


def adjust_p_values(p_values: list[float], method: str = "none") -> list[float]:
    """Holm (family-wise error) or Benjamini-Hochberg (false discovery rate) adjusted p-values."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if method == "none" or m < 2:
        return p.tolist()
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    if method == "holm":
        adjusted = np.maximum.accumulate(np.minimum(ranked * (m - np.arange(m)), 1.0))
    elif method == "benjamini_hochberg":
        adjusted = np.minimum.accumulate((ranked * m / np.arange(1, m + 1))[::-1])[::-1]
        adjusted = np.minimum(adjusted, 1.0)
    else:
        raise ValueError(f"unknown correction {method!r}")
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
