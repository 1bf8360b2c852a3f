"""Per-variant experiment analysis: per-user sufficient statistics in, comparisons out.

The experiment unit is the user. For each variant the store hands over, per metric, the number
of users and the mean and centered sum of squares of the per-user values (see
`kernels.centered_user_m2`); the arithmetic of the comparisons lives in `abstream.stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from abstream import stats
from abstream.store import kernels
from abstream.store.errors import InvalidArgument
from abstream.store.schema import CODE_TYPES
from abstream.store.validate import check_query_string, listed

#: The most variants a test can have (the variant dictionary's capacity).
MAX_VARIANTS = int(np.iinfo(CODE_TYPES["variant"].to_pandas_dtype()).max)

#: Per-user metrics compared between variants.
METRICS = ("conversion", "revenue_per_user", "conversions_per_user")
CORRECTIONS = ("none", "holm", "benjamini_hochberg")


@dataclass(frozen=True)
class AnalysisOptions:
    """How to compare variants; the defaults are what a request that sets nothing gets."""

    control_variant: str = ""  # empty: "control" if present, else the first variant in sort order
    confidence: float = 0.95
    sequential: bool = False
    n_star: float = 5000.0  # total users the confidence sequence is tuned for
    prior_mean: float | None = None
    prior_variance: float | None = None
    expected_weights: dict[str, float] = field(default_factory=dict)  # empty: equal
    srm_threshold: float = 0.001
    correction: str = "none"

    def check(self) -> None:
        check_query_string("control_variant", self.control_variant)
        if len(self.expected_weights) > MAX_VARIANTS:
            raise InvalidArgument("expected_weights", f"has {len(self.expected_weights):,} entries; a test has at most "
                                                      f"{MAX_VARIANTS:,} variants")
        for variant in self.expected_weights:
            check_query_string("expected_weights", variant)
        if not 0 < self.confidence < 1:
            raise InvalidArgument("confidence_level", f"must be between 0 and 1 (exclusive), got {self.confidence}")
        if not self.n_star > 0:
            raise InvalidArgument("sequential_tuning", f"must be positive, got {self.n_star}")
        if (self.prior_mean is None) != (self.prior_variance is None):
            raise InvalidArgument("prior", "needs both a mean and a variance")
        if self.prior_variance is not None and not (self.prior_variance > 0 and math.isfinite(self.prior_variance)
                                                    and math.isfinite(self.prior_mean)):
            raise InvalidArgument("prior", "variance must be positive and both values finite")
        for variant, weight in self.expected_weights.items():
            if not (weight > 0 and math.isfinite(weight)):
                raise InvalidArgument("expected_weights", f"weight of {variant!r} must be positive, got {weight}")
        if not 0 < self.srm_threshold < 1:
            raise InvalidArgument("srm_threshold", f"must be between 0 and 1 (exclusive), got {self.srm_threshold}")
        if self.correction not in CORRECTIONS:
            raise InvalidArgument("correction", f"must be one of {', '.join(CORRECTIONS)}")


@dataclass(frozen=True)
class MetricComparison:
    variant: str
    metric: str
    result: stats.Comparison
    adjusted_absolute_p: float
    adjusted_relative_p: float


@dataclass(frozen=True)
class Analysis:
    control_variant: str
    srm_p_value: float
    srm_flagged: bool
    comparisons: list[MetricComparison]


@dataclass(frozen=True)
class UserMoments:
    """Per group: users, and per metric the sum and centered sum of squares of per-user values."""

    users: np.ndarray
    sums: dict[str, np.ndarray]
    m2: dict[str, np.ndarray]

    def arms(self, metric: str, index: np.ndarray) -> list[stats.Arm]:
        out = []
        for i in index.tolist():
            n = int(self.users[i])
            if metric == "conversion":
                out.append(stats.binomial_arm(n, int(self.sums[metric][i])))
            else:
                mean = float(self.sums[metric][i]) / n if n else 0.0
                out.append(stats.Arm(n, mean, float(self.m2[metric][i]) / (n - 1) if n > 1 else 0.0))
        return out


def user_moments(group: np.ndarray, user: np.ndarray, conversion: np.ndarray, revenue: np.ndarray,
                 n_users_total: int, totals: dict[str, np.ndarray]) -> UserMoments:
    """Moments of the per-user metrics per group, from the rows that carry a value only."""
    users = totals["users"]
    # Indices of the few rows that qualify (found in a bool mask, the fast case of nonzero).
    converting = np.flatnonzero(conversion.astype(bool))
    paying = np.flatnonzero(revenue != 0)
    sums = {"conversion": totals["converted_users"], "revenue_per_user": totals["total_revenue"],
            "conversions_per_user": totals["conversions"]}
    m2 = {
        "revenue_per_user": kernels.centered_user_m2(group[paying], user[paying], revenue[paying], n_users_total,
                                                     users, totals["total_revenue"].astype(np.float64)),
        "conversions_per_user": kernels.centered_user_m2(
            group[converting], user[converting], np.ones(len(converting)), n_users_total, users,
            totals["conversions"].astype(np.float64)),
    }
    return UserMoments(users, sums, m2)


def choose_control(variants: list[str], requested: str) -> str:
    """The requested control, which must be one of `variants`; else "control" if there is one,
    else the first in sort order."""
    if requested:
        if variants and requested not in variants:
            raise InvalidArgument("control_variant", f"{requested!r} is not a variant of this test "
                                                     f"({listed(variants)})")
        return requested
    return "control" if "control" in variants else (variants[0] if variants else "")


def analyze(variants: list[str], moments: UserMoments, index: np.ndarray, options: AnalysisOptions,
            control: str | None = None) -> Analysis:
    """Compares every variant with the control; `index` picks the groups of `moments` that are
    these variants, in the same order. `control` is the one chosen for the whole query (each of
    Segments' segments compares with the test's control); without it, it is chosen here, and a
    requested control that is not among the variants is an error. Where the control has no
    users (a segment), each comparison says so and nothing is compared."""
    if control is None:
        control = choose_control(variants, options.control_variant)
    users = moments.users[index]
    if options.expected_weights:
        missing = [v for v in variants if v not in options.expected_weights]
        if missing:
            raise InvalidArgument("expected_weights", f"has no weight for {listed(missing)}")
        srm = stats.srm_p_value(users, [options.expected_weights[v] for v in variants])
    else:
        srm = stats.srm_p_value(users)
    comparisons: list[MetricComparison] = []
    if control in variants:
        c = variants.index(control)
        treatments = [i for i in range(len(variants)) if i != c]
        for metric in METRICS:
            arms = moments.arms(metric, index)
            results = [stats.compare(arms[c], arms[t], confidence=options.confidence, sequential=options.sequential,
                                     n_star=options.n_star, prior_mean=options.prior_mean,
                                     prior_variance=options.prior_variance) for t in treatments]
            absolute = stats.adjust_p_values([r.absolute.p_value for r in results], options.correction)
            relative = stats.adjust_p_values([r.relative.p_value for r in results], options.correction)
            comparisons += [MetricComparison(variants[t], metric, r, a, rel)
                            for t, r, a, rel in zip(treatments, results, absolute, relative)]
    elif control:
        why = f"the control {control!r} has no users here: nothing is compared"
        missing_control = stats.Estimate(status=stats.NO_CONTROL, message=why)
        for metric in METRICS:
            for variant, arm in zip(variants, moments.arms(metric, index)):
                result = stats.Comparison(0.0, arm.mean, missing_control, missing_control, status=stats.NO_CONTROL,
                                          message=why)
                comparisons.append(MetricComparison(variant, metric, result, 1.0, 1.0))
    order = {v: i for i, v in enumerate(variants)}
    comparisons.sort(key=lambda c: (order[c.variant], METRICS.index(c.metric)))
    return Analysis(control, srm, srm < options.srm_threshold, comparisons)
