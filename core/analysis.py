"""Per-variant experiment analysis: an engine's per-user sufficient statistics in, comparisons out.

The experiment unit is the user. For each group the engine hands over, per metric, the number of
users and the sum and centered sum of squares of the per-user values (`UserMoments`); the
arithmetic of the comparisons lives in `abstream.stats`. Nothing here knows which engine
computed the moments.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from abstream import stats
from abstream.core.errors import InvalidArgument, in_time
from abstream.core.events import listed
from abstream.core.types import (
    METRICS,
    RATIOS,
    SESSION_METRICS,
    Analysis,
    AnalysisOptions,
    GroupStats,
    Health,
    MetricComparison,
    MetricPower,
    PowerQuery,
    PowerResult,
    SegmentsQuery,
    SegmentsResult,
    SummaryQuery,
    SummaryResult,
    TimeseriesQuery,
    TimeseriesResult,
    UserMoments,
)


def choose_control(variants: list[str], options: AnalysisOptions) -> str:
    """The requested control, which must be one of `variants`; else the plan's, whether or not
    it has users here; else "control" if there is one, else the first in sort order."""
    requested = options.control_variant
    if requested:
        if variants and requested not in variants:
            raise InvalidArgument("control_variant", f"{requested!r} is not a variant of this test "
                                                     f"({listed(variants)})")
        return requested
    if options.planned_control:
        return options.planned_control
    return "control" if "control" in variants else (variants[0] if variants else "")


def unplanned(variants: list[str], options: AnalysisOptions) -> list[str]:
    """The variants the experiment's plan has no share for (when the caller gave no weights)."""
    if options.expected_weights or not options.planned_weights:
        return []
    return [v for v in variants if v not in options.planned_weights]


def analyze(variants: list[str], moments: UserMoments, index: np.ndarray, options: AnalysisOptions,
            control: str | None = None) -> Analysis:
    """Compares every variant with the control; `index` picks the groups of `moments` that are
    these variants, in the same order. `control` is the one chosen for the whole query (each of
    Segments' segments compares with the test's control); without it, it is chosen here, and a
    requested control that is not among the variants is an error. Where the control has no
    users (a segment), each comparison says so and nothing is compared."""
    if control is None:
        control = choose_control(variants, options)
    users = moments.users[index]
    if weights := options.expected_weights or options.planned_weights:
        missing = [v for v in variants if v not in weights]
        if missing and options.expected_weights:
            raise InvalidArgument("expected_weights", f"has no weight for {listed(missing)}")
        # A planned variant nobody reached is the plainest mismatch of all: counted, with 0 users.
        absent = sorted(set(weights) - set(variants))
        weighed = [i for i, v in enumerate(variants) if v in weights]  # an unplanned one: said in health
        srm = stats.srm_p_value(np.concatenate([users[weighed], np.zeros(len(absent))]),
                                [weights[v] for v in [*(variants[i] for i in weighed), *absent]])
    else:
        srm = stats.srm_p_value(users)
    comparisons: list[MetricComparison] = []
    if control in variants:
        c = variants.index(control)
        treatments = [i for i in range(len(variants)) if i != c]
        for metric in moments.metrics:
            arms = moments.arms(metric, index)
            results = [_undefined_ratio(metric, arms[c], arms[t], variants[c], variants[t]) if metric in RATIOS
                       and not (arms[c].n and arms[t].n) else
                       stats.compare(arms[c], arms[t], confidence=options.confidence, sequential=options.sequential,
                                     n_star=options.n_star, prior_mean=options.prior_mean,
                                     prior_variance=options.prior_variance,
                                     relative_interval=options.relative_interval) for t in treatments]
            absolute = stats.adjust_p_values([r.absolute.p_value for r in results], options.correction)
            relative = stats.adjust_p_values([r.relative.p_value for r in results], options.correction)
            margin = options.guardrails.get(metric)
            guardrails = [None if margin is None else stats.non_inferiority(
                r.relative, margin, r.dof, confidence=options.confidence, sequential=options.sequential,
                n=arms[c].n + arms[t].n, n_star=options.n_star) for t, r in zip(treatments, results)]
            comparisons += [MetricComparison(variants[t], metric, r, a, rel, g)
                            for t, r, a, rel, g in zip(treatments, results, absolute, relative, guardrails)]
    elif control:
        why = f"the control {control!r} has no users here: nothing is compared"
        missing_control = stats.Estimate(status=stats.NO_CONTROL, message=why)
        for metric in moments.metrics:
            for variant, arm in zip(variants, moments.arms(metric, index)):
                result = stats.Comparison(0.0, arm.mean, missing_control, missing_control, status=stats.NO_CONTROL,
                                          message=why)
                comparisons.append(MetricComparison(variant, metric, result, 1.0, 1.0))
    order = {v: i for i, v in enumerate(variants)}
    comparisons.sort(key=lambda c: (order[c.variant], (METRICS + SESSION_METRICS).index(c.metric)))
    return Analysis(control, srm, srm < options.srm_threshold, comparisons)


