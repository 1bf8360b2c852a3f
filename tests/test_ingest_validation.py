"""Bad events get a specific rejection in the ack and land in quarantine; their neighbours are stored."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time

import pytest
from abstream.core.events import MAX_STRING_BYTES, MIN_TIMESTAMP_NS
from abstream.store import EventStore
from abstream.v1 import analytics_pb2 as pb

from tests.events import BASE_S, NS, to_message, to_table

GOOD = dict(timestamp=BASE_S * NS, user_id="u1", test_id="val", variant="A", event_type="click",
            conversion=1, revenue=9.5, session_id="s1", device="mobile", country="US")
DAY = 86400 * NS

# (change to a good event, field named in the rejection, words the message must contain)
BAD = [
    (dict(test_id=""), "test_id", "required"),
    (dict(variant=""), "variant", "required"),
    (dict(user_id=""), "user_id", "required"),
    (dict(timestamp=None), "timestamp", "required"),
    (dict(conversion=2), "conversion", "0 or 1, got 2"),
    (dict(revenue=math.nan), "revenue", "finite number, got nan"),
    (dict(revenue=math.inf), "revenue", "finite number, got inf"),
    (dict(revenue=-math.inf), "revenue", "got -inf"),
    (dict(user_id="x" * (MAX_STRING_BYTES + 1)), "user_id", f"{MAX_STRING_BYTES + 1} bytes long"),
    (dict(country="é" * (MAX_STRING_BYTES // 2 + 1)), "country", f"{MAX_STRING_BYTES + 2} bytes long"),
    (dict(session_id="s" * 1000), "session_id", "at most 256"),
    (dict(timestamp=MIN_TIMESTAMP_NS - NS), "timestamp", "outside the accepted window"),
    (dict(timestamp=0), "timestamp", "1970-01-01T00:00:00Z is outside the accepted window"),  # set, not absent
    (dict(timestamp=time.time_ns() + 3 * DAY), "timestamp", "outside the accepted window"),
    (dict(test_id="", conversion=5), "test_id", "required"),  # first failing field in Event order
]


def test_every_bad_event_is_rejected_by_field_and_neighbours_are_kept(stub):
    batch = []
    for change, _, _ in BAD:
        batch.append(GOOD)
        batch.append({**GOOD, **change})
    batch.append({**GOOD, "user_id": "y" * MAX_STRING_BYTES, "timestamp": MIN_TIMESTAMP_NS})  # at the limits
    (ack,) = list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[to_message(e) for e in batch])]),
                                    timeout=30))
    assert ack.accepted == len(BAD) + 1 and ack.rejected == len(BAD)
    assert [r.index for r in ack.rejections] == [2 * i + 1 for i in range(len(BAD))]
    for rejection, (_, field, words) in zip(ack.rejections, BAD):
        assert rejection.field == field
        assert words in rejection.message, rejection.message
        assert field in rejection.message

    rows = stub.Summary(pb.SummaryRequest(test_id="val"), timeout=10).rows
    assert sum(r.metrics.events for r in rows) == len(BAD) + 1
    assert sum(r.metrics.total_revenue for r in rows) == pytest.approx(9.5 * (len(BAD) + 1))

    quarantine = stub.ListQuarantine(pb.ListQuarantineRequest(limit=1000), timeout=10)
    assert quarantine.total == len(BAD)
    newest_first = list(reversed(quarantine.events))
    assert [q.index for q in newest_first] == [r.index for r in ack.rejections]
    assert [q.field for q in newest_first] == [r.field for r in ack.rejections]
    assert newest_first[4].event.conversion == 2 and newest_first[4].event.user_id == "u1"
    assert not newest_first[3].event.HasField("timestamp")
    only_val = stub.ListQuarantine(pb.ListQuarantineRequest(test_id="val", limit=2), timeout=10)
    assert only_val.total == len(BAD) - 2 and len(only_val.events) == 2  # two had an empty test_id


def test_a_timestamp_whose_nanos_are_out_of_range_rejects_its_event(stub):
    events = [to_message({**GOOD, "user_id": f"n{i}"}) for i in range(4)]
    events[1].timestamp.nanos, events[2].timestamp.nanos = 2_000_000_000, -1
    (ack,) = list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=events)]), timeout=30))
    assert (ack.accepted, [(r.index, r.field, r.message) for r in ack.rejections]) == (2, [
        (1, "timestamp", "timestamp nanos must be 0 to 999,999,999, got 2000000000"),
        (2, "timestamp", "timestamp nanos must be 0 to 999,999,999, got -1")])


def test_a_batch_of_only_bad_events_is_acked_and_the_stream_goes_on(stub):
    requests = [
        pb.IngestEventsRequest(events=[to_message({**GOOD, "conversion": 7})] * 3),
        pb.IngestEventsRequest(),
        pb.IngestEventsRequest(events=[to_message(GOOD)]),
    ]
    acks = list(stub.IngestEvents(iter(requests), timeout=30))
    assert [(a.batch, a.accepted, a.rejected) for a in acks] == [(0, 0, 3), (1, 0, 0), (2, 1, 0)]


def test_store_rejects_values_past_a_full_dictionary():
    """A dimension with 16-bit codes holds 65,535 values; the 65,536th is rejected, not wrapped."""
    store = EventStore()
    store._ingest.dicts["device"].capacity = 3  # the same check, reached with a small batch
    events = [{**GOOD, "device": f"d{i}"} for i in range(5)]
    result = store.append(to_table(events))
    assert result.accepted == 3
    assert [(r.index, r.field) for r in result.rejections] == [(3, "device"), (4, "device")]
    assert "limit of 3 distinct values" in result.rejections[0].message


def ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_columnar_batch_with_loose_types_missing_columns_and_a_bad_row(stub):
    import pyarrow as pa

    table = pa.table({
        "timestamp": pa.array([BASE_S, BASE_S + 1, BASE_S + 2], pa.timestamp("s", tz="UTC")),
        "user_id": pa.array(["a", "b", None]).dictionary_encode(),
        "test_id": pa.array(["col", "col", "col"], pa.large_string()),
        "variant": ["x", "y", "x"],
        "conversion": pa.array([True, False, True]),
        # no revenue, session_id, device, country, event_type: defaults
    })
    request = pb.IngestEventsRequest(events=[to_message({**GOOD, "test_id": "col"})], arrow_ipc=ipc(table))
    (ack,) = list(stub.IngestEvents(iter([request]), timeout=30))
    assert (ack.accepted, ack.rejected) == (3, 1)
    assert (ack.rejections[0].index, ack.rejections[0].field) == (3, "user_id")  # counted after the message
    rows = stub.Summary(pb.SummaryRequest(test_id="col"), timeout=10).rows
    assert [(r.variant, r.metrics.events, r.metrics.conversions) for r in rows] == [("A", 1, 1), ("x", 1, 1),
                                                                                    ("y", 1, 0)]
    series = stub.Timeseries(pb.TimeseriesRequest(test_id="col", interval=pb.INTERVAL_MINUTE), timeout=10)
    assert {r.bucket_start.ToSeconds() for r in series.rows} == {BASE_S - BASE_S % 60}


def test_timestamps_as_dictionary_encoded_text_are_read_as_text_is(stub):
    """A dictionary of strings is kept as one for a string field; a timestamp sent so (as Parquet
    readers and Arrow writers may) is text to read as an instant, each unreadable one its event's
    rejection: it was taken for a string field's and failed the whole batch (INTERNAL)."""
    import datetime as dt

    import pyarrow as pa

    when = dt.datetime.fromtimestamp(BASE_S, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    long = "9" * 20_000  # one value for many rows: converted once, not copied to each row first
    table = pa.table({"timestamp": pa.array([when, when, "yesterday"] + [long] * 1_000).dictionary_encode(),
                      "user_id": ["a", "b", "c"] + ["d"] * 1_000, "test_id": ["dictts"] * 1_003,
                      "variant": ["x", "y", "x"] + ["x"] * 1_000})
    (ack,) = list(stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=ipc(table))]), timeout=30))
    assert (ack.accepted, ack.rejected) == (2, 1_001)
    assert [(r.index, r.field) for r in ack.rejections] == [(i, "timestamp") for i in range(2, 1_003)]
    assert "timestamp yesterday is no instant" in ack.rejections[0].message
    assert all(r.message == ack.rejections[1].message and "9999" in r.message for r in ack.rejections[1:])
    rows = stub.Summary(pb.SummaryRequest(test_id="dictts"), timeout=10).rows
    assert [(r.variant, r.metrics.events) for r in rows] == [("x", 1), ("y", 1)]


