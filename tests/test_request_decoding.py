"""The C reader of IngestEvents requests agrees with the protobuf runtime on every input."""

from __future__ import annotations

import struct

import pytest
from abstream.core.events import MAX_STRING_BYTES, Rejection
from abstream.service import converters
from abstream.store import InvalidArgument
from abstream.v1 import analytics_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

_NS = 1_000_000_000
STRINGS = ("user_id", "test_id", "variant", "event_type", "session_id", "device", "country")
MAX_EVENTS = 100_000


def decode_request(raw: bytes, max_events: int = MAX_EVENTS) -> converters.IngestBatch:
    return converters.decode_request(raw, max_events)


def reference(raw: bytes) -> list[dict]:
    """The events as the protobuf runtime reads them."""
    request = pb.IngestEventsRequest.FromString(raw)
    out = []
    for e in request.events:
        row = {name: getattr(e, name) for name in STRINGS}
        row["conversion"], row["revenue"] = e.conversion, e.revenue
        seconds = min(max(e.timestamp.seconds, -9_000_000_000), 9_000_000_000)
        row["timestamp"] = seconds * _NS + e.timestamp.nanos if e.HasField("timestamp") else None
        out.append(row)
    return out


def decoded(raw: bytes) -> list[dict]:
    batch = decode_request(raw)
    request = pb.IngestEventsRequest.FromString(raw)
    assert [(r.index, r.field, r.message) for r in batch.refuse] == [  # a Timestamp's nanos are 0 to 999,999,999
        (i, "timestamp", f"timestamp nanos must be 0 to 999,999,999, got {e.timestamp.nanos}")
        for i, e in enumerate(request.events) if e.HasField("timestamp") and not 0 <= e.timestamp.nanos < _NS]
    rows = batch.table.to_pylist()
    for row in rows:
        if row["revenue"] != row["revenue"]:
            row["revenue"] = "nan"
    return rows


