"""Every engine, made fresh for a test: the embedded one, and the cluster engine on chDB and on a
real ClickHouse cluster (the session's, tests/conftest.py), each in a database of its own."""

from __future__ import annotations

import uuid

from abstream.clickhouse.backend import Cluster, Local
from abstream.clickhouse.engine import ClickHouseEngine
from abstream.store import EventStore

SEALS = {"many-parts": 64, "tail-only": 1_000_000}


def make(kind: str, request):
    if kind in SEALS:
        return EventStore(seal_rows=SEALS[kind])
    database = f"t_{uuid.uuid4().hex[:12]}"
    if kind == "chdb":
        engine = ClickHouseEngine(Local(database))
    else:
        cluster = request.getfixturevalue("clickhouse_cluster")
        engine = ClickHouseEngine(Cluster(cluster.hosts().split(","), cluster.cluster_name, database))
    engine.init_schema()
    return engine