def test_unreadable_columnar_payloads_fail_the_call_clearly(stub):
    import grpc
    import pyarrow as pa

    with pytest.raises(grpc.RpcError) as caught:
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=b"not arrow")]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "arrow_ipc" in caught.value.details()
    wrong_type = pa.table({"timestamp": pa.array([[1]]), "user_id": ["u"], "test_id": ["t"], "variant": ["v"]})
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=ipc(wrong_type))]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timestamp" in caught.value.details()
    # the server is still fine
    assert stub.Summary(pb.SummaryRequest(test_id="t"), timeout=10).rows == []


def test_a_value_that_cannot_be_converted_rejects_its_event_alone(stub):
    """Values of a convertible type that do not fit (seconds past what nanoseconds hold, a uint64
    past int64, a conversion of 1.5, text that is no time) reject their own events; timestamps
    as text, as the tutorial writes them or in RFC 3339, are read; the message events of the same
    request are kept."""
    import grpc
    import pyarrow as pa

    table = pa.table({
        "timestamp": pa.array([BASE_S, 10**15, BASE_S + 2, BASE_S + 3], pa.timestamp("s")),
        "user_id": ["a", "b", "c", "d"], "test_id": ["conv"] * 4, "variant": ["x"] * 4,
        "conversion": pa.array([1, 0, 2**64 - 1, 0], pa.uint64()),
    })
    request = pb.IngestEventsRequest(events=[to_message({**GOOD, "test_id": "conv"})], arrow_ipc=ipc(table))
    (ack,) = list(stub.IngestEvents(iter([request]), timeout=30))
    assert (ack.accepted, ack.rejected) == (3, 2)
    assert [(r.index, r.field, r.message) for r in ack.rejections] == [
        (2, "timestamp", "timestamp 1000000000000000 (s) is no instant in nanoseconds since the Unix epoch: send "
                         "'YYYY-MM-DD HH:MM:SS' (UTC), RFC 3339 or a timestamp column, within the accepted window"),
        (3, "conversion", f"conversion must be 0 or 1, got {2**64 - 1}")]
    when = dt.datetime.fromtimestamp(BASE_S, dt.timezone.utc)
    text = pa.table({"timestamp": [when.strftime("%Y-%m-%d %H:%M:%S"), when.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
                                   "yesterday"],
                     "user_id": ["e", "f", "g"], "test_id": ["text"] * 3, "variant": ["x"] * 3,
                     "conversion": pa.array([1.0, 1.5, 0.0])})
    (ack,) = list(stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=ipc(text))]), timeout=30))
    assert (ack.accepted, [(r.index, r.field) for r in ack.rejections]) == (1, [(1, "conversion"), (2, "timestamp")])
    rows = stub.Summary(pb.SummaryRequest(test_id="text"), timeout=10).rows
    assert [(r.variant, r.metrics.events, r.metrics.conversions) for r in rows] == [("x", 1, 1)]
    twice = pa.Table.from_arrays([pa.array(["u"]), pa.array(["u2"]), pa.array(["t"]), pa.array(["v"])],
                                 names=["user_id", "user_id", "test_id", "variant"])
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=ipc(twice))]), timeout=30))
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                             "user_id: is a column the batch has twice")


