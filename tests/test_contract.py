"""One source for the contract: what restates the protobuf messages agrees with their descriptors,
and the layers import only what they may."""

from __future__ import annotations

import subprocess
import sys

import grpc
from abstream.core import types
from abstream.core.events import EVENT_SCHEMA
from abstream.service import converters
from abstream.v1 import analytics_pb2 as pb

_F = pb.Event.DESCRIPTOR.fields[0].__class__  # FieldDescriptor


def test_the_event_schema_is_the_event_message():
    """The engines' EVENT_SCHEMA (which may not import protobuf) names Event's fields, in order,
    with matching types."""
    fields = pb.Event.DESCRIPTOR.fields
    assert EVENT_SCHEMA.names == [f.name for f in fields]
    for column, f in zip(EVENT_SCHEMA, fields):
        if f.type == _F.TYPE_STRING:
            assert str(column.type) == "string", column
        elif f.type == _F.TYPE_MESSAGE:
            assert f.message_type.full_name == "google.protobuf.Timestamp" and str(column.type) == "int64"
        elif f.type == _F.TYPE_DOUBLE:
            assert str(column.type) == "double", column
        else:
            assert f.type == _F.TYPE_UINT32 and str(column.type) == "int64", column
    assert converters.EVENT_STRINGS == tuple(c.name for c in EVENT_SCHEMA if str(c.type) == "string")


def test_metrics_are_the_metrics_message():
    assert list(types.Metrics.__dataclass_fields__) == [f.name for f in pb.Metrics.DESCRIPTOR.fields]


def test_the_request_reader_takes_its_field_numbers_from_the_descriptors():
    """A request built with the generated code, read by the C reader: every field lands in its
    column (the reader was configured from the descriptors, not from numbers typed by hand)."""
    event = pb.Event(user_id="u", test_id="t", variant="v", event_type="e", conversion=1, revenue=2.5,
                     session_id="s", device="d", country="c")
    event.timestamp.seconds = 1_745_800_000
    batch = converters.decode_request(pb.IngestEventsRequest(events=[event], producer_id="p", sequence=7)
                                      .SerializeToString(), 10)
    assert batch.table.to_pylist() == [{"timestamp": 1_745_800_000 * 10**9, "user_id": "u", "test_id": "t",
                                        "variant": "v", "event_type": "e", "conversion": 1, "revenue": 2.5,
                                        "session_id": "s", "device": "d", "country": "c"}]
    assert (batch.producer_id, batch.sequence) == ("p", 7)


def imported_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


def test_clients_import_neither_the_engine_nor_the_core_nor_scipy():
    modules = imported_by("import abstream.clients, abstream.clients.cli, abstream.clients.producer")
    assert "abstream.clients.client" in modules
    for forbidden in ("abstream.store", "abstream.core", "abstream.service", "abstream.stats", "scipy"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in modules), forbidden


def test_the_engine_imports_no_transport():
    modules = imported_by("import abstream.store, abstream.core.dataplane")
    for forbidden in ("grpc", "abstream.v1", "abstream.service", "google.protobuf", "aiohttp"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in modules), forbidden


def test_every_answer_carries_its_request_id(server, channel, stub):
    response, call = stub.Summary.with_call(pb.SummaryRequest(test_id="t"), timeout=10,
                                            metadata=(("x-request-id", "req-42"),))
    assert ("x-request-id", "req-42") in call.trailing_metadata()
    try:
        stub.Summary(pb.SummaryRequest(test_id=""), timeout=10, metadata=(("x-request-id", "req-43"),))
        raise AssertionError("an empty test_id was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-request-id", "req-43") in error.trailing_metadata()
    _, call = stub.ListTests.with_call(pb.ListTestsRequest(), timeout=10)
    generated = dict(call.trailing_metadata())["x-request-id"]
    assert len(generated) == 16 and generated.isalnum()
