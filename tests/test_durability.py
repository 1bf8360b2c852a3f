"""Nothing acknowledged is lost, nothing is stored twice: real processes, real files, real kills."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import pyarrow as pa
import pytest
from abstream.v1 import admin_pb2
from abstream.v1 import analytics_pb2 as pb
from grpc_health.v1 import health_pb2

from tests.events import BASE_S, NS, to_message
from tests.process import Server

BATCH = 20


def batch_events(producer: str, seq: int, test_id: str = "dur") -> list[dict]:
    """BATCH events no other batch shares: every user id names its producer, batch and row."""
    return [dict(timestamp=(BASE_S + seq) * NS + i, user_id=f"{producer}-{seq}-{i}", test_id=test_id,
                 variant="AB"[i % 2], event_type="click", conversion=i % 2, revenue=1.0, session_id=f"s{seq}",
                 device="mobile", country="US") for i in range(BATCH)]


def send(stub, producer: str, seq: int, events: list[dict] | None = None, timeout: float = 10) -> pb.IngestEventsResponse:
    events = batch_events(producer, seq) if events is None else events
    request = pb.IngestEventsRequest(events=[to_message(e) for e in events], producer_id=producer, sequence=seq)
    responses = stub.IngestEvents(iter([request]), timeout=timeout)
    ack = next(responses)  # the ack counts even if the stream then ends with an error (a drain)
    try:
        for _ in responses:
            pass
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
    return ack


def totals(server: Server, test_id: str = "dur") -> tuple[int, int]:
    """(events, distinct users) of a test, as the server answers."""
    with server.channel() as ch:
        rows = server.stub(ch).Summary(pb.SummaryRequest(test_id=test_id), timeout=30).rows
    return sum(r.metrics.events for r in rows), sum(r.metrics.users for r in rows)


def snapshot(server: Server) -> admin_pb2.CreateSnapshotResponse:
    with server.channel() as ch:
        return server.admin(ch).CreateSnapshot(admin_pb2.CreateSnapshotRequest(), timeout=60)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def test_sigkill_at_random_moments_loses_nothing_acknowledged_and_stores_nothing_twice(data_dir):
    """Three producers stream tagged batches; the server is SIGKILLed 20 times at random moments
    and restarted; producers resend whatever was not acked. Every acked batch must be there once."""
    rng = random.Random(2024)
    server = Server(data_dir, "--snapshot-every-events", "1500").start()
    producers = {f"p{i}": 0 for i in range(3)}  # next sequence to send
    acked: dict[str, set[int]] = {p: set() for p in producers}
    duplicates = 0
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[BaseException] = []  # what a producer thread raised (an assert there is lost otherwise)

    def produce(name: str) -> None:
        nonlocal duplicates
        try:
            while not stop.is_set():
                seq = producers[name]
                try:
                    with grpc.insecure_channel(server.address) as ch:
                        ack = send(server.stub(ch), name, seq, timeout=5)
                except grpc.RpcError:
                    time.sleep(0.05)  # the server is down or restarting: send the same batch again
                    continue
                with lock:
                    assert ack.duplicate or ack.accepted == BATCH, ack
                    duplicates += ack.duplicate
                    acked[name].add(seq)
                    producers[name] = seq + 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(p,)) for p in producers]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 240
        for _ in range(20):
            assert time.monotonic() < deadline, "crash loop took too long"
            time.sleep(rng.uniform(0.1, 0.8))
            server.kill()
            server.start()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    # A batch in flight when the producers stopped may be stored without its ack having arrived;
    # each producer sends it once more, as it would on its next run: stored once either way.
    with grpc.insecure_channel(server.address) as ch:
        for name, seq in producers.items():
            ack = send(server.stub(ch), name, seq)
            duplicates += ack.duplicate
            acked[name].add(seq)
    batches = sum(len(s) for s in acked.values())
    assert all(s == set(range(len(s))) for s in acked.values())  # every batch up to the last was acked
    assert batches > 60
    events, users = totals(server)
    assert (events, users) == (batches * BATCH, batches * BATCH)
    # ... and again after one more crash, now with every batch known
    server.kill()
    server.start()
    assert totals(server) == (batches * BATCH, batches * BATCH)
    server.kill()
    assert "recovered" in server.log()


def test_a_resent_batch_is_a_duplicate_across_restarts(data_dir):
    server = Server(data_dir).start()
    with server.channel() as ch:
        stub = server.stub(ch)
        assert send(stub, "job-7", 5).accepted == BATCH
        assert send(stub, "job-7", 5).duplicate
        assert send(stub, "job-7", 3).duplicate  # not above the last applied
        assert send(stub, "job-7", 9).accepted == BATCH  # gaps are allowed
        untagged = pb.IngestEventsRequest(events=[to_message(e) for e in batch_events("x", 1)])
        assert [a.accepted for a in stub.IngestEvents(iter([untagged, untagged]), timeout=10)] == [BATCH, BATCH]
    assert server.terminate() == 0
    server.start()
    with server.channel() as ch:
        ack = send(server.stub(ch), "job-7", 9)
    assert ack.duplicate and ack.accepted == 0
    assert totals(server) == (4 * BATCH, 3 * BATCH)  # the untagged batch is stored twice, as sent
    server.kill()


def test_a_second_server_on_the_same_data_directory_refuses_to_start(data_dir):
    """Each would write its own records under the same numbers, and neither could start again."""
    first = Server(data_dir).start()
    with first.channel() as ch:
        assert send(first.stub(ch), "one", 1).accepted == BATCH
    code, said = Server(data_dir).start_expecting_failure()
    assert code == 2 and f"{data_dir} is in use by another abstream server (process {first.process.pid})" in said, said
    first.kill()  # the lock goes with the process, however it ends
    second = Server(data_dir).start()
    assert totals(second) == (BATCH, BATCH)
    second.kill()


def test_a_snapshot_at_the_same_log_position_keeps_the_one_on_disk(data_dir):
    """A stop with nothing logged since the last snapshot writes one at the same position: the
    one on disk is kept (it was deleted before the new one was renamed in, leaving, for a moment,
    no snapshot at all while the log before it was already gone)."""
    server = Server(data_dir).start()
    with server.channel() as ch:
        assert send(server.stub(ch), "same", 1).accepted == BATCH
    assert server.terminate() == 0
    [first] = (data_dir / "snapshots").glob("snap-*")
    written = json.loads((first / "manifest.json").read_text())["created_ns"]
    server.start()
    assert server.terminate() == 0  # nothing logged since: the same position
    assert list((data_dir / "snapshots").glob("snap-*")) == [first]
    assert json.loads((first / "manifest.json").read_text())["created_ns"] == written
    server.start()
    assert totals(server) == (BATCH, BATCH)
    server.kill()


def test_a_snapshot_directory_numbered_past_the_log_is_not_kept_in_place_of_the_new_one(data_dir):
    """An unusable snapshot directory numbered past the log (a restore copied halfway) is
    skipped at start; the next snapshot deletes it rather than itself (kept by number, it was the
    newest, and an erasure's purge, which keeps one, deleted the snapshot it had just written)."""
    server = Server(data_dir).start()
    with server.channel() as ch:
        assert send(server.stub(ch), "junk", 1).accepted == BATCH
    server.kill()
    junk = data_dir / "snapshots" / f"snap-{99999:020d}"
    junk.mkdir(parents=True)
    server.start()
    with server.channel() as ch:
        assert server.admin(ch).EraseUser(admin_pb2.EraseUserRequest(user_id="junk-1-0"), timeout=60).events == 1
        assert send(server.stub(ch), "junk", 2).accepted == BATCH
    assert not junk.exists()
    server.kill()
    server.start()
    assert totals(server) == (2 * BATCH - 1, 2 * BATCH - 1)
    server.kill()


def test_torn_tail_is_cut_off_and_logged(data_dir):
    server = Server(data_dir).start()
    with server.channel() as ch:
        for seq in range(5):
            send(server.stub(ch), "p", seq)
    server.kill()
    segment = max((data_dir / "wal").glob("wal-*.log"))
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 37)  # the last record, cut mid-way as by a crash mid-write
    server.start()
    assert totals(server) == (4 * BATCH, 4 * BATCH)
    assert "cutting a torn or corrupt tail" in server.log()
    with server.channel() as ch:  # the producer resends what it never had acked: stored once
        assert send(server.stub(ch), "p", 4).accepted == BATCH
    assert totals(server)[0] == 5 * BATCH
    server.kill()


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_bytes_in_the_last_record_are_a_corrupt_tail(data_dir):
    server = Server(data_dir).start()
    with server.channel() as ch:
        for seq in range(3):
            send(server.stub(ch), "p", seq)
    server.kill()
    segment = max((data_dir / "wal").glob("wal-*.log"))
    flip(segment, segment.stat().st_size - 10)
    server.start()
    assert totals(server) == (2 * BATCH, 2 * BATCH)
    assert "cutting a torn or corrupt tail" in server.log()
    server.kill()


