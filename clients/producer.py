"""A producer for services that emit events: cheap sends, background batches, exactly-once retries.

    from abstream.clients import Producer
    with Producer("127.0.0.1:50051") as producer:
        future = producer.send({"timestamp": "2025-04-28 18:42:22", "user_id": "user_455",
                                "test_id": "test_5", "variant": "variant_a", "conversion": 1})
        ...
    print(future.result())  # Delivery(accepted=True, ...), or the rejection and its reason

`send` puts the event in a bounded buffer and returns a future at once. A background thread
sends batches of up to `batch_size` events, or whatever arrived within `linger_ms`, each tagged
with the producer's id and the next sequence number. A batch that meets UNAVAILABLE,
RESOURCE_EXHAUSTED or a lost connection is sent again, with the same sequence, after an
exponential backoff with full jitter: the server applies it once however often it arrives. A
batch larger than the server takes in one request is sent in halves; an event too large alone is
rejected (field "event"). When
the buffer is full, `send` blocks (`when_full="block"`, the default) or raises `BufferFull`;
no event is ever dropped without its future saying so.
"""

from __future__ import annotations

import datetime as dt
import queue
import random
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from abstream.clients.client import channel_for
from abstream.clients.files import typed_event
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc

RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
_STRINGS = tuple(f.name for f in pb.Event.DESCRIPTOR.fields if f.type == f.TYPE_STRING)


class BufferFull(Exception):
    """The producer's buffer is full and it was asked not to wait."""


class ProducerClosed(Exception):
    """The producer was closed before this event could be sent."""


@dataclass(frozen=True)
class Delivery:
    """What became of one event."""

    accepted: bool
    field: str = ""  # for a rejected event: which field, and why
    message: str = ""
    # Its batch had been applied before (a retry after a lost ack). The server keeps no per-event
    # outcome of a batch, so `accepted` then means sent and applied, not taken: an event the
    # server rejected the first time is in its quarantine, not in the results.
    duplicate: bool = False


class NoAck(Exception):
    """The server ended a batch's stream without acknowledging it (a proxy between cutting it)."""


