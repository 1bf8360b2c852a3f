"""Where the cluster engine's statements run: a ClickHouse cluster, or chDB in-process.

`Cluster` discovers the shards and their replicas from `system.clusters`, runs an aggregation on
one replica of every shard at once (trying the next replica when one does not answer), and
inserts through the Distributed tables with a quorum of replicas. `Local` is the same interface
over chDB (current ClickHouse, one process, one "shard"): the tests run every statement on it
as well as on the cluster, so the engine works on the servers people run today.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from abstream.core import threads
from abstream.core.errors import AbstreamError, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger("abstream.clickhouse")
# The driver logs each failed connection with its stack trace; what failed is said once, by us.
logging.getLogger("clickhouse_driver.connection").setLevel(logging.ERROR)

Columns = list[list[Any]]  # a result, column by column
INSERT_QUORUM_TIMEOUT_MS = 10_000
SILENT_SECONDS = 30.0  # a replica that did not answer is tried last this long

#: ClickHouse error codes, and what they are to a caller.
_TIMEOUT = {159}  # TIMEOUT_EXCEEDED: max_execution_time, the query's deadline
_RETRIABLE = {
    209: "a server did not answer in time",  # SOCKET_TIMEOUT (a server hung, or its machine)
    210: "a server is unreachable",  # NETWORK_ERROR
    242: "a table is read-only: its replica has lost ZooKeeper",  # TABLE_IS_READ_ONLY
    279: "no replica answered",  # ALL_CONNECTION_TRIES_FAILED
    285: "too few live replicas for the insert quorum",  # TOO_FEW_LIVE_REPLICAS
    286: "the previous quorum insert is not satisfied yet",  # UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
    319: "the outcome of a quorum insert is unknown",  # UNKNOWN_STATUS_OF_INSERT
    999: "ZooKeeper is unavailable",  # KEEPER_EXCEPTION
    225: "ZooKeeper is unavailable",  # NO_ZOOKEEPER
    244: "ZooKeeper answered unexpectedly",  # UNEXPECTED_ZOOKEEPER_ERROR
    252: "a table has too many parts: merges are behind inserts",  # TOO_MANY_PARTS
    289: "a replica is behind the last quorum insert",  # REPLICA_IS_NOT_IN_QUORUM
    394: "the statement was cancelled (a server stopping)",  # QUERY_WAS_CANCELLED
    425: "a system error",  # SYSTEM_ERROR (a lost connection to ZooKeeper, among others)
}
#: Codes that say a server is too busy now: RESOURCE_EXHAUSTED, retried later.
_BUSY = {
    202: "too many statements at once",  # TOO_MANY_SIMULTANEOUS_QUERIES
    241: "out of memory for the statement",  # MEMORY_LIMIT_EXCEEDED
}


#: Codes that mean ZooKeeper cannot be reached.
_ZOOKEEPER = {999, 225, 242}
#: UNKNOWN_TABLE, UNKNOWN_DATABASE: said by a replica that lacks the schema the others have (after
#: an unclean stop a server may come back without a table whose parts ZooKeeper does not list);
#: and REPLICA_IS_NOT_IN_QUORUM, by one behind the last quorum insert. The shard's other replica
#: can answer.
_LACKING = {60, 81, 289}
#: The longest statement a server parses, sent with every query: a statement lists a test's
#: variants (a lift), or the tests a removal names, and ClickHouse refuses one past 256 KiB.
MAX_QUERY_BYTES = 16 << 20
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _said(error: BaseException) -> str:
    """What ClickHouse said, on one line, without its stack trace (some versions give only
    "Code: 62." on the first line, and the reason on the next)."""
    said = " ".join(str(error).split("Stack trace")[0].split())
    return said[:400] or type(error).__name__


def translate(error: BaseException, where: str) -> AbstreamError:
    """A driver's error as one of ours: what cannot be helped now is UNAVAILABLE (retry later),
    carrying ClickHouse's code as `code`."""
    from clickhouse_driver import errors

    code = getattr(error, "code", None)
    if code in _TIMEOUT:
        return DeadlineExceeded(f"{where}: the query ran past its deadline (the caller's, or the server's "
                                "--max-query-seconds) and was stopped")
    if isinstance(error, (errors.NetworkError, errors.SocketTimeoutError, EOFError, OSError)) or code in _RETRIABLE:
        why = _RETRIABLE.get(code, "the server went away")
        unavailable = Unavailable(f"{where}: {why} ({_said(error)})", retry_after=1.0)
        unavailable.code = code
        return unavailable
    if code in _BUSY:
        return ResourceExhausted(f"{where}: ClickHouse is {_BUSY[code]} ({_said(error)})", retry_after=1.0)
    return AbstreamError(f"{where}: ClickHouse refused the statement: {_said(error)}")