def _undefined_ratio(metric: str, control: stats.Arm, treatment: stats.Arm, control_name: str,
                     treatment_name: str) -> stats.Comparison:
    """A ratio where an arm has none of its denominator (revenue per conversion without a
    conversion): no ratio, said as such."""
    arm = control_name if not control.n else treatment_name
    why = f"{arm!r} has no {RATIOS[metric][3]}: its {metric.replace('_', ' ')} is undefined"
    missing = stats.Estimate(status=stats.NOT_ENOUGH_DATA, message=why)
    return stats.Comparison(control.mean, treatment.mean, missing, missing, status=stats.NOT_ENOUGH_DATA, message=why)


def power(q: PowerQuery, summary_query: SummaryQuery, g: GroupStats, days_observed: float = 0.0) -> PowerResult:
    """Sample sizes per metric from the control's users so far: their mean and variance, and
    their arrival rate over `days_observed` for how long the test will take."""
    control = choose_control(g.variants, summary_query.analysis)
    if control not in g.variants:
        why = f"the control {control!r} has no users yet" if control else "the test has no events yet"
        return PowerResult(q.test_id, control, [MetricPower(m, 0.0, 0.0, 0, 0.0, why) for m in g.moments.metrics])
    c = np.array([g.variants.index(control)])
    users = int(g.moments.users[c[0]])
    rate = users / days_observed if days_observed > 0 else 0.0
    out = []
    for metric in g.moments.metrics:
        (arm,) = g.moments.arms(metric, c)
        n, why = stats.sample_size(arm.mean, arm.variance, q.mde, q.alpha, q.power)
        at = q.users_per_variant or users
        out.append(MetricPower(metric, arm.mean, arm.variance, n, n / rate if n and rate else 0.0, why, at,
                               stats.detectable_effect(arm.mean, arm.variance, at, q.alpha, q.power),
                               stats.power_of(arm.mean, arm.variance, at, q.mde, q.alpha)))
    return PowerResult(q.test_id, control, out)


#: Users in several variants, as a share of all users, from which the test is unhealthy.
MULTI_VARIANT_UNHEALTHY = 0.01
#: Events this far past the server's clock are counted as from the future (ns).
FUTURE_NS = 5 * 60 * 1_000_000_000
_GRADES = ("healthy", "warning", "unhealthy")