def dictionary_encoded(table, seed: int):
    """The same events with low-cardinality strings dictionary-encoded as producers may send them:
    narrow indices, several record batches each with its own dictionary (values in a different
    order, one no row uses), nulls in an optional column."""
    import random

    import pyarrow as pa

    rng = random.Random(seed)
    batches = []
    for piece in table.to_batches(max_chunksize=max(1, table.num_rows // 3)):
        arrays = []
        for name in piece.schema.names:
            col = piece.column(name)
            if name in ("test_id", "variant", "event_type", "device", "country"):
                values = sorted(set(col.to_pylist()) | {"never-used"}, key=lambda _: rng.random())
                index = {v: i for i, v in enumerate(values)}
                indices = [None if name == "device" and v == "" else index[v] for v in col.to_pylist()]
                col = pa.DictionaryArray.from_arrays(pa.array(indices, pa.int8()), pa.array(values))
            arrays.append(col)
        batches.append(pa.RecordBatch.from_arrays(arrays, names=piece.schema.names))
    types = {b.schema for b in batches}
    assert len(types) == 1
    return pa.Table.from_batches(batches)


def test_dictionary_encoded_batches_store_what_plain_ones_do_and_replay_the_same(tmp_path):
    from abstream.store import Dimension, Durability, SegmentsQuery, SummaryQuery

    from tests.events import TESTS, random_events

    events = random_events(1500, seed=11)
    plain = EventStore(seal_rows=200)
    stored = EventStore(seal_rows=200, durability=Durability(tmp_path))
    for i in range(0, len(events), 500):
        table = to_table(events[i:i + 500])
        plain.append(table)
        result = stored.append(dictionary_encoded(table, seed=i), producer_id="p", sequence=i + 1)
        assert result.rejections == []

    def rows(metrics):
        # sums of revenue are added in an order that depends on the dictionaries' random hash
        # keys: equal up to the last bits, not bit for bit
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in dataclasses.astuple(m))
                for m in metrics.rows()]

    def answers(s: EventStore):
        out = []
        for test_id in TESTS:
            r = s.summary(SummaryQuery(test_id))
            out.append(list(zip(r.variants, rows(r.metrics))))
            for dim in Dimension:
                r = s.segments(SegmentsQuery(test_id, dim))
                out.append(sorted(zip(r.variants, r.segments, rows(r.metrics))))
        return out, sorted((t.test_id, t.events, t.users) for t in s.list_tests())

    assert answers(stored) == answers(plain)
    stored.close(final_snapshot=False)  # the restart replays the log: the batches as they arrived
    restarted = EventStore(seal_rows=200, durability=Durability(tmp_path))
    assert answers(restarted) == answers(plain)
    restarted.close()


