"""Responses encoded column by column equal the same responses built message by message."""

from __future__ import annotations

import numpy as np
from abstream.core.types import MetricColumns, QueryStats, SegmentsResult, SummaryResult, TimeseriesResult
from abstream.service import converters
from abstream.store import Dimension, Interval
from abstream.v1 import analytics_pb2 as pb

N = 7
EDGE = MetricColumns(
    events=np.array([0, 1, 127, 128, 16383, 16384, 2**63 - 1], dtype=np.int64),
    conversions=np.array([0, 0, 1, 300, 2**40, 5, 2**62], dtype=np.int64),
    total_revenue=np.array([0.0, -0.0, -12.5, 1e300, 5e-324, 84.55, -1e-9]),
    users=np.array([1, 1, 2, 3, 2**35, 7, 2**63 - 1], dtype=np.int64),
    converted_users=np.array([0, 1, 1, 2, 2**35, 0, 1], dtype=np.int64),
)
VARIANTS = ["control", "", "変種", "control", "B" * 300, "", "x"]


def expected_rows(columns: MetricColumns) -> list[pb.Metrics]:
    names = list(columns.columns())
    return [pb.Metrics(**dict(zip(names, values))) for values in zip(*(c.tolist() for c in columns.columns().values()))]


def test_summary_rows():
    result = SummaryResult("t", VARIANTS, EDGE, QueryStats(5, 1234))
    response = converters.summary_response(result)
    assert response == pb.SummaryResponse(
        test_id="t", rows=[pb.SummaryRow(variant=v, metrics=m) for v, m in zip(VARIANTS, expected_rows(EDGE))],
        stats=pb.QueryStats(events_scanned=5, elapsed={"nanos": 1234}))
    assert response.rows[3].metrics.total_revenue == 1e300


def test_segments_rows():
    segments = ["US", "日本", "", "US", "AU", "a" * 129, "US"]
    result = SegmentsResult("t", Dimension.COUNTRY, VARIANTS, segments, EDGE, QueryStats(1, 2))
    response = converters.segments_response(result)
    assert list(response.rows) == [pb.SegmentRow(variant=v, segment=s, metrics=m)
                                   for v, s, m in zip(VARIANTS, segments, expected_rows(EDGE))]
    assert response.dimension == pb.DIMENSION_COUNTRY


def test_timeseries_rows_including_negative_and_fractional_instants():
    buckets = np.array([0, -86_400_000_000_000, 1_745_798_400_000_000_000, 1, 999_999_999, -1,
                        9_000_000_000_000_000_000], dtype=np.int64)
    result = TimeseriesResult("t", Interval.WEEK, True, buckets, VARIANTS, EDGE, QueryStats(1, 2))
    response = converters.timeseries_response(result)
    assert list(response.rows) == [pb.TimeseriesRow(bucket_start=converters.to_timestamp(b), variant=v, metrics=m)
                                   for b, v, m in zip(buckets.tolist(), VARIANTS, expected_rows(EDGE))]
    assert response.cumulative and response.interval == pb.INTERVAL_WEEK


def test_empty_results():
    empty = MetricColumns(*(np.zeros(0, dtype=np.int64) for _ in range(5)))
    assert list(converters.summary_response(SummaryResult("t", [], empty, QueryStats(0, 0))).rows) == []


def test_field_numbers_from_16_take_two_byte_tags():
    from abstream.service import wire

    rows = wire.Message([(20, "varint", np.array([1, 300], dtype=np.int64))], 2)
    # field 1 (length-delimited) holding field 20 (varint): tag 20 << 3 = 160 = A0 01
    assert wire.repeated_field(1, rows) == bytes.fromhex("0a03a00101" "0a04a001ac02")
