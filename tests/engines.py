"""Every engine, made fresh for a test: the embedded one, and the cluster engine on chDB and on a
real ClickHouse cluster (the session's, tests/conftest.py), each in a database of its own."""

from __future__ import annotations

import uuid

from abstream.clickhouse.backend import Cluster, Local
from abstream.clickhouse.engine import ClickHouseEngine
from abstream.store import EventStore

#: The embedded engine's layouts: events spread over merged parts and a tail, all in the tail,
#: and over parts with every test's whole-test Summary from its rollup (store/rollup.py).
SEALS = {"many-parts": (64, None), "tail-only": (1_000_000, None), "rolled-up": (64, 0)}


def make(kind: str, request):
    if kind in SEALS:
        seal_rows, rollup_events = SEALS[kind]
        return EventStore(seal_rows=seal_rows, rollup_events=rollup_events)
    database = f"t_{uuid.uuid4().hex[:12]}"
    if kind == "chdb":
        engine = ClickHouseEngine(Local(database))
    else:
        cluster = request.getfixturevalue("clickhouse_cluster")
        engine = ClickHouseEngine(Cluster(cluster.hosts().split(","), cluster.cluster_name, database))
    engine.init_schema()
    return engine
