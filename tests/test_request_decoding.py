"""The C reader of IngestEvents requests agrees with the protobuf runtime on every input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abstream.service.converters import decode_request
from abstream.store import InvalidArgument
from abstream.v1 import analytics_pb2 as pb

_NS = 1_000_000_000
STRINGS = ("user_id", "test_id", "variant", "event_type", "session_id", "device", "country")


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
    assert batch.refuse == []
    rows = batch.table.to_pylist()
    for row in rows:
        if row["revenue"] != row["revenue"]:
            row["revenue"] = "nan"
    return rows


text = st.text(max_size=12)
events = st.builds(
    pb.Event,
    user_id=text, test_id=text, variant=text, event_type=text, session_id=st.text(max_size=300), device=text,
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


def test_a_string_that_is_not_utf8_rejects_only_its_event():
    good = field(2, b"u1") + field(3, b"t")
    bad = field(2, b"u\xff") + field(9, b"\xc3")
    batch = decode_request(field(1, good) + field(1, bad) + field(1, good))
    assert batch.table.column("user_id").to_pylist() == ["u1", "", "u1"]
    assert [(np.flatnonzero(mask).tolist(), name, message) for mask, name, message in batch.refuse] == [
        ([1], "user_id", "user_id is not valid UTF-8"), ([1], "device", "device is not valid UTF-8")]


@pytest.mark.parametrize("raw, why", [
    (field(1, b"")[:-1] + b"\x05", "runs past the end"),
    (b"\x0a", "truncated varint"),
    (b"\xff" * 11, "varint longer than 10 bytes"),
    (tag(1, 3), "unsupported wire type"),
    (b"\x00", "invalid field number"),
    (field(1, field(1, b"\x08")), "truncated varint"),  # inside the Timestamp
])
def test_bytes_that_are_not_a_request_are_invalid_argument_saying_where(raw, why):
    with pytest.raises(Exception):
        pb.IngestEventsRequest.FromString(raw)  # the protobuf runtime refuses them too
    with pytest.raises(InvalidArgument) as caught:
        decode_request(raw)
    assert caught.value.field == "request" and why in caught.value.reason and "at byte" in caught.value.reason
