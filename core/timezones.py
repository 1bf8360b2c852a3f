"""Day and week buckets in a named time zone.

A day in Europe/Madrid starts at its local midnight, so the day the clocks go forward has 23
hours and the day they go back 25. An event's local wall-clock time is its UTC instant plus the
offset in force at that instant, and its bucket is the day (or week) of that wall-clock time,
counted exactly as UTC buckets are. Over any range there are few offsets (two changes a year
where clocks change), so both engines add a piecewise-constant offset — a searchsorted in
numpy, a multiIf in SQL — instead of looking up a zone per event. The offsets and the bucket
starts come from the standard library's zoneinfo (the system's IANA database), here, once per
query, so both engines agree.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from abstream.core.errors import InvalidArgument
from abstream.core.events import NS_PER_SECOND
from abstream.core.types import Interval

_DAY_S = 86_400


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument("time_zone", f"{name[:64]!r} is not an IANA time zone name (such as "
                                           "'Europe/Madrid' or 'America/New_York')") from None


@dataclass(frozen=True)
class Offsets:
    """The UTC offsets in force over a range: `offsets[0]` before `changes[0]`, `offsets[i + 1]`
    from `changes[i]` on (all ns; changes ascending)."""

    changes: tuple[int, ...]
    offsets: tuple[int, ...]

    def local_ns(self, ts: np.ndarray) -> np.ndarray:
        """Wall-clock times, as ns since the epoch of a clock that reads local time."""
        at = np.searchsorted(np.array(self.changes, dtype=np.int64), ts, side="right")
        return ts + np.array(self.offsets, dtype=np.int64)[at]


def _offset_s(tz: ZoneInfo, second: int) -> int:
    return int(dt.datetime.fromtimestamp(second, tz).utcoffset().total_seconds())


def offsets(time_zone: str, first_ns: int, last_ns: int) -> Offsets:
    """The zone's offsets between two instants: sampled once a day, each change found to the
    second by bisection (zones change at whole seconds)."""
    tz = zone(time_zone)
    first, last = first_ns // NS_PER_SECOND, -(-last_ns // NS_PER_SECOND)
    samples = list(range(first, last, _DAY_S)) + [last]
    values = [_offset_s(tz, s) for s in samples]
    changes, out = [], [values[0]]
    for (a, b), (va, vb) in zip(zip(samples, samples[1:]), zip(values, values[1:])):
        if va == vb:
            continue
        low, high = a, b  # offset(low) == va, offset(high) != va
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if _offset_s(tz, middle) == va else (low, middle)
        changes.append(high * NS_PER_SECOND)
        out.append(vb)
    return Offsets(tuple(changes), tuple(v * NS_PER_SECOND for v in out))


def bucket_index(local_ns: np.ndarray, interval: Interval) -> np.ndarray:
    """Each wall-clock time's day or week, counted as UTC's are (from the interval's origin)."""
    return (local_ns - interval.origin_ns) // interval.width_ns


def bucket_starts(time_zone: str, interval: Interval, index: np.ndarray) -> np.ndarray:
    """The UTC instant each local day or week begins: its local midnight (the first instant of
    the day where midnight itself is skipped)."""
    tz = zone(time_zone)
    out = np.empty(len(index), dtype=np.int64)
    for i, k in enumerate(index.tolist()):
        wall = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=(interval.origin_ns + k * interval.width_ns) // 1000)
        out[i] = int(wall.replace(tzinfo=tz).timestamp()) * NS_PER_SECOND
    return out
