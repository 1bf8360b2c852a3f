"""Safe to expose: the auth matrix, TLS and mutual TLS, limits with retry info, metrics, logs."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from abstream.clients import Client, Producer
from abstream.core.auth import hash_token
from abstream.core.settings import Settings
from abstream.v1 import admin_pb2, admin_pb2_grpc
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.conftest import ServerThread
from tests.events import BASE_S, NS, to_message
from tests.process import Server

BIN = Path(sys.executable).parent
TOKENS = {"ingester": ("tok-ingest", ["ingest"], ""), "reader": ("tok-query", ["query"], ""),
          "admin": ("tok-admin", ["admin"], ""), "team": ("tok-team", ["ingest", "query"], "chk_"),
          "slow": ("tok-slow", ["ingest", "query"], ""), "rival": ("tok-rival", ["ingest", "query"], "other_"),
          "team-admin": ("tok-team-admin", ["admin"], "chk_")}


def tokens_file(path: Path, rates: dict[str, float] | None = None) -> Path:
    entries = []
    for name, (secret, scopes, prefix) in TOKENS.items():
        entry = f'[[token]]\nname = "{name}"\nsha256 = "{hash_token(secret)}"\nscopes = {json.dumps(scopes)}\n'
        if prefix:
            entry += f'test_prefix = "{prefix}"\n'
        if rates and name in rates:
            entry += f"ingest_rate = {rates[name]}\n"
        entries.append(entry)
    path.write_text("\n".join(entries))
    return path


def event(test_id: str, user: str = "u1", **changes) -> pb.Event:
    e = dict(timestamp=BASE_S * NS, user_id=user, test_id=test_id, variant="A", event_type="click", conversion=1,
             revenue=2.0, session_id="s", device="d", country="c")
    e.update(changes)
    return to_message(e)


@pytest.fixture
def secured(tmp_path):
    settings = Settings(addr="127.0.0.1:0", data_dir="", tokens_file=str(tokens_file(tmp_path / "tokens.toml")))
    running = ServerThread(settings).start()
    yield running
    running.stop()


def metadata(secret: str | None) -> tuple:
    return () if secret is None else (("authorization", f"Bearer {secret}"),)


def calls(channel):
    """One call of every RPC, as f(metadata, test_id) -> response."""
    stub, admin = pb_grpc.AnalyticsServiceStub(channel), admin_pb2_grpc.AdminServiceStub(channel)

    def ingest(md, test_id):
        return list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event(test_id)])]), metadata=md, timeout=10))

    return {
        "IngestEvents": ("ingest", ingest),
        "Summary": ("query", lambda md, t: stub.Summary(pb.SummaryRequest(test_id=t), metadata=md, timeout=10)),
        "Segments": ("query", lambda md, t: stub.Segments(pb.SegmentsRequest(test_id=t, dimension=pb.DIMENSION_DEVICE),
                                                          metadata=md, timeout=10)),
        "Timeseries": ("query", lambda md, t: stub.Timeseries(pb.TimeseriesRequest(test_id=t, interval=pb.INTERVAL_DAY),
                                                              metadata=md, timeout=10)),
        "ListTests": ("query", lambda md, t: stub.ListTests(pb.ListTestsRequest(), metadata=md, timeout=10)),
        "ListQuarantine": ("query", lambda md, t: stub.ListQuarantine(pb.ListQuarantineRequest(), metadata=md,
                                                                      timeout=10)),
        "CreateSnapshot": ("admin", lambda md, t: admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(), metadata=md,
                                                                       timeout=10)),
        "ImportEvents": ("admin", lambda md, t: list(admin.ImportEvents(
            admin_pb2.ImportEventsRequest(uri=tempfile.mkdtemp()), metadata=md, timeout=10))),
    }


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_auth_matrix_over_every_rpc(secured):
    with grpc.insecure_channel(secured.address) as channel:
        for name, (scope, call) in calls(channel).items():
            assert code_of(lambda: call(metadata(None), "chk_a")) == grpc.StatusCode.UNAUTHENTICATED, name
            assert code_of(lambda: call(metadata("not-a-token"), "chk_a")) == grpc.StatusCode.UNAUTHENTICATED, name
            assert code_of(lambda: call((("authorization", "Basic abc"),), "chk_a")) == \
                grpc.StatusCode.UNAUTHENTICATED, name
            right = {"ingest": "tok-ingest", "query": "tok-query", "admin": "tok-admin"}[scope]
            wrong = {"ingest": "tok-query", "query": "tok-admin", "admin": "tok-team"}[scope]
            assert code_of(lambda: call(metadata(wrong), "chk_a")) == grpc.StatusCode.PERMISSION_DENIED, name
            # memory-only: no snapshot; no --import-root: no local import (but past the token check)
            expected = {"CreateSnapshot": grpc.StatusCode.FAILED_PRECONDITION,
                        "ImportEvents": grpc.StatusCode.INVALID_ARGUMENT}.get(name, grpc.StatusCode.OK)
            assert code_of(lambda: call(metadata(right), "chk_a")) == expected, name  # memory-only: no snapshot
        # Health checking stays open.
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_token_restricted_to_a_prefix_sees_and_writes_only_its_tests(secured):
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.AnalyticsServiceStub(channel)
        (ack,) = stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("chk_1"), event("other_1")])]),
                                   metadata=metadata("tok-team"), timeout=10)
        assert (ack.accepted, ack.rejected) == (1, 1)
        assert ack.rejections[0].index == 1 and ack.rejections[0].field == "test_id"
        assert "may only write tests whose id starts with 'chk_'" in ack.rejections[0].message
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("other_2")])]),
                               metadata=metadata("tok-ingest"), timeout=10))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Summary(pb.SummaryRequest(test_id="other_2"), metadata=metadata("tok-team"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        team = stub.ListTests(pb.ListTestsRequest(), metadata=metadata("tok-team"), timeout=10)
        everyone = stub.ListTests(pb.ListTestsRequest(), metadata=metadata("tok-query"), timeout=10)
        assert [t.test_id for t in team.tests] == ["chk_1"]
        assert [t.test_id for t in everyone.tests] == ["chk_1", "other_2"]

        def quarantine(secret: str) -> list[tuple[str, str]]:
            listed = stub.ListQuarantine(pb.ListQuarantineRequest(), metadata=metadata(secret), timeout=10)
            assert listed.total == len(listed.events)
            return [(e.event.test_id, e.field) for e in listed.events]

        # A refused event is said in the ack and not quarantined, even one that broke a rule too:
        # the quarantine shows each token events by their test ids, and so would show the team's
        # events for other_ tests to the rival token, whose tests they name.
        (ack,) = stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("chk_2", conversion=7),
                                                                        event("other_3", conversion=7)])]),
                                   metadata=metadata("tok-team"), timeout=10)
        assert [(r.index, r.field) for r in ack.rejections] == [(0, "conversion"), (1, "test_id")]
        assert "may only write tests whose id starts with 'chk_'" in ack.rejections[1].message
        assert quarantine("tok-team") == [("chk_2", "conversion")]
        assert quarantine("tok-rival") == []
        assert quarantine("tok-query") == [("chk_2", "conversion")]


def test_a_token_limited_to_some_tests_may_not_snapshot_or_import_for_every_test(secured):
    """A snapshot counts every test's events; an object may hold any test's events, and a limited
    token's import marked it imported for everyone, its other tests' events never stored."""
    with grpc.insecure_channel(secured.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for what, call in (("snapshot the store", lambda: admin.CreateSnapshot(
                                admin_pb2.CreateSnapshotRequest(), metadata=metadata("tok-team-admin"), timeout=10)),
                           ("import objects", lambda: list(admin.ImportEvents(admin_pb2.ImportEventsRequest(
                               uri=tempfile.mkdtemp()), metadata=metadata("tok-team-admin"), timeout=10)))):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
            assert f"may not {what}: that takes a token for every test" in caught.value.details()
        # Its own tests it may still plan.
        admin.DeleteTest(admin_pb2.DeleteTestRequest(test_id="chk_gone"), metadata=metadata("tok-team-admin"),
                         timeout=10)


def test_the_token_scheme_is_read_in_any_case_on_both_transports(secured):
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.AnalyticsServiceStub(channel)
        for scheme in ("bearer", "BEARER", "Bearer"):
            stub.ListTests(pb.ListTestsRequest(), metadata=(("authorization", f"{scheme} tok-query"),), timeout=10)


def test_a_refused_event_stays_out_of_the_quarantine_when_the_log_is_replayed(tmp_path):
    """What the quarantine keeps of a batch is decided again by a restart that replays the log:
    the refusal is logged with the batch, and its event stays out of the quarantine."""
    server = Server(tmp_path / "data", "--tokens-file", str(tokens_file(tmp_path / "tokens.toml"))).start()
    try:
        with server.channel() as channel:
            (ack,) = pb_grpc.AnalyticsServiceStub(channel).IngestEvents(
                iter([pb.IngestEventsRequest(events=[event("chk_1", conversion=7), event("other_1")])]),
                metadata=metadata("tok-team"), timeout=10)
        assert [(r.index, r.field) for r in ack.rejections] == [(0, "conversion"), (1, "test_id")]
        server.kill()  # no snapshot: the restart replays the log
        server.start()
        with server.channel() as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            for secret in ("tok-query", "tok-rival", "tok-team"):
                listed = stub.ListQuarantine(pb.ListQuarantineRequest(), metadata=metadata(secret), timeout=10)
                expected = [] if secret == "tok-rival" else [("chk_1", "conversion")]
                assert [(e.event.test_id, e.field) for e in listed.events] == expected, secret
    finally:
        server.kill()


def test_a_token_sending_bad_events_without_end_pushes_out_only_its_own_from_the_quarantine(tmp_path):
    """The quarantine keeps 10 here: the team's 100 bad events leave the rival's 2 and the
    unrestricted token's 2 alone and keep the team's newest 6, listed in the order they came,
    through a restart too (from the snapshot of a graceful stop); events without a test id
    from a prefixed token are not kept (they would take the share of the tests of no prefix)."""
    import pyarrow as pa

    from tests.test_ingest_validation import ipc

    settings = Settings(addr="127.0.0.1:0", data_dir=str(tmp_path / "data"), quarantine_limit=10,
                        tokens_file=str(tokens_file(tmp_path / "tokens.toml")))

    def quarantined(running: ServerThread) -> dict[str, list[tuple[str, int]]]:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            listed = {secret: stub.ListQuarantine(pb.ListQuarantineRequest(limit=100), metadata=metadata(secret),
                                                  timeout=10) for secret in ("tok-team", "tok-rival", "tok-query")}
        return {secret: [(e.event.test_id, e.index) for e in q.events] for secret, q in listed.items()}

    running = ServerThread(settings).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            sends = [("tok-rival", "other_1", 1), *[("tok-team", "chk_1", 20)] * 5, ("tok-team", "", 3),
                     ("tok-ingest", "plain_1", 2), ("tok-rival", "other_2", 1)]
            for secret, test_id, n in sends:
                (ack,) = stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event(test_id, conversion=7)] * n)]),
                                           metadata=metadata(secret), timeout=10)
                assert ack.rejected == n
                if not test_id:  # the rules' reason, not the prefix's
                    assert all("test_id is required" in r.message for r in ack.rejections), ack
            # Absent test ids, columnar: the same.
            absent = pa.table({"timestamp": pa.array([BASE_S * NS] * 2), "user_id": ["a", "b"],
                               "test_id": pa.array([None, None], pa.string()), "variant": ["x", "y"]})
            (ack,) = stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=ipc(absent))]),
                                       metadata=metadata("tok-team"), timeout=10)
            assert ack.rejected == 2 and all("test_id is required" in r.message for r in ack.rejections), ack
        before = quarantined(running)
        team = [("chk_1", i) for i in range(19, 13, -1)]  # the newest of its last batch
        assert before["tok-rival"] == [("other_2", 0), ("other_1", 0)]
        assert before["tok-team"] == team
        assert before["tok-query"] == [("other_2", 0), ("plain_1", 1), ("plain_1", 0), *team, ("other_1", 0)]
    finally:
        running.stop()
    running = ServerThread(settings).start()
    try:
        assert quarantined(running) == before
    finally:
        running.stop()


def test_a_prefix_holds_whatever_type_the_test_ids_come_as(secured):
    """A columnar batch's test ids are checked against the token's prefix as they are stored:
    string views, large strings, binary and dictionaries alike (a string view failed the whole
    batch with INTERNAL)."""
    import pyarrow as pa

    from tests.test_ingest_validation import ipc

    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.AnalyticsServiceStub(channel)
        for k, kind in enumerate([pa.string_view(), pa.large_string(), pa.binary(), pa.dictionary(pa.int8(), pa.string())]):
            ids = pa.array([f"chk_typed{k}", f"other_typed{k}", None], pa.string()).cast(kind)
            table = pa.table({"timestamp": pa.array([BASE_S * NS] * 3), "user_id": ["a", "b", "c"], "test_id": ids,
                              "variant": ["x", "y", "x"]})
            (ack,) = stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=ipc(table))]),
                                       metadata=metadata("tok-team"), timeout=10)
            assert (ack.accepted, ack.rejected) == (1, 2), (kind, ack)
            assert "test_id is required" in ack.rejections[1].message, kind  # absent: the rule's reason
            assert (ack.rejections[0].index, ack.rejections[0].field) == (1, "test_id"), kind
            assert "may only write tests whose id starts with 'chk_'" in ack.rejections[0].message, kind
        everyone = stub.ListTests(pb.ListTestsRequest(), metadata=metadata("tok-query"), timeout=10)
        assert [t.test_id for t in everyone.tests] == [f"chk_typed{k}" for k in range(4)]


def test_a_token_cannot_claim_another_tokens_producer(secured):
    """Producer ids are each token's own: a token that sends under another's producer id, with a
    sequence far ahead, must not make that producer's next batches duplicates (dropped, acked)."""
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.AnalyticsServiceStub(channel)

        def send(secret: str, test_id: str, sequence: int) -> pb.IngestEventsResponse:
            (ack,) = stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event(test_id)], producer_id="order-42",
                                                                    sequence=sequence)]),
                                       metadata=metadata(secret), timeout=10)
            return ack

        squat = send("tok-team", "chk_squat", 2**40)
        assert (squat.accepted, squat.duplicate) == (1, False)
        first = send("tok-ingest", "victim", 1)
        assert (first.accepted, first.duplicate) == (1, False)  # its own producer: sequence 1 is new
        assert send("tok-ingest", "victim", 1).duplicate and send("tok-team", "chk_squat", 2**40).duplicate
        summary = stub.Summary(pb.SummaryRequest(test_id="victim"), metadata=metadata("tok-query"), timeout=10)
        assert sum(r.metrics.events for r in summary.rows) == 1


