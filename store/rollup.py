"""A test's running per-(variant, user) totals, so that Summary over the whole test costs
O(its users), not O(its events).

Dashboards mostly ask for a whole test so far, and grouping its events by (variant, user) is
most of such a query's time. A test's sealed events are folded into these totals as each part
is sealed (PartitionView.with_rows): per variant, the sorted codes of its users, and the
conversions and revenue of the users who have any (most have neither, and cost 4 bytes). A
query merges only the tail's rows of the test into them. The answers are the scan's: the same
counts, and sums and centered moments of the same per-user totals (the float sums added in
another order).

They are derived from the parts alone, so every change that rewrites a test's parts (retention,
deletion, erasure, recovery from a snapshot) rebuilds them with the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from abstream.store import kernels

#: The columns the totals are folded from.
COLUMNS = ("variant", "user_id", "conversion", "revenue")
_CODES = np.int32


def contains(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Which of `x` are in `sorted_values` (ascending)."""
    if len(sorted_values) == 0:
        return np.zeros(len(x), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, x), len(sorted_values) - 1)
    return sorted_values[at] == x


def per_user(user: np.ndarray, conversion: np.ndarray, revenue: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct users ascending, their conversions, their revenue) of these rows."""
    if len(user) == 0:
        return np.zeros(0, _CODES), np.zeros(0, np.int64), np.zeros(0, np.float64)
    key, order = kernels.sorted_with_order(user.astype(np.int64))
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    return (key[starts].astype(_CODES), np.add.reduceat(conversion[order].astype(np.int64), starts),
            np.add.reduceat(revenue[order].astype(np.float64), starts))


def _distinct(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct user codes ascending, how often each occurs), by a radix sort."""
    keys = users.astype(np.uint32)  # a copy, sorted in place
    kernels.sort_keys(keys)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) if len(keys) else np.zeros(0, np.int64)
    return keys[starts].astype(_CODES), np.diff(np.append(starts, len(keys)))


def _inserted(values: np.ndarray, at: np.ndarray, new: np.ndarray) -> np.ndarray:
    return np.insert(values, at, new) if len(new) else values


@dataclass(frozen=True)
class VariantTotals:
    """One variant's users (a bitset over user codes, as PartitionView's), and per user with a
    conversion or revenue their totals."""

    bits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    users: int = 0
    active: np.ndarray = field(default_factory=lambda: np.zeros(0, _CODES))  # ascending codes
    conversions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # per active user
    revenue: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # per active user
    events: int = 0

    def merged(self, user: np.ndarray, conversion: np.ndarray, revenue: np.ndarray, kept: bool
               ) -> tuple[VariantTotals, np.ndarray]:
        """These totals with the rows (of this variant) added, and the users new to it; arrays
        copied, never written. Without `kept` (an answer's, not a part's), the users' bitset is
        left as it was: only their count is needed."""
        seen = _distinct(user)[0]
        fresh = seen[~kernels.has_users(self.bits, seen)]
        valued = np.flatnonzero(conversion.astype(bool) | (revenue != 0))
        au, ac, ar = per_user(user[valued], conversion[valued], revenue[valued])
        at = np.searchsorted(self.active, au)
        found = contains(self.active, au)
        conversions, values = self.conversions, self.revenue
        if found.any():
            conversions, values = conversions.copy(), values.copy()
            conversions[at[found]] += ac[found].astype(conversions.dtype)  # each user once: no repeated index
            values[at[found]] += ar[found]
        new = ~found
        return VariantTotals(kernels.add_users(self.bits, fresh) if kept else self.bits, self.users + len(fresh),
                             _inserted(self.active, at[new], au[new]), _inserted(conversions, at[new], ac[new]),
                             _inserted(values, at[new], ar[new]), self.events + len(user)), fresh

    def moments(self) -> tuple[int, int, int, float, float, float, float, int]:
        """(users, converted users, conversions, revenue, centered sums of squares of revenue and
        of conversions per user, their co-moment, events), every user counted: those without a
        value contribute their deviation from the mean, as kernels.centered_user_moments does."""
        n = self.users
        conversions, revenue = int(self.conversions.sum(dtype=np.int64)), float(self.revenue.sum())
        mean_x, mean_y = (revenue / n, conversions / n) if n else (0.0, 0.0)
        dx, dy = self.revenue - mean_x, self.conversions - mean_y
        without = n - len(self.active)
        return (n, int(np.count_nonzero(self.conversions)), conversions, revenue,
                without * mean_x * mean_x + float(dx @ dx), without * mean_y * mean_y + float(dy @ dy),
                without * mean_x * mean_y + float(dx @ dy), self.events)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes + self.active.nbytes + self.conversions.nbytes + self.revenue.nbytes


@dataclass(frozen=True)
class Rollup:
    """A test's totals per variant (by variant code), its distinct users and those seen in more
    than one variant."""

    variants: dict[int, VariantTotals] = field(default_factory=dict)
    users: int = 0
    several: int = 0

    def merged(self, cols: dict[str, np.ndarray], kept: bool = True) -> Rollup:
        """These totals with rows added (COLUMNS of them); without `kept`, for one answer only."""
        variant, user = cols["variant"], cols["user_id"]
        if len(user) == 0:
            return self
        variants = dict(self.variants)
        fresh = []  # per variant, its new users: only they change how many variants a user is in
        for code in np.flatnonzero(np.bincount(variant)).tolist():
            rows = np.flatnonzero(variant == code)
            variants[code], new = variants.get(code, VariantTotals()).merged(
                user[rows], cols["conversion"][rows], cols["revenue"][rows], kept)
            fresh.append(new)
        users, gained = _distinct(np.concatenate(fresh))  # each user new to a variant, and to how many
        before = np.zeros(len(users), dtype=np.int64)  # the variants each had events in
        for totals in self.variants.values():
            before += kernels.has_users(totals.bits, users)
        return Rollup(variants, self.users + int(np.count_nonzero(before == 0)),
                      self.several + int(np.count_nonzero((before + gained > 1) & (before < 2))))

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.variants.values())
