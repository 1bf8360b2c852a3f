"""A test's running per-(variant, user) totals, so that whole-test Summary, cumulative
Timeseries and Segments cost O(its users), not O(its events).

Dashboards mostly ask for a whole test so far, and grouping its events by (variant, user) is
most of such a query's time. Once a test's whole answers have been asked for (Ingest.want_rollup),
its sealed events are folded into these totals as each part is sealed (PartitionView.with_rows):
per variant, a bitset of its users, and the conversions and revenue of the users who have any
(most have neither); hourly, also each user's first hour, first conversion hour and per-hour
totals; per dimension Segments was asked for, the same (without hours) per (variant, segment).
A query merges only the tail's rows of the test into them. The answers are the scan's: the same
counts, and sums and centered moments of the same per-user totals (the float sums added in
another order).

They are derived from the parts alone, so every change that rewrites a test's parts (retention,
deletion, erasure, recovery from a snapshot) rebuilds them with the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from abstream.store import kernels

#: What Segments splits a test by (the event fields, as core.types.Dimension's values).
DIMENSIONS = ("device", "country", "event_type")
#: The columns the totals are folded from.
COLUMNS = ("timestamp", "variant", "user_id", "conversion", "revenue", *DIMENSIONS)
#: What a rollup holds beside per-variant totals (Rollup.holds) is named by HOURLY (hours, which
#: cumulative Timeseries reads) and by DIMENSIONS (per (variant, segment) totals, which Segments reads).
HOURLY = "hourly"
HOUR_NS = 3600 * 1_000_000_000
#: The first conversion hour of a user who has revenue but no conversion.
NO_HOUR = np.iinfo(np.int32).max
_CODES = np.int32
#: Buckets counted in a dense array up to this span of bucket numbers (else searched for).
_DENSE_BUCKETS = 1 << 20


def contains(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Which of `x` are in `sorted_values` (ascending)."""
    if len(sorted_values) == 0:
        return np.zeros(len(x), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, x), len(sorted_values) - 1)
    return sorted_values[at] == x


def runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct keys ascending, the permutation that sorts the rows, where each key's rows start)."""
    key, order = kernels.sorted_with_order(key.astype(np.int64))
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1]))) if len(key) else np.zeros(0, np.int64)
    return key[starts], order, starts


def per_user(user: np.ndarray, hour: np.ndarray, conversion: np.ndarray, revenue: np.ndarray
             ) -> tuple[np.ndarray, ...]:
    """(distinct users ascending, their conversions, revenue and first conversion hour)."""
    users, order, starts = runs(user)
    if len(users) == 0:
        return np.zeros(0, _CODES), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int32)
    converting = conversion[order].astype(bool)
    return (users.astype(_CODES), np.add.reduceat(conversion[order].astype(np.int64), starts),
            np.add.reduceat(revenue[order].astype(np.float64), starts),
            np.minimum.reduceat(np.where(converting, hour[order], NO_HOUR), starts).astype(np.int32))


def first_per_user(user: np.ndarray, hour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct users ascending, the first hour of each)."""
    users, order, starts = runs(user)
    if len(users) == 0:
        return np.zeros(0, _CODES), np.zeros(0, np.int32)
    return users.astype(_CODES), np.minimum.reduceat(hour[order], starts).astype(np.int32)


def ranks(bits: np.ndarray, users: np.ndarray) -> np.ndarray:
    """For each user code, how many codes below it are set in the bitset (uint8, whole 64-bit
    words): a set user's position among the set ones, an unset one's insertion point."""
    words = bits.view(np.uint64)
    counts = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum(np.bitwise_count(words), out=counts[1:])
    u = users.astype(np.int64)
    w = np.minimum(u >> 6, len(words))
    out = counts[w]
    inside = w < len(words)
    below = words[w[inside]] & ((np.uint64(1) << (u[inside] & 63).astype(np.uint64)) - np.uint64(1))
    out[inside] += np.bitwise_count(below)
    return out


def _distinct(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct user codes ascending, how often each occurs), by a radix sort."""
    keys = users.astype(np.uint32)  # a copy, sorted in place
    kernels.sort_keys(keys)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) if len(keys) else np.zeros(0, np.int64)
    return keys[starts].astype(_CODES), np.diff(np.append(starts, len(keys)))


def members(users: np.ndarray, of: np.ndarray) -> np.ndarray:
    """Which of `users` are in `of`: a bitset over user codes (uint8), or their ascending codes."""
    return kernels.has_users(of, users) if of.dtype == np.uint8 else contains(of, users)