def test_flipped_bytes_before_good_records_refuse_to_start_and_say_where(data_dir):
    server = Server(data_dir).start()
    with server.channel() as ch:
        for seq in range(5):
            send(server.stub(ch), "p", seq)
    server.kill()
    segment = max((data_dir / "wal").glob("wal-*.log"))
    flip(segment, 200)  # inside the first record; four good records follow it
    code, log = server.start_expecting_failure()
    assert code == 2
    assert "refusing to start" in log and str(segment) in log and "damaged at byte 0" in log


def test_damage_in_a_log_segment_the_newest_snapshot_holds_does_not_stop_a_start(data_dir):
    """The log is kept back to the oldest snapshot kept; damage in a segment whose every record
    the newest snapshot holds loses nothing, and the start goes on (it refused)."""
    server = Server(data_dir).start()
    with server.channel() as ch:
        for seq in range(1, 4):
            send(server.stub(ch), "p", seq)
            snapshot(server)
        send(server.stub(ch), "p", 4)
    server.kill()
    covered = sorted((data_dir / "wal").glob("wal-*.log"))[0]  # before the newest snapshot
    assert covered.stat().st_size > 200
    flip(covered, 200)
    server.start()
    assert totals(server) == (4 * BATCH, 4 * BATCH)
    server.kill()


