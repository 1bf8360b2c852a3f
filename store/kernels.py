"""Pure numpy kernels the queries are made of. No Python loop over events in here.

Shapes: `group` holds dense group ids in [0, n_groups); `user` holds user codes in [0, n_users);
all per-event arrays of one call have the same length.
"""

from __future__ import annotations

import numpy as np
from abstream.core.types import about_means
from abstream.store import _kernels

_INT64_SAFE = 1 << 62


def time_slice(ts: np.ndarray, start_ns: int, end_ns: int) -> slice:
    """Rows of a timestamp-sorted array with start_ns <= ts <= end_ns (both inclusive)."""
    lo = int(np.searchsorted(ts, start_ns, side="left"))
    hi = int(np.searchsorted(ts, end_ns, side="right"))
    return slice(lo, max(lo, hi))


def ranked_codes(codes: np.ndarray, cardinality: int, rank_of_present) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids for dictionary codes, ordered by `rank_of_present(present_codes)`.

    Returns (dense id per event, present codes in dense-id order). `rank_of_present` gets the
    sorted distinct codes and returns the permutation that orders them (e.g. by decoded name).
    """
    present = np.zeros(cardinality, dtype=bool)
    present[codes] = True
    present_codes = np.flatnonzero(present)
    ordered = present_codes[rank_of_present(present_codes)]
    remap = np.zeros(cardinality, dtype=np.int64)
    remap[ordered] = np.arange(len(ordered), dtype=np.int64)
    return remap[codes], ordered


def distinct_values(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a small array (cheaper than np.unique's hash table there);
    of 8- and 16-bit codes (a part's variants), counted rather than sorted."""
    if len(values) == 0:
        return values
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(values)).astype(values.dtype)
    s = np.sort(values)
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def add_users(bits: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, int]:
    """(a new bitset: `bits` with `users` set, how many of them were not set before); the bits
    are little-endian over user codes."""
    if len(users) == 0:
        return bits, 0
    top = int(users.max()) + 1
    out = np.zeros(max(len(bits), (top + 7) // 8), dtype=np.uint8)
    out[: len(bits)] = bits
    added = _kernels.set_bits(out, users if users.dtype in (np.int32, np.int64) else users.astype(np.int64))
    return out, added


def has_users(bits: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Which of these user codes are set in the bitset."""
    inside = (users >> 3) < len(bits)
    seen = np.zeros(len(users), dtype=bool)
    u = users[inside]
    seen[inside] = (bits[u >> 3] & (1 << (u & 7)).astype(np.uint8)) != 0
    return seen


def dense_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids for small non-negative ints, in value order: (id per event, distinct values)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo = int(values.min())
    shifted = values - lo
    present = np.zeros(int(shifted.max()) + 1, dtype=bool)
    present[shifted] = True
    remap = np.cumsum(present, dtype=np.int64) - 1
    return remap[shifted], np.flatnonzero(present) + lo


#: Largest flag table (groups x user span) worth filling instead of sorting, and how many flags
#: per event it may cost: scattering and counting a flag is ~100x cheaper than sorting a key.
_FLAGS_MAX = 1 << 27
_FLAGS_PER_EVENT = 64


def distinct_per_group(group: np.ndarray, user: np.ndarray, n_groups: int, across: bool = False):
    """Distinct users per group (int64[n_groups]); with `across`, also the distinct users over
    all groups and the users (codes, ascending) seen in more than one group (Summary's health:
    users an assignment bug put in several variants), from the same table or sort.

    Few groups: set a flag per (group, user) in a dense table and count them. Otherwise sort
    (group, user) keys and count first occurrences; np.unique is avoided, being hash-based and
    far slower on large inputs.
    """
    if len(group) == 0:
        none = np.zeros(n_groups, dtype=np.int64)
        return (none, 0, np.zeros(0, dtype=np.int64)) if across else none
    lo = int(user.min())
    span = -(-(int(user.max()) - lo + 1) // 8) * 8  # whole words per row (the sum across rows below)
    cells = n_groups * span
    if cells <= _FLAGS_MAX and cells <= _FLAGS_PER_EVENT * len(group):
        flags = np.zeros(cells, dtype=bool)
        flags[group.astype(np.int64) * span + (user - lo)] = True
        table = flags.reshape(n_groups, span)
        if n_groups > 256:
            counts = np.count_nonzero(table, axis=1).astype(np.int64)
        else:  # row by row: count_nonzero without an axis is a fast popcount; with one it sums bools
            counts = np.array([np.count_nonzero(row) for row in table], dtype=np.int64)
        if not across:
            return counts
        if n_groups == 1:
            return counts, int(counts[0]), np.zeros(0, dtype=np.int64)
        if n_groups == 2:  # most tests: the users in both rows
            both = np.logical_and(table[0], table[1])
            several = int(np.count_nonzero(both))
            return counts, int(counts.sum()) - several, (np.flatnonzero(both) + lo if several else
                                                         np.zeros(0, dtype=np.int64))
        if n_groups < 256:  # each user's groups, a byte each, summed eight at a time (no byte overflows)
            groups_of = flags.view(np.uint64).reshape(n_groups, span // 8).sum(axis=0).view(np.uint8)
        else:
            groups_of = table.sum(axis=0, dtype=np.uint16)
        distinct = int(np.count_nonzero(groups_of))
        if distinct == counts.sum():  # no one is in two groups: the usual case, and no scan for them
            return counts, distinct, np.zeros(0, dtype=np.int64)
        return counts, distinct, np.flatnonzero(groups_of > 1) + lo
    key = pair_keys(group, user - lo, span, n_groups)
    sort_keys(key)
    first = np.empty(len(key), dtype=bool)
    first[0] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    pairs = key[first]
    counts = np.bincount(pairs // span, minlength=n_groups)
    if not across:
        return counts
    users = (pairs % span).astype(np.int64)  # one per (group, user)
    sort_keys(users)
    starts = np.empty(len(users), dtype=bool)
    starts[0] = True
    np.not_equal(users[1:], users[:-1], out=starts[1:])
    repeated = np.zeros(len(users), dtype=bool)
    repeated[:-1] = ~starts[1:]  # the next pair has the same user
    return counts, int(np.count_nonzero(starts)), np.unique(users[repeated]) + lo


def sort_keys(keys: np.ndarray, in_order_bits: int = 0) -> None:
    """Sorts non-negative integer keys in place: a radix sort in C (`_kernels.c`), several
    times faster than numpy's sort on these machines, for the 32- and 64-bit keys here. The
    lowest `in_order_bits` bits ascend already among keys equal above them (a row number)."""
    if keys.dtype in (np.uint32, np.uint64, np.int64, np.int32) and keys.flags.c_contiguous and keys.flags.writeable:
        _kernels.sort_unsigned(keys, in_order_bits)
    else:
        keys.sort()


def sorted_with_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys sorted, the stable permutation that sorts them) for non-negative int64 keys: each
    key's row number rides in its low bits through `sort_keys` when both fit in 63 bits, which
    is faster than numpy's stable argsort."""
    row_bits = max(len(keys) - 1, 1).bit_length()
    if len(keys) == 0 or int(keys.max()) >= 1 << (63 - row_bits):
        order = np.argsort(keys, kind="stable")
        return keys[order], order
    packed = keys.astype(np.int64) << row_bits
    packed |= np.arange(len(keys), dtype=np.int64)
    sort_keys(packed, row_bits)  # the rows ascend as they are: a stable sort of the keys above them
    return packed >> row_bits, packed & ((1 << row_bits) - 1)


def pair_keys(group: np.ndarray, offset: np.ndarray, span: int, n_groups: int) -> np.ndarray:
    """group * span + offset, as uint32 when every key fits: half the bytes for the radix sort
    to move (2.3 vs 3.6 ms for a typical test's 207k keys; the sort is most of a Segments query)."""
    dtype = np.uint32 if n_groups * span <= 1 << 32 else np.int64
    key = group.astype(dtype)
    key *= dtype(span)
    key += offset.astype(dtype, copy=False)
    return key


def first_bucket_per_key(key: np.ndarray, bucket: np.ndarray, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct key, the smallest bucket it occurs in: (keys, first buckets)."""
    if len(key) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if (int(key.max()) + 1) * n_buckets < _INT64_SAFE:
        combined = key.astype(np.int64) * n_buckets + bucket
        sort_keys(combined)
        keys, buckets = np.divmod(combined, n_buckets)
    else:
        order = np.lexsort((bucket, key))
        keys, buckets = key[order].astype(np.int64), bucket[order].astype(np.int64)
    first = np.empty(len(keys), dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return keys[first], buckets[first]


def group_totals(
    group: np.ndarray, user: np.ndarray, conversion: np.ndarray, revenue: np.ndarray,
    n_groups: int, across: list | None = None,
) -> dict[str, np.ndarray]:
    """Events, conversions, revenue, distinct users and distinct converted users per group; the
    distinct users over all groups and those in several are appended to `across` if given."""
    converted = np.flatnonzero(conversion.astype(bool))  # indices: few rows convert, and taking is cheaper
    converted_group = group[converted]
    users = distinct_per_group(group, user, n_groups, across is not None)
    if across is not None:
        users, *found = users
        across += found
    return {
        "events": np.bincount(group, minlength=n_groups),
        "conversions": np.bincount(converted_group, minlength=n_groups),
        "total_revenue": np.bincount(group, weights=revenue, minlength=n_groups),
        "users": users,
        "converted_users": distinct_per_group(converted_group, user[converted], n_groups),
    }


def cumulative_totals(
    bucket: np.ndarray, variant: np.ndarray, user: np.ndarray, conversion: np.ndarray,
    revenue: np.ndarray, n_buckets: int, n_variants: int, n_users: int,
) -> dict[str, np.ndarray]:
    """Totals per (bucket, variant) counting everything up to and including the bucket.

    Each result is shaped (n_buckets, n_variants). A user counts in the bucket of their first
    event (or first conversion), so running sums of those counts are running distinct counts.
    """
    shape = (n_buckets, n_variants)
    group = bucket.astype(np.int64) * n_variants + variant
    n_groups = n_buckets * n_variants
    converted = conversion.astype(bool)

    def first_seen(mask: np.ndarray | None) -> np.ndarray:
        v, u, b = (variant, user, bucket) if mask is None else (variant[mask], user[mask], bucket[mask])
        keys, firsts = first_bucket_per_key(v.astype(np.int64) * n_users + u, b, n_buckets)
        return np.bincount(firsts * n_variants + keys // n_users, minlength=n_groups)

    totals = {
        "events": np.bincount(group, minlength=n_groups),
        "conversions": np.bincount(group[converted], minlength=n_groups),
        "total_revenue": np.bincount(group, weights=revenue, minlength=n_groups),
        "users": first_seen(None),
        "converted_users": first_seen(converted),
    }
    return {name: np.cumsum(values.reshape(shape), axis=0) for name, values in totals.items()}


def bucket_index(ts: np.ndarray, origin_ns: int, width_ns: int) -> np.ndarray:
    """Index of the width-aligned bucket each timestamp falls in, counted from origin_ns."""
    return np.floor_divide(ts - origin_ns, width_ns)


def centered_user_moments(group: np.ndarray, user: np.ndarray, x: np.ndarray, y: np.ndarray, n_users_total: int,
                          users: np.ndarray, total_x: np.ndarray, total_y: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group, over its users' totals x_u and y_u (revenue and conversions): the centered sums
    of squares of each, and their centered co-moment (revenue per conversion's covariance term),
    from one sort of the rows.

    Pass only the rows where x or y is nonzero: every other user has x_u = y_u = 0, and there are
    users[g] users in group g with sums total_x[g], total_y[g]. Deviations are taken from the
    means, never as sum(x^2) - n mean^2, which cancels catastrophically for large means.
    """
    n_groups = len(users)
    mean_x = np.divide(total_x, users, out=np.zeros(n_groups), where=users > 0)
    mean_y = np.divide(total_y, users, out=np.zeros(n_groups), where=users > 0)
    if len(group) == 0:
        return users * mean_x * mean_x, users * mean_y * mean_y, users * mean_x * mean_y
    key = group.astype(np.int64) * max(n_users_total, 1) + user
    key, order = sorted_with_order(key)
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    g = key[starts] // max(n_users_total, 1)
    dx = np.add.reduceat(x[order].astype(np.float64), starts) - mean_x[g]
    dy = np.add.reduceat(y[order].astype(np.float64), starts) - mean_y[g]
    without = np.maximum(users - np.bincount(g, minlength=n_groups), 0)
    return (without * mean_x * mean_x + np.bincount(g, weights=dx * dx, minlength=n_groups),
            without * mean_y * mean_y + np.bincount(g, weights=dy * dy, minlength=n_groups),
            without * mean_x * mean_y + np.bincount(g, weights=dx * dy, minlength=n_groups))


def session_user_moments(group: np.ndarray, user: np.ndarray, sessions: tuple[np.ndarray, object],
                         conversion: np.ndarray, n_users_total: int, n_groups: int) -> tuple[np.ndarray, ...]:
    """Per group, over the per-user totals of these rows (each user's events e_u, distinct
    sessions s_u, conversions c_u): the sums of e and s, the centered sums of squares of e and s,
    and the centered co-moments of c and of e with s: the delta method's terms of conversions
    and events per session. `sessions` holds each row's session id as an Arrow string array's
    (int32 offsets[n + 1], data), as `core.events.string_buffers` gives them."""
    zeros = np.zeros(n_groups)
    if len(group) == 0:
        return zeros, zeros, zeros, zeros, zeros, zeros
    unit_sorted, order = sorted_with_order(group.astype(np.int64) * max(n_users_total, 1) + user)
    starts = np.flatnonzero(np.concatenate(([True], unit_sorted[1:] != unit_sorted[:-1])))
    g = unit_sorted[starts] // max(n_users_total, 1)
    bounds = np.append(starts, len(order)).astype(np.int64)
    moments = np.zeros((6, n_groups))
    offsets, data = sessions
    _kernels.session_moments(np.ascontiguousarray(offsets, np.int32), data, np.ascontiguousarray(conversion, np.uint8),
                             order.astype(np.int64, copy=False), bounds, g.astype(np.int64, copy=False), moments)
    return tuple(moments)


# ---- capping ------------------------------------------------------------------------------

def user_sums(group: np.ndarray, user: np.ndarray, x: np.ndarray, n_users_total: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(the group, the sum of x) of each (group, user) among the rows given."""
    if len(group) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    key, order = sorted_with_order(group.astype(np.int64) * max(n_users_total, 1) + user)
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    return key[starts] // max(n_users_total, 1), np.add.reduceat(x[order].astype(np.float64), starts)


def kth_smallest(values: np.ndarray, zeros: int, k: int) -> float:
    """The k-th smallest (from 1) of `values` and `zeros` more zeros."""
    negative = np.sort(values[values < 0])
    if k <= len(negative):
        return float(negative[k - 1])
    if k <= len(negative) + zeros:
        return 0.0
    positive = values[values > 0]
    return float(np.partition(positive, k - len(negative) - zeros - 1)[k - len(negative) - zeros - 1])


def capped_user_moments(group: np.ndarray, x: np.ndarray, users: np.ndarray, threshold: float
                        ) -> tuple[np.ndarray, np.ndarray, int]:
    """Per group of users[g] users, of whom those listed have totals x (the others none): the sum
    and centered sum of squares of min(total, threshold), and how many users it lowered."""
    n = len(users)
    unlisted = np.maximum(users - np.bincount(group, minlength=n), 0)
    zero = min(0.0, threshold)
    kept = np.minimum(x, threshold)
    sums = np.bincount(group, weights=kept, minlength=n) + unlisted * zero
    mean = np.divide(sums, users, out=np.zeros(n), where=users > 0)
    d = kept - mean[group]
    m2 = np.bincount(group, weights=d * d, minlength=n) + unlisted * (zero - mean) ** 2
    lowered = int(np.count_nonzero(x > threshold)) + (int(unlisted.sum()) if threshold < 0 else 0)
    return sums, m2, lowered


def cumulative_user_moments(bucket: np.ndarray, variant: np.ndarray, user: np.ndarray, x: np.ndarray, y: np.ndarray,
                            n_users: int, users: np.ndarray, sum_x: np.ndarray, sum_y: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (bucket, variant), over the users seen by the end of the bucket, of their totals so
    far x_u, y_u: the centered sums of squares of each and their co-moment, each shaped
    (n_buckets, n_variants), as `users`, `sum_x` and `sum_y` are (the running count of users
    seen and running sums: cumulative_totals').

    Rows are the events with x or y nonzero. A user's running totals change only in the buckets
    of those rows, so each such (user, bucket) adds what it changes of sum((x - c)^2) (from its
    total before to after); a user seen with nothing yet adds (0 - c)^2, counted with `users`.
    Centering on each variant's final means `c` keeps the squares from cancelling."""
    shape = n_buckets, n_variants = users.shape
    n = users.astype(np.float64)
    center_x = np.divide(sum_x[-1], n[-1], out=np.zeros(n_variants), where=n[-1] > 0)
    center_y = np.divide(sum_y[-1], n[-1], out=np.zeros(n_variants), where=n[-1] > 0)
    n_new = np.diff(users, axis=0, prepend=np.zeros((1, n_variants), dtype=users.dtype)).astype(np.float64)
    cx, cy = center_x[None, :], center_y[None, :]
    qx, qy, qxy = n_new * cx * cx, n_new * cy * cy, n_new * cx * cy
    if len(bucket):
        key = (variant.astype(np.int64) * n_users + user) * n_buckets + bucket
        key, order = sorted_with_order(key)
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        k = key[starts]
        b, vu = k % n_buckets, k // n_buckets
        v = vu // n_users
        dx = np.add.reduceat(x[order].astype(np.float64), starts)
        dy = np.add.reduceat(y[order].astype(np.float64), starts)
        new_user = np.concatenate(([True], vu[1:] != vu[:-1]))
        run = np.cumsum(new_user) - 1  # which user each (user, bucket) belongs to
        after_x = np.cumsum(dx) - np.concatenate(([0.0], np.cumsum(dx)))[np.flatnonzero(new_user)][run]
        after_y = np.cumsum(dy) - np.concatenate(([0.0], np.cumsum(dy)))[np.flatnonzero(new_user)][run]
        before_x, before_y = after_x - dx, after_y - dy
        ax, bx = after_x - center_x[v], before_x - center_x[v]
        ay, by = after_y - center_y[v], before_y - center_y[v]
        group = b * n_variants + v
        cells = n_buckets * n_variants
        qx = qx + np.bincount(group, weights=ax * ax - bx * bx, minlength=cells).reshape(shape)
        qy = qy + np.bincount(group, weights=ay * ay - by * by, minlength=cells).reshape(shape)
        qxy = qxy + np.bincount(group, weights=ax * ay - bx * by, minlength=cells).reshape(shape)
    return about_means(n, sum_x, sum_y, np.cumsum(qx, axis=0), np.cumsum(qy, axis=0), np.cumsum(qxy, axis=0),
                    center_x, center_y)



def first_per_key(key: np.ndarray, ts: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each row's dense key index, each key's smallest ts, each key's key // n_users)."""
    if len(key) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    sorted_keys, order = sorted_with_order(key.astype(np.int64))
    starts = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    at = np.flatnonzero(starts)
    index = np.empty(len(key), dtype=np.int64)
    index[order] = np.cumsum(starts) - 1
    return index, np.minimum.reduceat(ts[order], at), sorted_keys[at] // n_users