text = st.text(max_size=12)
events = st.builds(
    pb.Event,
    user_id=text, test_id=text, variant=text, event_type=text, session_id=st.text(max_size=85), device=text,
    country=text, conversion=st.integers(0, 2**32 - 1), revenue=st.floats(allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(events, max_size=20), stamps=st.lists(st.none() | st.tuples(
    st.integers(-2**63, 2**63 - 1), st.integers(-2**31, 2**31 - 1)), max_size=20),
    producer=text, sequence=st.integers(0, 2**64 - 1))
def test_events_read_like_the_protobuf_runtime(events, stamps, producer, sequence):
    for e, stamp in zip(events, stamps):
        if stamp is not None:
            e.timestamp.seconds, e.timestamp.nanos = stamp
    raw = pb.IngestEventsRequest(events=events, producer_id=producer, sequence=sequence).SerializeToString()
    expected = reference(raw)
    for row in expected:
        if row["revenue"] != row["revenue"]:
            row["revenue"] = "nan"
    assert decoded(raw) == [{k: row[k] for k in decoded_order()} for row in expected]
    batch = decode_request(raw)
    assert (batch.producer_id, batch.sequence) == (producer, sequence)


def decoded_order() -> list[str]:
    from abstream.store import EVENT_SCHEMA

    return EVENT_SCHEMA.names


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def varint(v: int) -> bytes:
    out = bytearray()
    v &= 2**64 - 1
    while True:
        out.append(v & 0x7F | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def test_repeated_fields_unknown_fields_and_merged_timestamps_follow_the_wire_rules():
    event = (field(2, b"first") + field(2, b"last")  # a repeated scalar: the last wins
             + field(1, tag(1, 0) + varint(100)) + field(1, tag(2, 0) + varint(5))  # Timestamp parts merge
             + tag(99, 0) + varint(7) + field(98, b"unknown") + tag(97, 5) + b"\0\0\0\0"  # skipped
             + tag(6, 0) + varint(2**32 + 1)  # uint32: truncated like protobuf does
             + tag(7, 1) + struct.pack("<d", -2.5) + tag(3, 0) + varint(1))  # test_id with a wrong wire type
    raw = field(1, event) + field(1, b"") + tag(50, 1) + b"\0" * 8
    assert decoded(raw) == [{k: row[k] for k in decoded_order()} for row in reference(raw)]
    first = decoded(raw)[0]
    assert (first["user_id"], first["timestamp"], first["conversion"], first["revenue"], first["test_id"]) == \
        ("last", 100 * _NS + 5, 1, -2.5, "")
    assert decoded(raw)[1]["timestamp"] is None


def test_an_empty_arrow_ipc_is_no_arrow_ipc_as_protobuf_reads_it():
    """Empty bytes are proto3's default: a request whose arrow_ipc is present but empty holds no
    Arrow stream (it was refused as an unreadable one), alone, after a filled one (the last
    wins), or beside events; it is measured as a request of events alone."""
    event = field(1, field(2, b"u1"))
    for raw in (field(2, b""), field(2, b"not arrow") + field(2, b""), event + field(2, b"")):
        assert pb.IngestEventsRequest.FromString(raw).arrow_ipc == b""
        assert decoded(raw) == [{k: row[k] for k in decoded_order()} for row in reference(raw)]
        assert converters.measure_request(raw, MAX_EVENTS).shape == converters.EVENTS_SHAPE


def test_a_string_that_is_not_utf8_rejects_only_its_event():
    good = field(2, b"u1") + field(3, b"t")
    bad = field(2, b"u\xff") + field(9, b"\xc3")
    batch = decode_request(field(1, good) + field(1, bad) + field(1, good))
    assert batch.table.column("user_id").to_pylist() == ["u1", "", "u1"]
    assert batch.refuse == [Rejection(1, "user_id", "user_id is not valid UTF-8"),
                            Rejection(1, "device", "device is not valid UTF-8")]


def test_a_string_over_the_limit_is_not_copied_and_rejects_only_its_event():
    huge = "é" * 5_000_000  # 10 MB
    events = [pb.Event(user_id="u1", test_id="t"), pb.Event(user_id=huge, test_id="t", country="x" * 300),
              pb.Event(user_id="u3", test_id="t")]
    batch = decode_request(pb.IngestEventsRequest(events=events).SerializeToString())
    kept = batch.table.column("user_id").to_pylist()
    assert kept[0] == "u1" and kept[2] == "u3"
    assert kept[1] == "é" * (MAX_STRING_BYTES // 2)  # its first 256 bytes, cut at a character
    assert batch.table.column("user_id").chunk(0).buffers()[2].size < 300  # the megabytes were never copied
    assert batch.refuse == [Rejection(1, "user_id", "user_id is 10,000,000 bytes long; at most 256 are accepted"),
                            Rejection(1, "country", "country is 300 bytes long; at most 256 are accepted")]


def test_a_repeated_string_field_is_judged_by_its_last_value():
    event = field(2, b"x" * 1000) + field(2, b"short") + field(3, b"t")
    batch = decode_request(field(1, event) + field(1, field(2, b"a") + field(2, b"y" * 1000)))
    assert batch.table.column("user_id").to_pylist() == ["short", "y" * MAX_STRING_BYTES]
    assert batch.refuse == [Rejection(1, "user_id", "user_id is 1,000 bytes long; at most 256 are accepted")]


def test_more_events_than_the_limit_are_refused_before_they_are_read():
    raw = b"\x0a\x00" * 1_000_001
    with pytest.raises(InvalidArgument) as caught:
        decode_request(raw, 1000)
    assert caught.value.field == "events" and caught.value.reason == "a batch of 1000001 events; at most 1000"
    assert decode_request(b"\x0a\x00" * 1000, 1000).table.num_rows == 1000


@pytest.mark.parametrize("raw, why", [
    (field(1, b"")[:-1] + b"\x05", "runs past the end"),
    (b"\x0a", "truncated varint"),
    (b"\xff" * 11, "varint longer than 10 bytes"),
    (tag(50, 3), "a group is not closed"),
    (tag(50, 3) + tag(51, 4), "another field's end tag"),
    (tag(50, 4), "an end-group tag without its group"),
    (tag(50, 6), "invalid wire type"),
    (tag(50, 3) * 101 + tag(50, 4) * 101, "nested too deeply"),
    (b"\x00", "invalid field number"),
    (field(1, field(1, b"\x08")), "truncated varint"),  # inside the Timestamp
])
def test_bytes_that_are_not_a_request_are_invalid_argument_saying_where(raw, why):
    with pytest.raises(Exception):
        pb.IngestEventsRequest.FromString(raw)  # the protobuf runtime refuses them too
    with pytest.raises(InvalidArgument) as caught:
        decode_request(raw)
    assert caught.value.field == "request" and why in caught.value.reason and "at byte" in caught.value.reason


def test_groups_are_skipped_like_the_protobuf_runtime_does_up_to_its_depth():
    for depth in (1, 2, 50, 100):
        raw = tag(50, 3) * depth + tag(50, 4) * depth + field(1, field(2, b"u"))
        assert pb.IngestEventsRequest.FromString(raw).events[0].user_id == "u"
        assert decoded(raw)[0]["user_id"] == "u"
    inside = field(1, tag(60, 3) * 99 + tag(60, 4) * 99 + field(2, b"v"))
    assert pb.IngestEventsRequest.FromString(inside).events[0].user_id == "v"
    assert decoded(inside)[0]["user_id"] == "v"
    too_deep = field(1, tag(60, 3) * 100 + tag(60, 4) * 100)
    with pytest.raises(Exception):
        pb.IngestEventsRequest.FromString(too_deep)
    with pytest.raises(InvalidArgument):
        decode_request(too_deep)


def test_decode_takes_only_immutable_bytes():
    with pytest.raises(TypeError):
        converters._events.decode(bytearray(b"\x0a\x00"), 10, MAX_STRING_BYTES)
    decoded_struct = converters._events.decode(b"\x0a\x00", 10, MAX_STRING_BYTES)
    assert decoded_struct.events == 1 and decoded_struct.arrow_ipc is None and decoded_struct.sequence == 0


# ---- arbitrary bytes: the C reader and protobuf's parser agree ---------------------------------

def _mutations(data: st.DataObject, raw: bytes) -> bytes:
    """`raw` with a few bytes flipped, cut, inserted or deleted."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif out:
            del out[at]
    return bytes(out)


@settings(max_examples=1500, deadline=None)
@given(data=st.data())
def test_arbitrary_bytes_are_accepted_or_refused_as_protobuf_does(data):
    """For any bytes, both readers accept or both refuse, and accepted events are equal. One
    difference is by design: a string that is not UTF-8 makes protobuf refuse the whole message,
    while the C reader refuses only its event."""
    if data.draw(st.booleans()):
        raw = data.draw(st.binary(max_size=64))
    else:
        request = pb.IngestEventsRequest(events=data.draw(st.lists(events, max_size=4)),
                                         producer_id=data.draw(text), sequence=data.draw(st.integers(0, 2**64 - 1)))
        raw = _mutations(data, request.SerializeToString())
    try:
        expected = reference(raw)
        expected_request = pb.IngestEventsRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - the runtime's DecodeError
        expected = None
    try:
        batch = decode_request(raw)
    except InvalidArgument as error:
        if expected is not None and error.field == "arrow_ipc":
            assert expected_request.arrow_ipc  # well-formed protobuf, but not Arrow: ours to refuse
            return
        assert expected is None, f"the C reader refused what protobuf accepts: {error}"
        return
    if expected is None:
        assert any(r.message.endswith("is not valid UTF-8") for r in batch.refuse), \
            f"the C reader accepted what protobuf refuses, without a reason: {raw.hex()}"
        return
    assert batch.refuse == []
    assert (batch.producer_id, batch.sequence) == (expected_request.producer_id, expected_request.sequence)
    if expected_request.arrow_ipc:
        return  # read as Arrow, which other tests cover
    rows = batch.table.to_pylist()
    for row in rows + expected:
        if row["revenue"] != row["revenue"]:
            row["revenue"] = "nan"
    assert rows == [{k: row[k] for k in decoded_order()} for row in expected]


def test_a_producer_id_that_is_not_utf8_is_refused_even_when_repeated_after():
    """Protobuf refuses a message holding any producer_id that is not UTF-8, a later valid one
    notwithstanding (found by the test above)."""
    raw = bytes.fromhex("1a0939000000000000f03f" "0a00" "1a0130")
    with pytest.raises(Exception):
        pb.IngestEventsRequest.FromString(raw)
    with pytest.raises(InvalidArgument) as error:
        decode_request(raw)
    assert error.value.field == "producer_id"
    assert decode_request(bytes.fromhex("1a0130" "1a0131")).producer_id == "1"  # else the last one wins


# ---- requests read together ---------------------------------------------------------------------

bad_text = st.binary(max_size=6).map(lambda b: b + b"\xff")  # 0xFF is in no UTF-8 string


def _request(events: list, producer: str, sequence: int, spoiled: list[tuple[int, bytes]]) -> bytes:
    """A request of `events`, the strings of some replaced by bytes that are not UTF-8 or too long."""
    raw = b""
    for k, e in enumerate(events):
        body = e.SerializeToString()
        for at, value in spoiled:
            if at == k:
                body += field(2, value)  # user_id: the last value wins, and this one is refused
        raw += field(1, body)
    return raw + pb.IngestEventsRequest(producer_id=producer, sequence=sequence).SerializeToString()


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.tuples(st.lists(events, max_size=6),
                                   st.lists(st.tuples(st.integers(0, 5), bad_text | st.just(b"y" * 300)),
                                            max_size=2)),
                         min_size=1, max_size=5),
       producer=text)
def test_requests_read_together_are_the_requests_read_one_by_one(requests, producer):
    """Requests stored together are read in one call: the same rows, in order, each refusal at
    its row among them all, and the last request's producer and sequence."""
    raws = [_request(evs, producer, i + 1, spoiled) for i, (evs, spoiled) in enumerate(requests)]
    together = decode_request(raws)
    alone = [decode_request(raw) for raw in raws]
    assert together.table.to_pylist() == [row for batch in alone for row in batch.table.to_pylist()]
    starts = [0]
    for batch in alone:
        starts.append(starts[-1] + batch.table.num_rows)
    assert together.refuse == [Rejection(r.index + at, r.field, r.message)
                               for batch, at in zip(alone, starts) for r in batch.refuse]
    assert (together.producer_id, together.sequence) == (producer, len(raws))
    sizes = [converters.measure_request(raw, MAX_EVENTS) for raw in raws]
    assert [s.events for s in sizes] == [batch.table.num_rows for batch in alone]
    assert all((s.producer_id, s.sequence, s.shape) == (producer, i + 1, converters.EVENTS_SHAPE)
               for i, s in enumerate(sizes))


def test_a_request_that_cannot_be_read_is_named_among_those_read_together():
    good = pb.IngestEventsRequest(events=[pb.Event(user_id="u", test_id="t")]).SerializeToString()
    bad = field(1, field(1, b"\x08"))  # a truncated varint inside an event's timestamp
    converters.measure_request(bad, MAX_EVENTS)  # its top level reads: only reading its events fails
    with pytest.raises(InvalidArgument) as caught:
        decode_request([good, bad, good])
    assert caught.value.field == "request" and "truncated varint at byte" in caught.value.reason
    assert caught.value.reason.endswith("of request 1")


def test_a_request_with_arrow_ipc_is_measured_to_be_read_alone():
    from abstream.clients import arrow_ipc
    from tests.events import to_table

    columnar = pb.IngestEventsRequest(arrow_ipc=arrow_ipc(to_table([dict(
        timestamp=1_700_000_000 * _NS, user_id="u", test_id="t", variant="A", event_type="click", conversion=0,
        revenue=0.0, session_id="s", device="d", country="US")]))).SerializeToString()
    size = converters.measure_request(columnar, MAX_EVENTS)
    assert (size.events, size.shape) == (1, None)
    rows = pb.IngestEventsRequest(events=[pb.Event(user_id="u")]).SerializeToString()
    with pytest.raises(InvalidArgument, match="arrow_ipc is read on its own"):
        decode_request([rows, columnar])
    assert decode_request([columnar]).table.num_rows == 1