@dataclass(frozen=True)
class Replica:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Shard:
    number: int
    replicas: list[Replica]
    _idle: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)

    @property
    def name(self) -> str:
        return f"shard {self.number} ({', '.join(map(str, self.replicas))})"


class Cluster:
    """A ClickHouse cluster reached through `seeds` (host:port, …), as `cluster` in its config."""

    def __init__(self, seeds: Sequence[str], cluster: str, database: str, *, insert_quorum: int = 2,
                 user: str = "default", password: str = "", connect_timeout: float = 2.0,
                 timeout: float = 30.0) -> None:
        for option, name in (("--clickhouse-cluster", cluster), ("--clickhouse-database", database)):
            if not _NAME.fullmatch(name):  # written into statements as it is
                raise AbstreamError(f"{option} must be a name of letters, digits and underscores, not starting "
                                    f"with a digit, not {name[:64]!r}")
        self.cluster, self.database = cluster, database
        self.insert_quorum = insert_quorum
        # Reads see every acked batch at once only if batches are acked on a quorum: sequential
        # consistency shows data up to the last quorum insert, and would hide later inserts made
        # without one. With a quorum of 1, a read may miss a batch a replica has not fetched yet.
        self._read = {"select_sequential_consistency": 1} if insert_quorum > 1 else {}
        # `timeout`: the longest a server may stay silent, from its handshake on (a hung server,
        # or a stopped one, still accepts connections: only this fails it over to the next
        # replica); ClickHouse reports a running query's progress meanwhile.
        self._credentials = {"user": user, "password": password, "connect_timeout": connect_timeout,
                             "send_receive_timeout": timeout, "sync_request_timeout": 5}
        self._seeds = [_replica(s) for s in seeds]
        self._lock = threading.Lock()
        self._silent: dict[Replica, float] = {}  # replicas that did not answer: tried last until then
        self._silencing = threading.Lock()
        self.timeout = timeout
        self.shards = self._discover()
        fewest = min(self.shards, key=lambda shard: len(shard.replicas))
        if len(fewest.replicas) < insert_quorum:  # every insert would wait for replicas there are not
            raise AbstreamError(f"--clickhouse-insert-quorum is {insert_quorum}, but {fewest.name} has "
                                f"{len(fewest.replicas)} replica(s): no batch could ever be acknowledged")
        self._insert = self._insert_settings()
        self._pool = threads.pool("abstream-shards", max(len(self.shards), 1))

    # ---- topology ---------------------------------------------------------------------------

    def _client(self, replicas: Sequence[Replica], settings: dict | None = None):
        """A client of the first of `replicas` that answers (the driver tries each in turn),
        those that did not answer lately last: each costs `timeout` when hung."""
        from clickhouse_driver import Client

        now = time.monotonic()
        order = sorted(replicas, key=lambda r: max(self._silent.get(r, 0.0), now))  # silent longest, last
        client = Client(order[0].host, order[0].port, alt_hosts=",".join(map(str, order[1:])) or None,
                        settings={"max_query_size": MAX_QUERY_BYTES, **(settings or {})}, **self._credentials)
        client.abstream_order = order
        return client

    def _answered(self, client) -> None:
        """Notes which replica `client` reached: the ones it tried before did not answer. Its
        order is then the driver's, which goes on from the one reached."""
        order, reached = client.abstream_order, _connected_to(client)
        if reached in order and (at := order.index(reached)):
            for replica in order[:at]:
                self._silence(replica)
            client.abstream_order = order[at:] + order[:at]

    def _silence(self, replica: Replica, why: str = "did not answer") -> None:
        with self._silencing:  # statements of every shard at once: said once
            if self._silent.get(replica, 0.0) < time.monotonic():
                log.warning("ClickHouse at %s %s: tried last for the next %.0f s", replica, why, SILENT_SECONDS)
            self._silent[replica] = time.monotonic() + SILENT_SECONDS

    def _idle_client(self, shard: Shard):
        """An idle client of `shard` not connected to a replica that did not answer lately (each
        would wait for it again), or None."""
        while True:
            try:
                client = shard._idle.get_nowait()
            except queue.Empty:
                return None
            if self._silent.get(_connected_to(client), 0.0) < time.monotonic():
                return client
            client.disconnect()

    def _discover(self) -> list[Shard]:
        """The shards and replicas of the cluster, as its servers know them."""
        sql = ("SELECT shard_num, host_address, port FROM system.clusters "
               f"WHERE cluster = '{self.cluster}' ORDER BY shard_num, replica_num")
        try:
            rows = self._client(self._seeds).execute(sql)
        except Exception as error:  # noqa: BLE001 - the driver's, translated
            raise translate(error, f"ClickHouse at {', '.join(map(str, self._seeds))}") from error
        if not rows:
            raise AbstreamError(f"the ClickHouse servers at {', '.join(map(str, self._seeds))} know no cluster "
                                f"named {self.cluster!r} (remote_servers in their config)")
        shards: dict[int, list[Replica]] = {}
        for number, host, port in rows:
            shards.setdefault(number, []).append(Replica(host, port))
        return [Shard(n, r) for n, r in sorted(shards.items())]

    def _insert_settings(self) -> dict:
        """What every insert is sent with: no limit to the months one batch spans, where the
        servers have one (current ClickHouse refuses a block of over 100 partitions, a batch
        the embedded engine takes; 18.16 has no such limit, and refuses the setting)."""
        sql = "SELECT count() FROM system.settings WHERE name = 'max_partitions_per_insert_block'"
        try:
            (known,), = self.query(sql)
        except AbstreamError:
            known = 0
        return {"max_partitions_per_insert_block": 0} if known else {}

    # ---- running statements -----------------------------------------------------------------

    def _on(self, shard: Shard, sql: str, settings: dict) -> Columns:
        """`sql` on one replica of `shard`: the first that answers, tried again once on a fresh
        connection when an idle one went stale, and without sequential consistency when ZooKeeper
        is down (which it needs): no insert can be acked meanwhile, and with a quorum of every
        replica, each replica has every acked batch."""
        try:
            return self._on_a_replica(shard, sql, settings)
        except Unavailable as error:
            if not settings.get("select_sequential_consistency") or error.code not in _ZOOKEEPER:
                raise
            log.warning("%s: ZooKeeper is unavailable; reading without sequential consistency", shard.name)
            return self._on_a_replica(shard, sql, {k: v for k, v in settings.items()
                                                   if k != "select_sequential_consistency"})

    def _on_a_replica(self, shard: Shard, sql: str, settings: dict) -> Columns:
        """A replica that lacks a table is tried last, and the next one asked: the shard's data is
        on each of them."""
        stale_retried, lacking = False, 0
        while True:
            client = self._idle_client(shard) or self._client(shard.replicas)
            at = _connected_to(client)
            try:
                result = _columns(client, sql, settings)
                self._answered(client)
                shard._idle.put(client)
                return result
            except Exception as error:  # noqa: BLE001 - the driver's, translated
                code = getattr(error, "code", None)
                if code in (209, 210) and at is not None:  # the replica it was connected to went silent
                    self._silence(at)
                lacks = _reached(client) if code in _LACKING else None
                if lacks is not None:
                    self._silence(lacks, f"cannot answer for its shard ({_said(error)})")
                client.disconnect()
                if lacks is not None and (lacking := lacking + 1) < len(shard.replicas):
                    continue
                if stale_retried or code not in (None, 209, 210):
                    raise translate(error, shard.name) from error
                stale_retried = True

    def each_shard(self, sql: str, *, timeout: float | None = None, partial: bool = False
                   ) -> tuple[list[Columns], list[str]]:
        """`sql` on every shard at once: (each answering shard's result, the shards that did not).
        Without `partial`, a shard that does not answer fails the whole call, naming it."""
        settings = dict(self._read)
        if timeout is not None:
            settings["max_execution_time"] = max(int(timeout), 1)
        futures = [(shard, self._pool.submit(self._on, shard, sql, settings)) for shard in self.shards]
        results, missing = [], []
        for shard, future in futures:
            try:
                results.append(future.result())
            except Unavailable:
                if not partial:
                    raise
                missing.append(shard.name)
        return results, missing

    def each_replica(self, sql: str) -> tuple[list[Columns], list[str]]:
        """`sql` on every replica of every shard (what each holds of its own, such as the state
        of its mutations): the answers, and the replicas that did not answer."""
        replicas = [r for shard in self.shards for r in shard.replicas]
        futures = [(r, self._pool.submit(self._on_replica, r, sql)) for r in replicas]
        results, missing = [], []
        for replica, future in futures:
            try:
                results.append(future.result())
            except Unavailable:
                missing.append(str(replica))
        return results, missing

    def _on_replica(self, replica: Replica, sql: str) -> Columns:
        client = self._client([replica])
        try:
            return _columns(client, sql, {})
        except Exception as error:  # noqa: BLE001 - the driver's, translated
            raise translate(error, str(replica)) from error
        finally:
            client.disconnect()

    def stream(self, sql: str, rows: int) -> Iterator[Columns]:
        """`sql` on each shard in turn (one replica of it), `rows` rows at a time as they arrive:
        a result larger than memory is never held whole."""
        for shard in self.shards:
            client = self._client(shard.replicas)
            try:
                block: list[tuple] = []
                for row in client.execute_iter(sql, settings={**self._read, "max_block_size": rows}):
                    block.append(row)
                    if len(block) == rows:
                        yield [list(c) for c in zip(*block)]
                        block = []
                if block:
                    yield [list(c) for c in zip(*block)]
            except Exception as error:  # noqa: BLE001 - the driver's, translated
                raise translate(error, shard.name) from error
            finally:
                client.disconnect()

    def query(self, sql: str) -> Columns:
        """`sql` over the Distributed tables, from any server that answers."""
        everyone = [r for shard in self.shards for r in shard.replicas]
        for settings in (self._read, {}):
            try:
                client = self._client(everyone)
                result = _columns(client, sql, settings)
                self._answered(client)
                return result
            except Exception as error:  # noqa: BLE001 - the driver's, translated
                translated = translate(error, f"cluster {self.cluster}")
                if not settings or getattr(translated, "code", None) not in _ZOOKEEPER:
                    raise translated from error

    def insert(self, table: str, columns: dict[str, list]) -> None:
        """Rows (given column by column) into a Distributed table, acknowledged once every shard's
        part is on `insert_quorum` replicas. The same rows sent again in the same order form the
        same blocks, which the replicas recognise and drop."""
        everyone = [r for shard in self.shards for r in shard.replicas]
        self._quorum_insert(everyone, self.table(table), columns, {"insert_distributed_sync": 1},
                            f"cluster {self.cluster}")

    def insert_everywhere(self, table: str, columns: dict[str, list]) -> None:
        """Rows into `table`'s local table on every shard: a small table each shard holds whole,
        so that any shard can answer for it. Fails naming a shard that did not take them (the
        shards before it did); sending them again is safe."""
        for shard in self.shards:
            self._quorum_insert(shard.replicas, self.local(table), columns, {}, shard.name)

    def _quorum_insert(self, replicas: Sequence[Replica], table: str, columns: dict[str, list], settings: dict,
                       where: str) -> None:
        # A quorum insert sent just after a replica died waits for it until insert_quorum_timeout
        # (10 minutes by default): fail after seconds instead, as UNAVAILABLE; the retry is safe.
        settings = {**settings, **self._insert, "insert_quorum": self.insert_quorum,
                    "insert_quorum_timeout": INSERT_QUORUM_TIMEOUT_MS}
        deadline = time.monotonic() + INSERT_QUORUM_TIMEOUT_MS / 1000
        lacking = 0
        while True:
            client = self._client(replicas)
            try:
                client.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", list(columns.values()),
                               columnar=True, settings=settings)
                self._answered(client)
                return
            except Exception as error:  # noqa: BLE001 - the driver's, translated
                code = getattr(error, "code", None)
                if code in _LACKING and (lacking := lacking + 1) < len(replicas):
                    # A replica without the table: another one takes the insert. Tried last for a
                    # while if it is the one reached (not when a server it sent rows to said so).
                    if "Received from" not in str(error):
                        self._silence(_reached(client), f"cannot take an insert ({_said(error)})")
                    continue
                # One quorum insert at a time per partition (18.16): another gateway's (or stream's)
                # is being confirmed. Ours goes once it is; resending the same rows is safe.
                if code != 286 or time.monotonic() > deadline:
                    raise translate(error, where) from error
                time.sleep(0.02)
            finally:
                client.disconnect()

    def execute(self, sql: str) -> None:
        """A statement (DDL) on any server."""
        everyone = [r for shard in self.shards for r in shard.replicas]
        try:
            client = self._client(everyone)
            client.execute(sql)
            self._answered(client)
        except Exception as error:  # noqa: BLE001 - the driver's, translated
            raise translate(error, f"cluster {self.cluster}") from error

    def local(self, table: str) -> str:
        return f"{self.database}.{table}_local"

    def table(self, table: str) -> str:
        return f"{self.database}.{table}"

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for shard in self.shards:
            while True:
                try:
                    shard._idle.get_nowait().disconnect()
                except queue.Empty:
                    break