def test_a_torn_tail_followed_only_by_empty_segments_is_cut(data_dir):
    """With --fsync interval a crash after a restart, then the loss of the old segment's last
    unsynced pages, leaves a torn tail followed by the empty segment the restart opened: it is
    cut like any torn tail (the start refused: 'holds records after the damage')."""
    args = ("--fsync", "interval", "--fsync-interval-ms", "20")
    server = Server(data_dir, *args).start()
    with server.channel() as ch:
        for seq in range(1, 4):
            send(server.stub(ch), "p", seq)
    server.kill()
    server.start()
    server.kill()
    old, empty = sorted((data_dir / "wal").glob("wal-*.log"))
    assert empty.stat().st_size == 0
    with open(old, "r+b") as f:  # the last record's last bytes, as pages that never reached the disk
        f.seek(old.stat().st_size - 100)
        f.write(b"\0" * 100)
    server.start()
    assert totals(server) == (2 * BATCH, 2 * BATCH)
    assert "cutting a torn or corrupt tail" in server.log()
    server.kill()


def test_corrupt_newest_snapshot_falls_back_to_the_previous_one_and_the_log(data_dir):
    server = Server(data_dir).start()
    with server.channel() as ch:
        stub = server.stub(ch)
        for seq in range(3):
            send(stub, "p", seq)
        first = snapshot(server)
        for seq in range(3, 6):
            send(stub, "p", seq)
        second = snapshot(server)
        for seq in range(6, 8):
            send(stub, "p", seq)
    assert (first.events, second.events) == (3 * BATCH, 6 * BATCH)
    server.kill()
    flip(data_dir / second.path / "events.arrow", 100)
    server.start()
    assert totals(server) == (8 * BATCH, 8 * BATCH)
    assert "is unusable, trying an older one" in server.log()
    server.kill()


def test_missing_snapshot_directory(data_dir):
    server = Server(data_dir).start()
    with server.channel() as ch:
        for seq in range(4):
            send(server.stub(ch), "p", seq)
    server.kill()
    # No snapshot was ever written: the log holds everything, and suffices.
    assert not list((data_dir / "snapshots").glob("snap-*"))
    server.start()
    assert totals(server) == (4 * BATCH, 4 * BATCH)
    # Once snapshots let the log be pruned, losing them loses events: refuse, and say so.
    for _ in range(3):
        snapshot(server)
    with server.channel() as ch:
        send(server.stub(ch), "p", 4)
    server.kill()
    import shutil

    shutil.rmtree(data_dir / "snapshots")
    code, log = server.start_expecting_failure()
    assert code == 2 and "no snapshot was found" in log and "Restore the snapshots directory" in log


def test_snapshot_under_load_stalls_nothing_and_restores_consistently(data_dir):
    """Several streams ingest and queries run while a snapshot is written; the longest ack or
    query during it must stay under the documented bound (README: 1 s), and a restart from that
    snapshot plus the log has every acked event."""
    server = Server(data_dir, "--snapshot-every-events", "0", "--snapshot-every-seconds", "0").start()
    stop = threading.Event()
    acked = {f"w{i}": 0 for i in range(3)}
    slowest = {"ack": 0.0, "query": 0.0}
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            with server.channel() as ch:
                stub = server.stub(ch)
                while not stop.is_set():
                    started = time.monotonic()
                    send(stub, name, acked[name])
                    slowest["ack"] = max(slowest["ack"], time.monotonic() - started)
                    acked[name] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def read() -> None:
        try:
            with server.channel() as ch:
                stub = server.stub(ch)
                while not stop.is_set():
                    started = time.monotonic()
                    stub.Summary(pb.SummaryRequest(test_id="dur"), timeout=30)
                    slowest["query"] = max(slowest["query"], time.monotonic() - started)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in acked] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    slowest.update(ack=0.0, query=0.0)  # measure only around the snapshot
    info = snapshot(server)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert info.events > 0
    assert slowest["ack"] < 1.0 and slowest["query"] < 1.0, slowest
    server.kill()
    server.start()
    expected = sum(acked.values()) * BATCH
    assert totals(server) == (expected, expected)
    server.kill()
    # The snapshot on its own (as a backup of it would be restored) is a consistent cut: whole
    # batches only, exactly as many events as it says.
    import shutil

    alone = data_dir.parent / "restored"
    shutil.copytree(data_dir / info.path, alone / info.path)
    restored = Server(alone).start()
    assert totals(restored) == (info.events, info.events) and info.events % BATCH == 0
    restored.kill()


def test_graceful_shutdown_under_load_loses_nothing_acked(data_dir):
    server = Server(data_dir, "--grace-seconds", "5").start()
    acked = {f"g{i}": 0 for i in range(3)}
    done = threading.Event()
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            with server.channel() as ch:
                stub = server.stub(ch)
                while not done.is_set():
                    try:
                        ack = send(stub, name, acked[name])
                    except grpc.RpcError:
                        return  # the server is going away: stop, as a producer would, until it is back
                    assert ack.accepted == BATCH, ack
                    acked[name] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in acked]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert server.terminate(timeout=30) == 0
    done.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    log = server.log()
    assert "snapshot" in log and "stopped" in log
    server.start()
    assert "0 log records replayed" in server.log()  # the final snapshot holds everything
    with server.channel() as ch:  # each producer resends the batch it had in flight: once, in any case
        for name in acked:
            send(server.stub(ch), name, acked[name])
            acked[name] += 1
    expected = sum(acked.values()) * BATCH
    assert totals(server) == (expected, expected)
    server.kill()