def health(a: Analysis, g: GroupStats, options: AnalysisOptions, events_before_start: int, future_events: int,
           start_text: str = "") -> Health:
    """Grades how the experiment ran: each check healthy, a warning or unhealthy, with a sentence
    saying what was found and what it means; the status is the worst of them."""
    found: list[tuple[int, str]] = []
    srm = 0
    if a.srm_p_value < options.srm_threshold:
        srm = 2
        found.append((2, f"sample ratio mismatch (p = {a.srm_p_value:.2g}): the users per variant are not the "
                         "planned split; find the cause (assignment, logging, bots) before trusting any result"))
    elif a.srm_p_value < 10 * options.srm_threshold:
        srm = 1
        found.append((1, f"the users per variant are close to a sample ratio mismatch (p = {a.srm_p_value:.2g})"))
    if stray := unplanned(g.variants, options):
        users = int(sum(g.metrics.users[g.variants.index(v)] for v in stray))
        found.append((2, f"{users:,} users are in {listed(stray)}, which the experiment's plan does not have: an "
                         "assignment or logging bug; the sample ratio check leaves them out"))
    if g.multi_variant_users:
        share = g.multi_variant_users / max(g.users, 1)
        grade = 1 if options.exclude_multi_variant_users or share < MULTI_VARIANT_UNHEALTHY else 2
        treated = ("left out of the analysis" if options.exclude_multi_variant_users
                   else "counted in each; exclude_multi_variant_users leaves them out")
        found.append((grade, f"{g.multi_variant_users:,} users ({share:.2%}) were seen in more than one variant, an "
                             f"assignment bug: {treated}"))
    if events_before_start:
        found.append((1, f"{events_before_start:,} events are before the experiment's start{start_text}, and not in "
                         "the analysis"))
    if future_events:
        found.append((1, f"{future_events:,} events are timestamped more than 5 minutes in the future: a producer's "
                         "clock or time unit is wrong"))
    found.sort(key=lambda f: -f[0])
    worst = found[0][0] if found else 0
    return Health(_GRADES[worst], [text for _, text in found], g.users, g.multi_variant_users,
                  options.exclude_multi_variant_users, a.srm_p_value, _GRADES[srm], events_before_start, future_events)


def summary(q: SummaryQuery, g: GroupStats, events_before_start: int = 0, future_events: int = 0,
            start_text: str = "") -> SummaryResult:
    """An engine's Summary statistics, with the analysis of every variant against the control and
    the experiment's health."""
    a = dataclasses.replace(analyze(g.variants, g.moments, np.arange(len(g.variants)), q.analysis),
                            revenue_cap=g.revenue_cap)
    return SummaryResult(test_id=q.test_id, variants=g.variants, metrics=g.metrics, stats=g.stats, analysis=a,
                         health=health(a, g, q.analysis, events_before_start, future_events, start_text))


def segments(q: SegmentsQuery, g: GroupStats) -> SegmentsResult:
    """An engine's Segments statistics, each segment's variants compared with the test's control."""
    control = choose_control(sorted(set(g.variants)), q.analysis)
    segment_names = g.segments or []
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(segment_names):
        rows_of.setdefault(name, []).append(i)
    analyses = []
    for name in sorted(rows_of):
        in_time(q.deadline)
        rows = rows_of[name]
        analyses.append((name, analyze([g.variants[r] for r in rows], g.moments, np.array(rows, dtype=np.int64),
                                       q.analysis, control)))
    return SegmentsResult(test_id=q.test_id, dimension=q.dimension, variants=g.variants, segments=segment_names,
                          metrics=g.metrics, stats=g.stats, analyses=analyses)


def lift(q: TimeseriesQuery, r: TimeseriesResult) -> TimeseriesResult:
    """Each bucket's cumulative lifts, by confidence sequences whatever `sequential` says: the
    curve is looked at once per bucket, so its intervals must hold at every look at once."""
    starts = r.bucket_start_ns
    if not len(starts):  # no events in the range: no buckets, no lifts
        return dataclasses.replace(r, lifts=[])
    options = dataclasses.replace(q.lift, sequential=True)
    control = choose_control(sorted(set(r.variants)), options)
    lifts = []
    edges = np.flatnonzero(np.concatenate(([True], starts[1:] != starts[:-1], [True])))
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        in_time(q.deadline)
        index = np.arange(lo, hi)
        lifts.append((int(starts[lo]), analyze([r.variants[i] for i in range(lo, hi)], r.moments, index, options,
                                               control)))
    return dataclasses.replace(r, lifts=lifts)