def with_members(of: np.ndarray, fresh: np.ndarray, count: int) -> np.ndarray:
    """`of` (as `members` reads it) with `fresh` (ascending, none in it yet) added, `count` in
    all: as a bitset, or as the ascending codes when they are smaller. A bitset spans every code
    below its highest, and codes are the whole server's: the few users of one (variant, segment)
    among millions of codes took a megabyte each as a bitset, and a rollup of 2 variants x 5,000
    devices gigabytes."""
    if len(fresh) == 0:
        return of
    top = max(int(fresh[-1]), (len(of) * 8 if of.dtype == np.uint8 else int(of[-1]) + 1 if len(of) else 0)) + 1
    if (top + 63) // 64 * 8 <= 4 * count:
        if of.dtype != np.uint8:
            of = kernels.add_users(np.zeros(0, np.uint8), of)[0]
        return _words(kernels.add_users(of, fresh)[0])
    if of.dtype == np.uint8:
        of = np.flatnonzero(np.unpackbits(of, bitorder="little")).astype(_CODES)
    return _inserted(of, np.searchsorted(of, fresh), fresh.astype(_CODES))


def _words(bits: np.ndarray) -> np.ndarray:
    """The bitset padded to whole 64-bit words (what `ranks` reads)."""
    return bits if len(bits) % 8 == 0 else np.concatenate([bits, np.zeros(-len(bits) % 8, np.uint8)])


def _inserted(values: np.ndarray, at: np.ndarray, new: np.ndarray) -> np.ndarray:
    return np.insert(values, at, new) if len(new) else values


#: (users, converted users, conversions, revenue, centered sums of squares of revenue and of
#: conversions per user, their co-moment, events).
Moments = tuple[int, int, int, float, float, float, float, int]


def moments(users: int, conversions: np.ndarray, revenue: np.ndarray, events: int) -> Moments:
    """The moments of `users` users, those with a value having these totals: every user counted,
    those without a value by their deviation from the mean, as kernels.centered_user_moments does."""
    n = users
    total_conversions, total_revenue = int(conversions.sum(dtype=np.int64)), float(revenue.sum())
    mean_x, mean_y = (total_revenue / n, total_conversions / n) if n else (0.0, 0.0)
    dx, dy = revenue - mean_x, conversions - mean_y
    without = n - len(revenue)
    return (n, int(np.count_nonzero(conversions)), total_conversions, total_revenue,
            without * mean_x * mean_x + float(dx @ dx), without * mean_y * mean_y + float(dy @ dy),
            without * mean_x * mean_y + float(dx @ dy), events)


class RollupWanted(NamedTuple):
    """A test's rollup, as asked for: from how many sealed events, and what it holds (HOURLY,
    DIMENSIONS)."""

    events: int
    holds: frozenset[str]


