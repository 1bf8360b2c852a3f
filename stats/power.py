"""Sample sizes: how many users each arm needs to detect a lift, before running a test.

For a per-user metric with mean m and variance v in the control, a relative lift e (the minimum
detectable effect) is an absolute difference d = e |m|; with both arms assumed to have the
control's variance, a two-sided test at level alpha detects it with probability `power` when
each arm has

    n = 2 v (z_{1 - alpha/2} + z_power)^2 / d^2

users (the normal approximation of Welch's test, as the comparisons use for large arms). For a
proportion, v = p (1 - p) of the control's rate. Its two inverses: the relative lift n users per
arm detect, e = sqrt(2 v / n) (z_{1 - alpha/2} + z_power) / |m|, and the power to detect e with
n users, Phi(e |m| / sqrt(2 v / n) - z_{1 - alpha/2}) (the far tail, below -d, left out, as in
n): each undoes the other exactly.
"""

from __future__ import annotations

import math

import numpy as np
from abstream.stats.core import special

#: The most users per arm a size is given as (far more than any test has; a count that fits
#: the answer's 64 bits).
MAX_USERS = 1e18


def sample_size(mean: float, variance: float, mde: float, alpha: float = 0.05, power: float = 0.8
                ) -> tuple[int, str]:
    """(users per arm, why not when it cannot be computed: then 0)."""
    difference = abs(mde * mean)
    if mean == 0:
        return 0, "the control's mean is 0: a relative lift of it is 0 whatever its size"
    if not (variance > 0 and math.isfinite(variance)):
        return 0, "the control's values do not vary yet: there is no spread to size the test against"
    z = float(special.ndtri(1 - alpha / 2) + special.ndtri(power))
    with np.errstate(all="ignore"):
        users = np.float64(2 * variance) * z * z / (np.float64(difference) * difference)
    if not users < MAX_USERS:
        return 0, (f"a lift of {mde:g} at this alpha and power needs more than {MAX_USERS:.0e} users per arm: ask for "
                   "a larger effect")
    if not (users > 0 and math.isfinite(difference)):  # a lift so large that its square is infinite
        return 0, (f"a lift of {mde:g} of a mean of {mean:g} is too large to size a test for: ask for a lift that "
                   "could happen")
    return int(math.ceil(users)), ""


def detectable_effect(mean: float, variance: float, users_per_arm: int, alpha: float = 0.05,
                      power: float = 0.8) -> float:
    """The relative lift that `users_per_arm` users per arm detect with `power`: sample_size's
    inverse (0 when it cannot be computed: no users, no spread, a zero mean)."""
    if users_per_arm <= 0 or mean == 0 or not (variance > 0 and math.isfinite(variance)):
        return 0.0
    z = float(special.ndtri(1 - alpha / 2) + special.ndtri(power))
    return math.sqrt(2 * variance / users_per_arm) * z / abs(mean)


def power_of(mean: float, variance: float, users_per_arm: int, mde: float, alpha: float = 0.05) -> float:
    """The chance that `users_per_arm` users per arm detect a relative lift of `mde` at `alpha`
    (two-sided): detectable_effect's inverse in `power` (0 when it cannot be computed)."""
    if users_per_arm <= 0 or mean == 0 or not (variance > 0 and math.isfinite(variance)):
        return 0.0
    shift = abs(mde * mean) / math.sqrt(2 * variance / users_per_arm)
    return float(special.ndtr(shift - special.ndtri(1 - alpha / 2)))