class Local:
    """The same interface over chDB: one process, one shard, plain MergeTree tables."""

    cluster = None

    def __init__(self, database: str = "ab", path: str | None = None) -> None:
        from chdb import session

        self.database = database
        self._session = session.Session(path) if path else session.Session()
        self._session.query(f"SET max_query_size = {MAX_QUERY_BYTES}")  # a session's setting, kept
        self._session.query("SET max_partitions_per_insert_block = 0")  # as Cluster's inserts
        self._lock = threading.Lock()
        self.shards = [Shard(1, [Replica("chdb", 0)])]

    def _columns(self, sql: str) -> Columns:
        with self._lock:
            table = self._session.query(sql, "ArrowTable")
        return [column.to_pylist() for column in table.columns]

    def each_shard(self, sql: str, *, timeout: float | None = None, partial: bool = False
                   ) -> tuple[list[Columns], list[str]]:
        return [self._columns(sql)], []

    def each_replica(self, sql: str) -> tuple[list[Columns], list[str]]:
        return [self._columns(sql)], []

    def stream(self, sql: str, rows: int) -> Iterator[Columns]:
        columns = self._columns(sql)
        for at in range(0, len(columns[0]) if columns else 0, rows):
            yield [c[at:at + rows] for c in columns]

    def query(self, sql: str) -> Columns:
        return self._columns(sql)

    def insert(self, table: str, columns: dict[str, list]) -> None:
        from abstream.clickhouse.sql import literal

        n = len(next(iter(columns.values()))) if columns else 0
        if not n:
            return
        rows = []
        for i in range(n):
            values = []
            for values_of in columns.values():
                v = values_of[i]
                values.append("NULL" if v is None else literal(v.item() if hasattr(v, "item") else v))
            rows.append("(" + ", ".join(values) + ")")
        with self._lock:
            self._session.query(f"INSERT INTO {self.database}.{table}_local ({', '.join(columns)}) VALUES "
                                + ", ".join(rows))

    def insert_everywhere(self, table: str, columns: dict[str, list]) -> None:
        self.insert(table, columns)

    def execute(self, sql: str) -> None:
        with self._lock:
            self._session.query(sql)

    def local(self, table: str) -> str:
        return f"{self.database}.{table}_local"

    def table(self, table: str) -> str:
        return f"{self.database}.{table}"

    def close(self) -> None:
        with self._lock:
            self._session.close()


def _columns(client, sql: str, settings: dict) -> Columns:
    """A result column by column; with no rows, as many empty columns as the result has."""
    data, types = client.execute(sql, settings=settings, columnar=True, with_column_types=True)
    return [list(column) for column in data] if data else [[] for _ in types]


def _connected_to(client) -> Replica | None:
    connection = client.connection
    return Replica(connection.host, connection.port) if connection.connected else None


def _reached(client) -> Replica:
    """The replica that answered `client`'s last statement, after the driver disconnected on its
    error: the driver rotates its hosts past those it could not reach, so it is the first."""
    host, port = client.connection.hosts[0]
    return Replica(host, port)


def _replica(address: str) -> Replica:
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit():
        raise AbstreamError(f"--clickhouse takes host:port (the native protocol's port, 9000 by default), "
                            f"not {address!r}")
    return Replica(host.strip("[]"), int(port))