@dataclass(frozen=True)
class VariantTotals:
    """One variant's users: a bitset over user codes (as PartitionView's; without hours, their
    ascending codes when that is smaller: `with_members`) and each one's first hour, in code order; per user with a conversion or revenue, their totals and first
    conversion hour; and per hour with events, its events, conversions and revenue."""

    bits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    users: int = 0
    first_hour: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # per user, in code order
    active: np.ndarray = field(default_factory=lambda: np.zeros(0, _CODES))  # ascending codes
    conversions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # per active user
    revenue: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # per active user
    first_conversion_hour: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # or NO_HOUR
    hours: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ascending, each with events
    hour_events: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    hour_conversions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    hour_revenue: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    events: int = 0

    def merged(self, ts: np.ndarray, user: np.ndarray, conversion: np.ndarray, revenue: np.ndarray, kept: bool,
               hourly: bool) -> tuple[VariantTotals, np.ndarray]:
        """These totals with the rows (of this variant) added, and the users new to it; arrays
        copied, never written. Without `kept` (one Summary's, not a part's), only what Summary
        reads is merged: the users' count and the per-user totals; without `hourly`, the users'
        bitset too, but no first hours and no hours (what Timeseries reads)."""
        hour = ts // HOUR_NS
        seen, seen_first = first_per_user(user, hour)
        present = members(seen, self.bits)
        fresh = seen[~present]
        valued = np.flatnonzero(conversion.astype(bool) | (revenue != 0))
        au, ac, ar, af = per_user(user[valued], hour[valued], conversion[valued], revenue[valued])
        at = np.searchsorted(self.active, au)
        found = contains(self.active, au)
        conversions, values, converted = self.conversions, self.revenue, self.first_conversion_hour
        if found.any():
            conversions, values = conversions.copy(), values.copy()
            conversions[at[found]] += ac[found].astype(conversions.dtype)  # each user once: no repeated index
            values[at[found]] += ar[found]
        new = ~found
        totals = dict(users=self.users + len(fresh), active=_inserted(self.active, at[new], au[new]),
                      conversions=_inserted(conversions, at[new], ac[new]),
                      revenue=_inserted(values, at[new], ar[new]), events=self.events + len(user))
        if not kept:
            return VariantTotals(**totals), fresh
        if not hourly:
            return VariantTotals(bits=with_members(self.bits, fresh, totals["users"]), **totals), fresh
        if found.any():
            converted = converted.copy()
            converted[at[found]] = np.minimum(converted[at[found]], af[found])
        where = ranks(self.bits, seen)
        first = self.first_hour
        if present.any():
            first = first.copy()
            first[where[present]] = np.minimum(first[where[present]], seen_first[present])
        hours, order, starts = runs(hour)
        new_hours = hours[~contains(self.hours, hours)]
        merged_hours = _inserted(self.hours, np.searchsorted(self.hours, new_hours), new_hours)
        old, added = np.searchsorted(merged_hours, self.hours), np.searchsorted(merged_hours, hours)

        def per_hour(before: np.ndarray, more: np.ndarray) -> np.ndarray:
            out = np.zeros(len(merged_hours), dtype=more.dtype)
            out[old] = before
            out[added] += more
            return out

        return VariantTotals(
            bits=_words(kernels.add_users(self.bits, fresh)[0]),
            first_hour=_inserted(first, where[~present], seen_first[~present]),
            first_conversion_hour=_inserted(converted, at[new], af[new]), hours=merged_hours,
            hour_events=per_hour(self.hour_events, np.diff(np.append(starts, len(order)))),
            hour_conversions=per_hour(self.hour_conversions, np.add.reduceat(conversion[order].astype(np.int64), starts)
                                      if len(order) else np.zeros(0, np.int64)),
            hour_revenue=per_hour(self.hour_revenue, np.add.reduceat(revenue[order].astype(np.float64), starts)
                                  if len(order) else np.zeros(0)),
            **totals), fresh

    def series(self, ts: np.ndarray, user: np.ndarray, conversion: np.ndarray, revenue: np.ndarray, bucket
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per bucket (`bucket` maps hours to bucket numbers) of these totals with the rows added:
        (the buckets with events, ascending; their events, conversions, revenue, users first seen
        and users first converting), without merging the rows in."""
        hour = ts // HOUR_NS
        seen, seen_first = first_per_user(user, hour)
        present = kernels.has_users(self.bits, seen)
        old = self.first_hour[ranks(self.bits, seen[present])]
        earlier = seen_first[present] < old  # users whose first event came late
        converting = np.flatnonzero(conversion.astype(bool))
        cu, _, _, cf = per_user(user[converting], hour[converting], conversion[converting], revenue[converting])
        found = contains(self.active, cu)
        was = np.full(len(cu), NO_HOUR, dtype=np.int32)  # each one's first conversion hour so far
        was[found] = self.first_conversion_hour[np.searchsorted(self.active, cu[found])]
        moved = cf < was
        buckets = kernels.distinct_values(bucket(np.concatenate([self.hours, hour])))

        lo, span = (int(buckets[0]), int(buckets[-1] - buckets[0]) + 1) if len(buckets) else (0, 0)

        def count(hours: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
            if span <= _DENSE_BUCKETS:  # counted by bucket number, then the buckets with events picked
                return np.bincount(bucket(hours) - lo, weights=weights, minlength=span)[buckets - lo]
            return np.bincount(np.searchsorted(buckets, bucket(hours)), weights=weights, minlength=len(buckets))

        first_converted = self.first_conversion_hour[self.first_conversion_hour != NO_HOUR]
        out = {"events": count(self.hours, self.hour_events) + count(hour),
               "conversions": count(self.hours, self.hour_conversions) + count(hour[converting]),
               "total_revenue": count(self.hours, self.hour_revenue) + count(hour, revenue.astype(np.float64)),
               "users": count(self.first_hour) + count(seen_first[~present]) + count(seen_first[present][earlier])
               - count(old[earlier]),
               "converted_users": count(first_converted) + count(cf[moved]) - count(was[moved & (was != NO_HOUR)])}
        return buckets, {k: v if k == "total_revenue" else np.rint(v).astype(np.int64) for k, v in out.items()}

    def moments(self) -> Moments:
        return moments(self.users, self.conversions, self.revenue, self.events)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.bits, self.first_hour, self.active, self.conversions, self.revenue,
                                      self.first_conversion_hour, self.hours, self.hour_events,
                                      self.hour_conversions, self.hour_revenue))


_SEGMENT_BITS = 16  # variant and segment codes are uint16
_USER_BITS = 31  # user codes are non-negative int32


def _group_keys(cols: dict[str, np.ndarray], segment: np.ndarray) -> np.ndarray:
    """Each row's (variant, segment) group as one int64."""
    return cols["variant"].astype(np.int64) << _SEGMENT_BITS | segment.astype(np.int64)


def _group(key: int) -> tuple[int, int]:
    return key >> _SEGMENT_BITS, key & ((1 << _SEGMENT_BITS) - 1)


def _grouped(groups: dict[tuple[int, int], VariantTotals], segment: np.ndarray, cols: dict[str, np.ndarray]
             ) -> dict[tuple[int, int], VariantTotals]:
    """Per (variant code, segment code) totals with the rows added (no hours: Segments reads none)."""
    out = dict(groups)
    keys, order, starts = runs(_group_keys(cols, segment))
    bounds = np.append(starts, len(order))
    for k, key in enumerate(keys.tolist()):
        rows = order[bounds[k]:bounds[k + 1]]
        group = _group(key)
        out[group] = out.get(group, VariantTotals()).merged(
            *(cols[c][rows] for c in ("timestamp", "user_id", "conversion", "revenue")), True, False)[0]
    return out


def _grouped_moments(groups: dict[tuple[int, int], VariantTotals], segment: np.ndarray, cols: dict[str, np.ndarray]
                     ) -> dict[tuple[int, int], Moments]:
    """Per (variant code, segment code) the moments of its totals with the rows added, merged
    for one answer only: the rows are summed per (group, user) once, for every group at once,
    and each group's users with a value updated from them (a tail spreads over many groups)."""
    out = {}
    if len(cols["user_id"]):
        keys, order, starts = runs(_group_keys(cols, segment) << _USER_BITS | cols["user_id"].astype(np.int64))
        conversions = np.add.reduceat(cols["conversion"][order].astype(np.int64), starts)
        revenue = np.add.reduceat(cols["revenue"][order].astype(np.float64), starts)
        events = np.diff(np.append(starts, len(order)))
        users, group = (keys & ((1 << _USER_BITS) - 1)).astype(_CODES), keys >> _USER_BITS
        bounds = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1], [True])))
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            key = _group(int(group[a]))
            old = groups.get(key, VariantTotals())
            u, c, r = users[a:b], conversions[a:b], revenue[a:b]
            new_users = int(np.count_nonzero(~members(u, old.bits)))
            valued = np.flatnonzero((c != 0) | (r != 0))
            u, c, r = u[valued], c[valued], r[valued]
            found = contains(old.active, u)
            at = np.searchsorted(old.active, u[found])
            x, y = old.revenue.copy(), old.conversions.astype(np.int64)
            x[at] += r[found]  # each user once: no repeated index
            y[at] += c[found]
            out[key] = moments(old.users + new_users, np.concatenate([y, c[~found]]), np.concatenate([x, r[~found]]),
                               old.events + int(events[a:b].sum()))
    return out | {key: g.moments() for key, g in groups.items() if key not in out}