def test_health_is_not_serving_while_draining(data_dir):
    server = Server(data_dir, "--grace-seconds", "3").start()
    with server.channel() as ch:
        assert server.health(ch) == health_pb2.HealthCheckResponse.SERVING
        stream_done = threading.Event()

        def slow_requests():
            yield pb.IngestEventsRequest(events=[to_message(e) for e in batch_events("h", 0)])
            stream_done.wait(5)

        responses = server.stub(ch).IngestEvents(slow_requests(), timeout=20)
        next(responses)
        server.process.send_signal(15)
        deadline = time.monotonic() + 5
        status = None
        while time.monotonic() < deadline:
            try:
                status = server.health(ch)
            except grpc.RpcError:
                break
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # While the open stream finishes, queries are answered and new ingest streams refused.
        assert server.stub(ch).ListTests(pb.ListTestsRequest(), timeout=5).tests
        with pytest.raises(grpc.RpcError) as refused:
            list(server.stub(ch).IngestEvents(iter([pb.IngestEventsRequest()]), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        stream_done.set()
    assert server.process.wait(timeout=30) == 0


def test_interval_fsync_survives_a_process_crash(data_dir):
    server = Server(data_dir, "--fsync", "interval", "--fsync-interval-ms", "200").start()
    with server.channel() as ch:
        for seq in range(5):
            send(server.stub(ch), "p", seq)
    server.kill()  # the kernel has every write: a process crash loses nothing
    server.start()
    assert totals(server) == (5 * BATCH, 5 * BATCH)
    server.kill()


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_a_log_that_cannot_be_written_stops_ingest_and_a_restart_recovers_what_was_acknowledged(data_dir, fsync):
    """A full disk, made here by a file size limit on the server's process (a write past it fails
    with EFBIG as one on a full disk does with ENOSPC): the batch whose record could not be
    written is refused UNAVAILABLE, and so is every later one, even once there is room again (a
    record written after the failed one would sit behind a hole), and health says NOT_SERVING.
    After a restart the server holds exactly the batches it acknowledged, its log has no torn
    bytes to cut, and the refused batch is stored when sent again (not taken for a duplicate)."""
    server = Server(data_dir, "--fsync", fsync, "--fsync-interval-ms", "20").start()
    segment = max((data_dir / "wal").glob("wal-*.log"))
    full = segment.stat().st_size + 30_000  # the soft limit: raised again below, as a freed disk
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (full, resource.RLIM_INFINITY))
    acked, refused = [], None
    with server.channel() as ch:
        stub = server.stub(ch)
        for seq in range(1, 100):
            try:
                assert send(stub, "full", seq).accepted == BATCH
            except grpc.RpcError as error:
                refused = seq
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert "the write-ahead log could not be written (" in error.details(), error.details()
                break
            acked.append(seq)
        assert refused is not None and len(acked) >= 3
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)  # room again
        for seq in (refused, refused + 1):
            with pytest.raises(grpc.RpcError) as later:
                send(stub, "full", seq)
            assert later.value.code() == grpc.StatusCode.UNAVAILABLE and "write-ahead log" in later.value.details()
        deadline = time.monotonic() + 10
        while server.health(ch) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(urllib.error.HTTPError) as http_health:  # the HTTP API's health says so too
        urllib.request.urlopen(f"http://{server.http_address}/health", timeout=10)
    answer = json.loads(http_health.value.read())
    assert http_health.value.code == 503 and answer["status"] == "NOT_SERVING", answer
    assert answer["error"].startswith("the write-ahead log could not be written ("), answer
    assert server.terminate() == 0  # no last snapshot: what the log does not hold stays out
    server.start()
    assert totals(server) == (len(acked) * BATCH, len(acked) * BATCH)
    assert "cutting a torn" not in server.log()
    with server.channel() as ch:
        assert server.health(ch) == health_pb2.HealthCheckResponse.SERVING
        ack = send(server.stub(ch), "full", refused)
    assert ack.accepted == BATCH and not ack.duplicate
    assert totals(server) == ((len(acked) + 1) * BATCH, (len(acked) + 1) * BATCH)
    server.kill()


def test_a_snapshot_that_cannot_be_written_leaves_nothing_behind(data_dir):
    """A snapshot that fails half-written (a full disk: here a file size limit on the server,
    which fails writes as a full disk does) is refused with its reason, and its partial copy
    is deleted at once, not left to take the room until the next snapshot succeeds; the server
    goes on serving, and the next snapshot, with room again, is whole."""
    server = Server(data_dir).start()
    with server.channel() as ch:
        stub = server.stub(ch)
        for seq in range(1, 51):
            assert send(stub, "snap", seq).accepted == BATCH
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    with pytest.raises(grpc.RpcError) as failed:
        snapshot(server)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.value
    assert failed.value.details().startswith("the snapshot could not be written ("), failed.value.details()
    assert "File too large" in failed.value.details() and "log still holds" in failed.value.details()
    snapshots = data_dir / "snapshots"
    assert not list(snapshots.glob("tmp-*")) and not list(snapshots.glob("snap-*"))
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    with server.channel() as ch:
        assert server.health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert send(server.stub(ch), "snap", 51).accepted == BATCH
    assert snapshot(server).events == 51 * BATCH
    assert [p.name[:5] for p in snapshots.iterdir()] == ["snap-"]
    server.kill()
    server.start()
    assert totals(server) == (51 * BATCH, 51 * BATCH)
    server.kill()