def test_a_columnar_batch_whose_dictionary_indices_point_nowhere_is_invalid_argument(stub):
    import grpc
    import pyarrow as pa

    table = pa.table({"timestamp": pa.array([BASE_S], pa.timestamp("s", tz="UTC")), "user_id": ["u"],
                      "test_id": pa.DictionaryArray.from_arrays(pa.array([0], pa.int8()), pa.array(["t"])),
                      "variant": ["v"]})
    corrupt = pa.table({**{n: table.column(n) for n in table.column_names},
                        "test_id": pa.DictionaryArray.from_arrays(pa.array([9], pa.int8()), pa.array(["t"]), safe=False)})
    with pytest.raises(pa.ArrowInvalid):
        corrupt.validate(full=True)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=ipc(corrupt))]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "arrow_ipc" in caught.value.details()
    assert stub.Summary(pb.SummaryRequest(test_id="t"), timeout=10).rows == []


def test_values_that_cannot_be_converted_are_found_among_many_and_only_they_are_rejected():
    import pyarrow as pa
    from abstream.core import events

    now = time.time_ns()
    n, bad = 100_000, {5: 2**63, 77_777: 2**64 - 1, 99_999: 2**63 + 1}
    conversion = [i % 2 if i not in bad else bad[i] for i in range(n)]
    table = pa.table({"timestamp": pa.array([now // 10**9 - i for i in range(n)], pa.timestamp("s")),
                      "user_id": ["u"] * n, "test_id": ["t"] * n, "variant": ["v"] * n,
                      "conversion": pa.array(conversion, pa.uint64())})
    checked, rejections = events.check(table, now)
    assert [(r.index, r.field, r.message) for r in rejections] == [
        (i, "conversion", f"conversion must be 0 or 1, got {v}") for i, v in sorted(bad.items())]
    kept = [i for i in range(n) if i not in bad]
    assert checked.column("conversion").take(kept).to_pylist() == [i % 2 for i in kept]
    assert checked.column("timestamp").to_pylist()[:3] == [(now // 10**9 - i) * 10**9 for i in range(3)]