@dataclass(frozen=True)
class Rollup:
    """A test's totals per variant (by variant code), its distinct users and those seen in more
    than one variant; per dimension it holds, per (variant, segment) totals."""

    variants: dict[int, VariantTotals] = field(default_factory=dict)
    users: int = 0
    several: int = 0
    holds: frozenset[str] = frozenset()  # HOURLY and DIMENSIONS: what it can answer beside Summary
    segments: dict[str, dict[tuple[int, int], VariantTotals]] = field(default_factory=dict)

    @property
    def hourly(self) -> bool:
        """With first hours and hours: cumulative Timeseries can be answered from it."""
        return HOURLY in self.holds

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
                cols["timestamp"][rows], user[rows], cols["conversion"][rows], cols["revenue"][rows], kept,
                self.hourly)
            fresh.append(new)
        users, gained = _distinct(np.concatenate(fresh))  # each user new to a variant, and to how many
        before = np.zeros(len(users), dtype=np.int64)  # the variants each had events in
        for totals in self.variants.values():
            before += members(users, totals.bits)
        segments = self.segments if not kept else {  # one Summary's reads no segments
            dim: _grouped(self.segments.get(dim, {}), cols[dim], cols) for dim in DIMENSIONS if dim in self.holds}
        return Rollup(variants, self.users + int(np.count_nonzero(before == 0)),
                      self.several + int(np.count_nonzero((before + gained > 1) & (before < 2))), self.holds,
                      segments)

    def segment_moments(self, dimension: str, cols: dict[str, np.ndarray]) -> dict[tuple[int, int], Moments]:
        """Per (variant, segment) of `dimension`, the moments of its totals with rows added."""
        return _grouped_moments(self.segments[dimension], cols[dimension], cols)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for groups in (self.variants, *self.segments.values()) for v in groups.values())