def test_a_stop_whose_last_snapshot_cannot_be_written_is_clean_and_a_half_written_one_is_cleared_at_start(data_dir):
    """A graceful stop on a full disk (a file size limit here) cannot write its last snapshot:
    the log holds every event, so the stop says so and exits 0 (it exited 1, saying the engine
    could not be opened). A snapshot a crash left half-written is deleted by the next start,
    not kept until a later snapshot succeeds (its room may be what makes them fail)."""
    server = Server(data_dir).start()
    with server.channel() as ch:
        for seq in range(1, 6):
            assert send(server.stub(ch), "stop", seq).accepted == BATCH
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    assert server.terminate() == 0
    said = server.log()
    assert "the snapshot could not be written (" in said and "File too large" in said, said
    assert "the next start replays it" in said
    half = data_dir / "snapshots" / f"tmp-{99:020d}"
    half.mkdir(parents=True)
    (half / "events.arrow").write_bytes(b"\0" * 1_000_000)
    server.start()
    assert not half.exists()
    assert totals(server) == (5 * BATCH, 5 * BATCH)
    server.kill()


def test_a_periodic_snapshot_that_failed_waits_before_it_is_tried_again(data_dir):
    """Due every second, a snapshot that fails on a full disk (a file size limit here) is tried
    once, not written and deleted again every second while the disk stays full; the metrics
    count it. (The limit fails the server's own log file too: what it says is not read here.)"""
    server = Server(data_dir, "--snapshot-every-seconds", "1", "--snapshot-every-events", "0",
                    "--metrics-addr", "127.0.0.1:0").start()
    metrics = re.search(r"metrics on (http://\S+)\"", server.log()).group(1)
    with server.channel() as ch:
        stub = server.stub(ch)
        for seq in range(1, 51):
            assert send(stub, "tick", seq).accepted == BATCH
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        time.sleep(4.5)
        assert server.health(ch) == health_pb2.HealthCheckResponse.SERVING
    text = urllib.request.urlopen(metrics, timeout=10).read().decode()
    assert re.search(r"^abstream_snapshot_failures 1\.0$", text, re.M), text
    assert not list((data_dir / "snapshots").glob("*"))
    server.kill()


def test_quarantine_survives_restarts(data_dir):
    server = Server(data_dir).start()
    bad = {**batch_events("q", 0)[0], "conversion": 3}
    with server.channel() as ch:
        ack = send(server.stub(ch), "q", 0, [bad, batch_events("q", 0)[1]])
    assert (ack.accepted, ack.rejected) == (1, 1)
    server.kill()  # from the log
    server.start()
    snapshot(server)
    server.kill()  # from the snapshot
    server.start()
    with server.channel() as ch:
        q = server.stub(ch).ListQuarantine(pb.ListQuarantineRequest(), timeout=10)
    assert q.total == 1 and q.events[0].field == "conversion" and q.events[0].event.conversion == 3
    server.kill()


def test_row_batches_logged_with_their_few_values_as_codes_replay_as_sent(data_dir):
    """A row batch stored whole is logged with its tests, variants, event types, devices and
    countries as codes and their values, later batches bringing new ones (past 127 tests, codes
    of two bytes); a batch with a rejected event, or a column whose dictionary would outweigh
    its values as sent, is logged as sent. A restart from the log alone stores every event as
    sent."""
    from abstream.store import persist
    from abstream.store.wal import WriteAheadLog

    server = Server(data_dir).start()
    sent = []
    with server.channel() as ch:
        for seq in range(12):
            events = [dict(timestamp=(BASE_S + seq) * NS + i, user_id=f"u{seq}-{i}", test_id=f"log-{seq}-{i % 13}",
                           variant=f"v{seq % 4}-{i % 2}", event_type=f"e{seq}", conversion=i % 2,
                           revenue=float(i), session_id=f"s{seq}-{i % 3}", device=f"d{seq % 5}",
                           country="ABCDEFGHIJKL"[seq] + "Z") for i in range(20 if seq == 11 else 600)]
            if seq == 5:
                events[3]["conversion"] = 3
            ack = send(server.stub(ch), "p", seq, events)
            assert (ack.accepted, ack.rejected) == (len(events) - (seq == 5), seq == 5)
            sent += [e for e in events if e["conversion"] in (0, 1)]
    server.kill()

    def logged_as(batch: pa.Table, name: str) -> str:
        t = batch.schema.field(name).type
        return str(t.index_type) if pa.types.is_dictionary(t) else str(t)

    logged = [persist.decode_record(payload).batch for _, payload in WriteAheadLog(data_dir / "wal").replay(0)]
    # 13 new tests a batch: 130 from the 10th; the 12th batch has 20 events, fewer bytes than 143 tests.
    assert [logged_as(b, "test_id") for b in logged] == ["int8"] * 5 + ["string"] + ["int8"] * 3 + ["int16"] * 2 + [
        "string"]
    assert [logged_as(b, "country") for b in logged] == ["int8"] * 5 + ["string"] + ["int8"] * 5 + ["string"]
    assert [logged_as(b, "conversion") for b in logged] == ["uint8"] * 5 + ["int64"] + ["uint8"] * 6

    server.start()
    stored = []
    with server.channel() as ch:
        for test_id in sorted({e["test_id"] for e in sent}):
            for piece in server.admin(ch).ExportEvents(admin_pb2.ExportEventsRequest(test_id=test_id), timeout=30):
                table = pa.ipc.open_stream(piece.arrow_ipc).read_all()
                stored += table.set_column(0, "timestamp", table.column("timestamp").cast(pa.int64())).to_pylist()
    server.kill()
    key = lambda e: (e["test_id"], e["user_id"])  # noqa: E731
    assert sorted(stored, key=key) == sorted(sent, key=key)