def test_reflection_is_open_or_off_as_configured(secured, tmp_path):
    listed = subprocess.run([str(BIN / "grpcurl"), "-plaintext", secured.address, "list"], capture_output=True,
                            text=True, timeout=30)
    assert "abstream.v1.AnalyticsService" in listed.stdout
    off = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", reflection=False)).start()
    try:
        result = subprocess.run([str(BIN / "grpcurl"), "-plaintext", off.address, "list"], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode != 0 and "does not support the reflection API" in result.stderr
    finally:
        off.stop()


def test_without_tokens_the_server_binds_loopback_only(tmp_path):
    refused = subprocess.run([str(BIN / "abstream"), "serve", "--addr", "0.0.0.0:0", "--data-dir", ""],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "refusing to listen on 0.0.0.0:0 without tokens" in refused.stderr
    assert "--insecure" in refused.stderr
    server = Server(tmp_path / "data", "--addr", "0.0.0.0:0", "--insecure").start()
    with grpc.insecure_channel(server.address) as channel:  # reached over loopback all the same
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    server.kill()
    tokens = tokens_file(tmp_path / "tokens.toml")
    server = Server(tmp_path / "data2", "--addr", "0.0.0.0:0", "--tokens-file", str(tokens)).start()
    server.kill()


# ---- TLS ----------------------------------------------------------------------------------------

def make_pki(directory: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        return path

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "abstream test CA")])
    ca = cert("abstream test CA", ca_key, ca_name, ca_key, True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server_cert = cert("localhost", server_key, ca_name, ca_key, False,
                       [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert = cert("a client", client_key, ca_name, ca_key, False)
    pem = serialization.Encoding.PEM
    key_pem = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                   encryption_algorithm=serialization.NoEncryption())
    return {"ca": write("ca.pem", ca.public_bytes(pem)),
            "server_cert": write("server.pem", server_cert.public_bytes(pem)),
            "server_key": write("server.key", server_key.private_bytes(**key_pem)),
            "client_cert": write("client.pem", client_cert.public_bytes(pem)),
            "client_key": write("client.key", client_key.private_bytes(**key_pem))}


def health_over(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_tls_and_mutual_tls(tmp_path):
    pki = make_pki(tmp_path)
    tls = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", tls_cert=str(pki["server_cert"]),
                                tls_key=str(pki["server_key"]))).start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(f"localhost:{tls.server.port}", credentials) as channel:
            assert health_over(channel) == health_pb2.HealthCheckResponse.SERVING
        with Client(f"localhost:{tls.server.port}", tls=pki["ca"].read_bytes()) as client:
            assert client.list_tests().rows == []
        with grpc.insecure_channel(tls.address) as channel, pytest.raises(grpc.RpcError):
            health_over(channel)  # plaintext to a TLS port fails
    finally:
        tls.stop()
    mutual = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", tls_cert=str(pki["server_cert"]),
                                   tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca"]))).start()
    try:
        root = pki["ca"].read_bytes()
        with grpc.secure_channel(f"localhost:{mutual.server.port}", grpc.ssl_channel_credentials(root)) as channel, \
                pytest.raises(grpc.RpcError):
            health_over(channel)  # no client certificate
        with_cert = grpc.ssl_channel_credentials(root, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes())
        with grpc.secure_channel(f"localhost:{mutual.server.port}", with_cert) as channel:
            assert health_over(channel) == health_pb2.HealthCheckResponse.SERVING
        # The Producer speaks mutual TLS as the Client does.
        with Producer(f"localhost:{mutual.server.port}", tls=root, cert=pki["client_cert"].read_bytes(),
                      key=pki["client_key"].read_bytes(), linger_ms=1) as producer:
            sent = producer.send({"timestamp": BASE_S, "user_id": "m1", "test_id": "mtls", "variant": "A"})
            assert producer.flush(timeout=30) and sent.result(timeout=30).accepted
    finally:
        mutual.stop()


# ---- limits ---------------------------------------------------------------------------------------

def retry_info(error: grpc.RpcError) -> error_details_pb2.RetryInfo:
    status = rpc_status.from_call(error)
    info = error_details_pb2.RetryInfo()
    assert status is not None and status.details[0].Unpack(info)
    return info


def test_rate_limit_says_when_to_retry_and_retries_lose_nothing(tmp_path):
    settings = Settings(addr="127.0.0.1:0", data_dir=str(tmp_path / "data"),
                        tokens_file=str(tokens_file(tmp_path / "tokens.toml", {"slow": 2000})))
    running = ServerThread(settings).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            batch = pb.IngestEventsRequest(events=[event("rl", f"x{i}") for i in range(1500)])
            list(stub.IngestEvents(iter([batch]), metadata=metadata("tok-slow"), timeout=10))
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.IngestEvents(iter([batch]), metadata=metadata("tok-slow"), timeout=10))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over its ingest rate of 2000 events/s" in caught.value.details()
            assert 0 < retry_info(caught.value).retry_delay.ToTimedelta().total_seconds() <= 1.0
        total = 6000
        with Producer(running.address, token="tok-slow", batch_size=500, linger_ms=1, retry_max_s=0.5) as producer:
            futures = [producer.send({"timestamp": BASE_S, "user_id": f"p{i}", "test_id": "rl2", "variant": "A"})
                       for i in range(total)]
            assert producer.flush(timeout=60)
        assert all(f.result().accepted for f in futures)
        with Client(running.address, token="tok-query") as client:
            rows = client.summary("rl2").rows
        assert sum(r.metrics.events for r in rows) == total  # each event once, despite the retries
    finally:
        running.stop()