class Unsendable(Exception):
    """An event that cannot even be put in a message: `field` and `message` say why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def to_event(event: dict[str, Any] | pb.Event) -> pb.Event:
    """An Event from a message or a dict as users send it today (timestamp 'YYYY-MM-DD HH:MM:SS' UTC,
    RFC 3339, a datetime or epoch seconds); Unsendable, naming the field, when a value cannot be."""
    if isinstance(event, pb.Event):
        return event
    if not isinstance(event, dict):
        raise Unsendable("event", f"must be a dict of Event fields, got {type(event).__name__}")
    row, why = typed_event({k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in event.items()})
    if why:
        raise Unsendable(*why)
    if row.get("conversion") is not None and not 0 <= row["conversion"] < 2**32:
        raise Unsendable("conversion", f"conversion must be 0 or 1, got {row['conversion']}")
    message = pb.Event(**{k: row[k] for k in _STRINGS if row.get(k) is not None})
    if row.get("conversion") is not None:
        message.conversion = row["conversion"]
    if row.get("revenue") is not None:
        message.revenue = row["revenue"]
    if row.get("timestamp") is not None:
        message.timestamp.FromDatetime(row["timestamp"])
    return message


class Producer:
    def __init__(self, addr: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool | bytes | None = None,
                 producer_id: str | None = None, first_sequence: int | None = None, batch_size: int = 1000,
                 linger_ms: float = 50, max_buffered: int = 100_000, when_full: str = "block",
                 retry_initial_s: float = 0.1, retry_max_s: float = 10.0, give_up_after_s: float = 300.0,
                 timeout: float = 30.0, cert: bytes | None = None, key: bytes | None = None) -> None:
        """`producer_id` names this producer for exactly-once ingest (a new one by default).
        Reusing an id across runs needs sequences that keep increasing: they start at
        `first_sequence`, by default the current time in nanoseconds, which a later run exceeds."""
        if when_full not in ("block", "raise"):
            raise ValueError("when_full must be 'block' or 'raise'")
        self.producer_id = producer_id or f"py-{uuid.uuid4()}"
        self._sequence = time.time_ns() if first_sequence is None else first_sequence
        self._batch_size, self._linger = batch_size, linger_ms / 1000
        self._when_full = when_full
        self._retry = (retry_initial_s, retry_max_s, give_up_after_s)
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = channel_for(addr, tls, cert=cert, key=key)  # cert and key (PEM): mutual TLS, as Client's
        self._stub = pb_grpc.AnalyticsServiceStub(self._channel)
        self._buffer: queue.Queue = queue.Queue(maxsize=max_buffered)
        self._unfinished = 0
        self._idle = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abstream-producer", daemon=True)
        self._thread.start()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the caller's side -------------------------------------------------------------------

    def send(self, event: dict[str, Any] | pb.Event,
             callback: Callable[[Future], None] | None = None) -> Future:
        """Queues one event; the future resolves to a Delivery once its batch is acknowledged."""
        if self._closing.is_set():
            raise ProducerClosed("the producer is closed")
        future: Future = Future()
        if callback is not None:
            future.add_done_callback(callback)
        try:
            item = (to_event(event), future)
        except Unsendable as error:  # rejected here, in the server's words, as the server would
            future.set_result(Delivery(False, error.field, error.message))
            return future
        with self._idle:
            self._unfinished += 1
        try:
            if self._when_full == "block":
                self._buffer.put(item)
            else:
                self._buffer.put_nowait(item)
        except queue.Full:
            self._done(1)
            raise BufferFull(f"{self._buffer.maxsize} events are waiting to be sent") from None
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every event sent so far has its outcome; False if `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Sends what is buffered, then stops; every future has its outcome when it returns.
        Events still unsent after `timeout` fail with ProducerClosed. Closing again does nothing."""
        if self._closing.is_set():
            return
        self.flush(timeout)
        self._closing.set()
        self._thread.join(timeout=5)  # a batch being retried gives up after a few more attempts
        self._fail_buffered()
        self._channel.close()  # a call still in flight ends now: its batch fails with ProducerClosed
        self._thread.join()
        self._fail_buffered()

    def _fail_buffered(self) -> None:
        failed = 0
        while True:
            try:
                _, future = self._buffer.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(ProducerClosed("closed before this event was sent"))
            failed += 1
        self._done(failed)

    # ---- the background thread ---------------------------------------------------------------

    def _done(self, n: int) -> None:
        with self._idle:
            self._unfinished -= n
            self._idle.notify_all()

    def _run(self) -> None:
        while not self._closing.is_set() or not self._buffer.empty():
            batch = self._gather()
            taken = [(e, f) for e, f in batch if f.set_running_or_notify_cancel()]  # cancelled: not sent
            self._done(len(batch) - len(taken))
            if taken:
                try:
                    self._deliver(taken)
                except Exception as error:  # noqa: BLE001 - a defect fails its batch, not every later one
                    self._fail([(e, f) for e, f in taken if not f.done()], error)

    def _gather(self) -> list[tuple[pb.Event, Future]]:
        batch = []
        try:
            batch.append(self._buffer.get(timeout=0.1))
        except queue.Empty:
            return batch
        deadline = time.monotonic() + self._linger
        while len(batch) < self._batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._buffer.get(timeout=max(remaining, 0)) if remaining > 0
                             else self._buffer.get_nowait())
            except queue.Empty:
                break
        return batch

    def _deliver(self, batch: list[tuple[pb.Event, Future]]) -> None:
        """Sends a batch under the next sequence until it is acked, retrying what may pass later;
        a batch larger than the server takes is sent again in halves (each under a sequence of
        its own: the server never read it), down to the one event too large to send."""
        self._sequence += 1
        request = pb.IngestEventsRequest(events=[e for e, _ in batch], producer_id=self.producer_id,
                                         sequence=self._sequence)
        initial, ceiling, give_up = self._retry
        started, attempt = time.monotonic(), 0
        while True:
            try:
                responses = self._stub.IngestEvents(iter([request]), timeout=self._timeout, metadata=self._metadata)
                ack = next(responses, None)
                _drain(responses)  # a server going away may end the stream with UNAVAILABLE after the ack
                if ack is None:  # sent again as it was lost (under its sequence: stored once), until give_up
                    if time.monotonic() - started > give_up or self._closing.is_set():
                        self._fail(batch, NoAck("the server ended the stream without acknowledging the batch"))
                        return
                    self._closing.wait(min(ceiling, initial * 2 ** attempt))
                    attempt += 1
                    continue
                break
            except grpc.RpcError as error:
                if too_large(error):
                    if len(batch) > 1:
                        self._deliver(batch[: len(batch) // 2])
                        self._deliver(batch[len(batch) // 2:])
                    else:
                        batch[0][1].set_result(Delivery(False, "event", f"is larger than the server takes in one "
                                                                        f"request ({error.details()})"))
                        self._done(1)
                    return
                retriable = error.code() in RETRIED
                if not retriable or time.monotonic() - started > give_up or self._closing.is_set() and attempt > 3:
                    self._fail(batch, ProducerClosed("closed before this event was sent")
                               if error.code() == grpc.StatusCode.CANCELLED and self._closing.is_set() else error)
                    return
                # Full jitter: anywhere up to the exponential step, so retries spread out; never
                # sooner than the server asked (within what is left before giving up).
                self._closing.wait(max(random.uniform(0, min(ceiling, initial * 2 ** attempt)),
                                       min(retry_delay(error), max(give_up - (time.monotonic() - started), 0.0))))
                attempt += 1
            except ValueError:  # the channel was closed under it (close() after its timeout)
                self._fail(batch, ProducerClosed("closed before this event was sent"))
                return
        rejected = {r.index: r for r in ack.rejections}
        for i, (_, future) in enumerate(batch):
            r = rejected.get(i)
            future.set_result(Delivery(False, r.field, r.message) if r else Delivery(True, duplicate=ack.duplicate))
        self._done(len(batch))

    def _fail(self, batch: list[tuple[pb.Event, Future]], error: BaseException) -> None:
        for _, future in batch:
            future.set_exception(error)
        self._done(len(batch))


def retry_delay(error: grpc.RpcError) -> float:
    """How long the server asked to wait before trying again (its google.rpc.RetryInfo: a full
    disk's minute, a token's rate), in seconds; 0 when it did not say."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)
    except (AttributeError, ValueError):  # not a call's error, or details that do not parse
        return 0.0
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return 0.0


def too_large(error: grpc.RpcError) -> bool:
    """The request was more than the server (or this channel) takes in one message: sending it
    again cannot pass."""
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or "")


def _drain(responses) -> None:
    try:
        for _ in responses:
            pass
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
