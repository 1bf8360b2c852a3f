"""Experiment statistics as pure functions over per-arm sufficient statistics.

Nothing here knows about events, stores or gRPC: an arm is (n users, mean of a per-user metric,
variance of it), and every function returns plain numbers and a status, never NaN and never an
exception for degenerate data.
"""

from abstream.stats.core import (
    NO_CONTROL,
    NOT_ENOUGH_DATA,
    RELATIVE_INTERVALS,
    SEVERITY,
    Arm,
    Comparison,
    Estimate,
    NonInferiority,
    adjust_p_values,
    arm_from_sums,
    binomial_arm,
    compare,
    fieller_interval,
    non_inferiority,
    ratio_arm,
    srm_p_value,
)
from abstream.stats.power import detectable_effect, power_of, sample_size

__all__ = ["detectable_effect", "power_of", "sample_size", "NO_CONTROL", "NOT_ENOUGH_DATA", "RELATIVE_INTERVALS", "SEVERITY", "Arm", "Comparison",
           "Estimate", "adjust_p_values", "arm_from_sums", "binomial_arm", "compare", "fieller_interval", "non_inferiority",
           "NonInferiority", "ratio_arm", "srm_p_value"]