def test_memory_high_water_mark_refuses_ingest_with_retry_info(tmp_path):
    running = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", memory_high_water_bytes=1)).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("mem")])]), timeout=10))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "memory high-water mark" in caught.value.details()
            assert retry_info(caught.value).retry_delay.seconds == 1
            assert stub.Summary(pb.SummaryRequest(test_id="mem"), timeout=10).rows == []  # nothing half-stored
    finally:
        running.stop()


def test_batch_and_stream_limits(tmp_path):
    running = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", max_batch_events=10,
                                    max_ingest_streams=1)).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("b")] * 11)]), timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 10" in caught.value.details()
            hold = threading.Event()

            def slow():
                yield pb.IngestEventsRequest(events=[event("b")])
                hold.wait(10)

            first = stub.IngestEvents(slow(), timeout=20)
            next(first)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("b")])]), timeout=10))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_info(caught.value)
            hold.set()
            list(first)
            assert list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("b")])]), timeout=10))[0].accepted
    finally:
        running.stop()


# ---- metrics and logs -------------------------------------------------------------------------------

def test_metrics_endpoint(tmp_path):
    running = ServerThread(Settings(addr="127.0.0.1:0", data_dir=str(tmp_path / "d"), metrics_addr="127.0.0.1:0")).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)
            list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("m", f"u{i}") for i in range(7)]
                                                                + [event("m", conversion=5)])]), timeout=10))
            stub.Summary(pb.SummaryRequest(test_id="m"), timeout=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10).read().decode()
        assert "abstream_events_ingested_total 7.0" in text
        assert 'abstream_events_rejected_total{field="conversion"} 1.0' in text
        assert 'abstream_query_seconds_count{rpc="Summary"} 1.0' in text
        assert "abstream_batch_ack_seconds_count 1.0" in text
        assert "abstream_stored_events 7.0" in text
        for name in ("abstream_stored_bytes", "abstream_resident_bytes", "abstream_snapshot_age_seconds",
                     "abstream_wal_bytes", "abstream_active_ingest_streams"):
            assert re.search(rf"^{name} [0-9.e+]+$", text, re.M), name
    finally:
        running.stop()


def test_logs_are_json_with_request_ids_and_no_tokens_or_user_ids(tmp_path):
    tokens = tokens_file(tmp_path / "tokens.toml")
    server = Server(tmp_path / "data", "--tokens-file", str(tokens)).start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AnalyticsServiceStub(channel)
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event("logs", "secret-user-42"),
                                                                     event("logs", "secret-user-43", conversion=9)])]),
                               metadata=metadata("tok-ingest") + (("x-request-id", "req-abc-1"),), timeout=10))
        with pytest.raises(grpc.RpcError):
            stub.Summary(pb.SummaryRequest(test_id="logs"), metadata=metadata("tok-wrong"), timeout=10)
    server.terminate()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    calls_logged = [entry for entry in lines if entry.get("message") == "call"]
    assert any(e["request_id"] == "req-abc-1" and e["method"].endswith("/IngestEvents") and e["code"] == "OK"
               and e["caller"] == "ingester" for e in calls_logged)
    assert any(e["method"].endswith("/Summary") and e["code"] == "UNAUTHENTICATED" and e.get("request_id")
               for e in calls_logged)
    text = server.log()
    for secret in ("tok-ingest", "tok-wrong", "secret-user-42", "secret-user-43"):
        assert secret not in text