def test_records_are_written_by_the_commit_that_syncs_them_or_by_a_rotation_or_the_close(tmp_path):
    """With fsync="always" the storing thread only queues a record: the commit that fsyncs it
    writes it first, and a rotation (for a snapshot) or the close writes what is still queued,
    each into the segment its LSN belongs to."""
    from abstream.store.wal import Payload, WriteAheadLog

    def record(k: int) -> Payload:
        return Payload.of([f"record {k} ".encode(), bytes(range(256)) * k])

    wal = WriteAheadLog(tmp_path)
    wal.open()
    lsns = [wal.append(record(k)) for k in range(3)]
    wal.commit(lsns[1])  # it writes, and its fsync covers, every record queued so far
    assert [lsn for lsn, _ in WriteAheadLog(tmp_path).replay(0)] == lsns
    first_of_next = wal.rotate()
    lsns += [wal.append(record(k)) for k in range(3, 5)]
    wal.close()
    segments = WriteAheadLog(tmp_path).segments()
    assert [first for first, _ in segments] == [lsns[0], first_of_next] and first_of_next == lsns[3]
    replayed = list(WriteAheadLog(tmp_path).replay(0))
    assert [lsn for lsn, _ in replayed] == lsns
    assert [payload for _, payload in replayed] == [b"".join(bytes(p) for p in record(k).pieces) for k in range(5)]


def fsync_failing_once(monkeypatch) -> list[OSError]:
    """The OS's fsync fails once with EIO, as the kernel's does after a lost writeback; the
    failure still to come, in a list (empty once it came)."""
    import errno

    fsync, failures = os.fsync, [OSError(errno.EIO, "Input/output error")]

    def failing(descriptor: int) -> None:
        if failures:
            raise failures.pop()
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing)
    return failures


def test_a_commit_whose_fsync_follows_a_failed_one_is_not_acknowledged(tmp_path, monkeypatch):
    """Linux reports a failed writeback to one fsync of an open file: a commit whose fsync comes
    after the rotation's failed one (both of the same segment) gets success for pages that may
    be lost. Here the OS's fsync fails once, for the rotation, as the kernel's would, and the
    commit that wrote its record before must still be refused."""
    from abstream.core.errors import Unavailable
    from abstream.store import wal as wal_module

    log = wal_module.WriteAheadLog(tmp_path)
    log.open()
    log.append(wal_module.Payload.of([b"a record"]))
    target, fd = log._written()  # a commit's write; its fsync comes next
    failures = fsync_failing_once(monkeypatch)
    with pytest.raises(Unavailable, match="Input/output error"):
        log.rotate()
    assert not failures  # the rotation's fsync took the error; the OS would now report success
    with pytest.raises(Unavailable, match="write-ahead log could not be written"):
        log._synced_to(fd)
    log.close()  # no fsync after the failure, and its descriptor closed once


@contextlib.contextmanager
def no_free_descriptor(pid: int) -> Iterator[None]:
    """The process's limit on descriptors lowered to what it holds: it can open none more."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(set(range(len(used) + 1)) - used), hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))


def test_a_snapshot_out_of_file_descriptors_is_refused_for_now_and_ingest_goes_on(data_dir):
    """A snapshot starts a new log segment: one that finds no free descriptor is refused
    UNAVAILABLE for now, the log going on in the segment it had (before, the old one was closed
    first, and the log stopped for good: every batch after it refused until a restart)."""
    server = Server(data_dir).start()
    pid = server.process.pid
    with server.channel() as ch:
        stub = server.stub(ch)
        assert send(stub, "rot", 1).accepted == BATCH
        with no_free_descriptor(pid), pytest.raises(grpc.RpcError) as refused:
            server.admin(ch).CreateSnapshot(admin_pb2.CreateSnapshotRequest(), timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "cannot start its next segment now (Too many open files)" in refused.value.details()
        assert send(stub, "rot", 2).accepted == BATCH
        assert server.health(ch) == health_pb2.HealthCheckResponse.SERVING
    assert snapshot(server).events == 2 * BATCH
    server.kill()
    server.start()
    assert totals(server) == (2 * BATCH, 2 * BATCH)


def test_records_a_failed_fsync_held_are_cut_off_and_not_replayed(tmp_path, monkeypatch):
    """With --fsync always a record is acknowledged once an fsync covers it: one whose fsync
    failed was refused to its caller, and is cut off the log, so that a restart neither takes
    its caller's resend for a duplicate of it nor, untagged, stores it twice."""
    from abstream.core.errors import Unavailable
    from abstream.store import wal as wal_module

    log = wal_module.WriteAheadLog(tmp_path)
    log.open()
    first = log.append(wal_module.Payload.of([b"acknowledged"]))
    log.commit(first)
    second = log.append(wal_module.Payload.of([b"refused"]))
    fsync_failing_once(monkeypatch)
    with pytest.raises(Unavailable, match="Input/output error"):
        log.commit(second)
    log.close()
    monkeypatch.undo()
    assert [(lsn, payload) for lsn, payload in wal_module.WriteAheadLog(tmp_path).replay(0)] == [
        (first, b"acknowledged")]


def test_recovery_makes_the_records_it_replays_durable_before_the_log_goes_on(tmp_path, monkeypatch):
    """Records a crash leaves in the page cache (written, their fsync never done: acknowledged to
    no one) are replayed, and a producer's resend of one is then acknowledged as its duplicate:
    each segment replay read is fsynced, and the log's directory, before the log takes new
    records, or a power loss after the restart would lose what was acknowledged."""
    from abstream.store import wal as wal_module

    log = wal_module.WriteAheadLog(tmp_path)
    log.open()
    lsns = [log.append(wal_module.Payload.of([b"record %d" % k])) for k in range(3)]
    _, fd = log._written()  # written, as a commit does before its fsync; then the process dies
    os.close(fd)
    synced, fsync = [], os.fsync

    def recorded(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(wal_module.os, "fsync", recorded)
    again = wal_module.WriteAheadLog(tmp_path)
    (segment,) = [str(path) for _, path in again.segments()]
    assert [lsn for lsn, _ in again.replay(0)] == lsns
    assert segment in synced and str(tmp_path) in synced, synced
    again.open()
    again.close()


def test_a_store_whose_sealing_failed_stores_nothing_more_until_a_restart_recovers_it(tmp_path):
    """A seal that fails (memory running out while it sorts) leaves the rows it took neither in
    parts nor in the tail. The store then refuses (UNAVAILABLE, as after a failed log) before it
    logs or shows anything more; before, later batches were logged and shown, then refused at
    the next seal, and each resend of one stored again. A restart replays the log: every batch
    acknowledged, once, and none of those refused."""
    from abstream.core.errors import Stopped
    from abstream.store.durability import Durability
    from abstream.store.engine import EventStore

    from tests.events import random_events, to_table

    def opened() -> EventStore:
        return EventStore(seal_rows=1_000, durability=Durability(tmp_path / "data", snapshot_every_events=0,
                                                                 snapshot_every_seconds=0))

    def batch(seq: int) -> pa.Table:  # more events than a tail holds before it is sealed
        return to_table([dict(e, test_id="sealed") for e in random_events(1_200, seed=seq)])

    store = opened()
    release = threading.Event()

    def failing(*args, **kwargs):
        release.wait(30)
        raise MemoryError("no room to sort the tail")

    store._ingest._seal = failing
    first = store.append(batch(1), "producer", 1)  # sealed, and the seal fails (once released)
    store.commit(first)
    refused: list[BaseException] = []

    def second() -> None:  # fills the tail again: it waits for the seal running, before it is logged
        try:
            store.append(batch(2), "producer", 2)
        except BaseException as error:  # noqa: BLE001 - what the caller got
            refused.append(error)

    sending = threading.Thread(target=second)
    sending.start()
    time.sleep(0.2)
    release.set()
    sending.join(30)
    assert len(refused) == 1 and isinstance(refused[0], Stopped), refused
    assert "sealing the newest events failed (MemoryError: no room" in str(refused[0])
    with pytest.raises(Stopped, match="sealing the newest events failed \\(MemoryError: no room"):
        store.append(batch(2), "producer", 2)  # its resend
    with pytest.raises(Stopped, match="until it is restarted"):
        store.maintain()  # the server's health: NOT_SERVING
    store.close(final_snapshot=False)
    store = opened()
    assert {t.test_id: t.events for t in store.list_tests()} == {"sealed": first.accepted}
    second = store.append(batch(2), "producer", 2)
    store.commit(second)
    assert {t.test_id: t.events for t in store.list_tests()} == {"sealed": first.accepted + second.accepted}
    store.close()


def test_a_log_out_of_file_descriptors_refuses_for_now_and_loses_nothing(data_dir):
    """A commit that finds no free descriptor (the process's limit lowered below what it uses)
    is refused UNAVAILABLE, and its record stays queued: the next commit writes it, and a
    restart after SIGKILL recovers every batch (before, the record was dropped, the next
    commit's fsync taken for it, and the log had a hole a restart refused to replay past)."""
    server = Server(data_dir).start()
    pid = server.process.pid
    with server.channel() as ch:
        stub = server.stub(ch)
        assert send(stub, "fd", 1).accepted == BATCH
        with no_free_descriptor(pid), pytest.raises(grpc.RpcError) as refused:
            send(stub, "fd", 2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "the write-ahead log cannot be written now (Too many open files)" in refused.value.details()
        assert send(stub, "fd", 3).accepted == BATCH
        assert send(stub, "fd", 2).duplicate  # applied before its refusal, and durable with the next commit
        assert server.health(ch) == health_pb2.HealthCheckResponse.SERVING
    server.kill()
    server.start()
    assert totals(server) == (3 * BATCH, 3 * BATCH)
    server.kill()


def test_records_queued_in_more_pieces_than_one_writev_takes_are_written_whole(tmp_path):
    """A commit writes every record queued before it: together they may hold more buffers than
    one writev takes (1,024 on Linux)."""
    from abstream.store.wal import Payload, WriteAheadLog

    records = [Payload.of([bytes([k, j]) * (j + 1) for j in range(50)]) for k in range(40)]  # 2,000+ pieces
    wal = WriteAheadLog(tmp_path)
    wal.open()
    lsns = [wal.append(r) for r in records]
    wal.commit(lsns[-1])
    wal.close()
    replayed = list(WriteAheadLog(tmp_path).replay(0))
    assert [lsn for lsn, _ in replayed] == lsns
    assert [payload for _, payload in replayed] == [b"".join(r.pieces) for r in records]


def test_snapshots_by_count_wait_for_a_share_of_the_store_and_a_restart_replays_the_rest(tmp_path, caplog):
    """With --snapshot-every-events 1000 and --snapshot-log-ratio 1, snapshots come at 1,000,
    2,000 and 4,000 events (each once the events since the last one are as many as it holds),
    not at every 1,000 as with a ratio of 0. A restart replays what came after the last one."""
    import logging
    import re

    from abstream.core.engine import append
    from abstream.store import Durability, EventStore
    from tests.events import random_events, to_table

    events = random_events(5000, seed=3)  # 5,250 events, every one valid

    def snapshots_at(ratio: float, data: Path) -> list[int]:
        caplog.clear()
        store = EventStore(durability=Durability(data, snapshot_every_events=1000, snapshot_log_ratio=ratio,
                                                 snapshot_every_seconds=0))
        for i in range(0, len(events), 500):
            append(store, to_table(events[i:i + 500]))  # acked: on disk
            store.maintain()  # what the server runs once a second
        store.close(final_snapshot=False)  # left as a crash leaves it: no final snapshot
        return [int(m.group(1)) for r in caplog.records if (m := re.search(r"written: (\d+) events", r.getMessage()))]

    caplog.set_level(logging.INFO, logger="abstream.store")
    assert snapshots_at(1.0, tmp_path / "proportional") == [1000, 2000, 4000]
    assert snapshots_at(0.0, tmp_path / "fixed") == [1000, 2000, 3000, 4000, 5000]
    caplog.clear()
    store = EventStore(durability=Durability(tmp_path / "proportional"))
    assert store.event_count == len(events) == 5250
    recovered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recovered")]
    assert len(recovered) == 1 and "3 log records replayed" in recovered[0]  # the 1,250 after 4,000
    store.close()


def test_a_log_of_rejected_events_alone_is_snapshotted_too(tmp_path, caplog):
    """The events since the last snapshot are those the log holds, rejected ones too: a producer
    sending only bad events grew the log without end, never snapshotted (none was stored)."""
    import logging

    from abstream.core.engine import append
    from abstream.store import Durability, EventStore
    from tests.events import random_events, to_table

    bad = to_table([{**e, "conversion": 7} for e in random_events(600, seed=5)])
    caplog.set_level(logging.INFO, logger="abstream.store")
    store = EventStore(durability=Durability(tmp_path, snapshot_every_events=1000, snapshot_every_seconds=0))
    for _ in range(2):
        assert append(store, bad).accepted == 0
        store.maintain()  # what the server runs once a second
    written = [r.getMessage() for r in caplog.records if "written: 0 events" in r.getMessage()]
    assert len(written) == 1, [r.getMessage() for r in caplog.records]
    store.close(final_snapshot=False)  # as a crash leaves it
    caplog.clear()
    store = EventStore(durability=Durability(tmp_path))
    recovered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recovered")]
    assert len(recovered) == 1 and "0 log records replayed" in recovered[0], recovered
    assert store.quarantine("", 1, "")[1] == 2 * bad.num_rows
    store.close()


def test_snapshots_by_time_wait_for_a_share_of_the_store_too(tmp_path, caplog):
    """With --snapshot-every-seconds and a ratio of 0.5, a trickle of events does not have the
    whole store written again each interval: 1,000 events are snapshotted, 100 more are not
    (a tenth of it), 500 more are. With a ratio of 0, every interval with an event is."""
    import logging
    import re

    from abstream.core.engine import append
    from abstream.store import Durability, EventStore
    from tests.events import random_events, to_table

    events = random_events(1600, seed=4)[:1600]  # every one valid (with duplicates: more than asked)

    def snapshots_at(ratio: float, data: Path) -> list[int]:
        caplog.clear()
        store = EventStore(durability=Durability(data, snapshot_every_events=0, snapshot_log_ratio=ratio,
                                                 snapshot_every_seconds=0.05))
        for lo, hi in ((0, 1000), (1000, 1100), (1100, 1600)):
            append(store, to_table(events[lo:hi]))
            time.sleep(0.06)  # the interval has passed
            store.maintain()  # what the server runs once a second
        store.close(final_snapshot=False)
        return [int(m.group(1)) for r in caplog.records if (m := re.search(r"written: (\d+) events", r.getMessage()))]

    caplog.set_level(logging.INFO, logger="abstream.store")
    assert snapshots_at(0.5, tmp_path / "proportional") == [1000, 1600]
    assert snapshots_at(0.0, tmp_path / "every_interval") == [1000, 1100, 1600]
