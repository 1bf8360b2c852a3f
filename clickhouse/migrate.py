"""`abstream migrate`: an embedded data directory copied into a ClickHouse cluster, test by test.

Each test's events are read as stored, 100,000 at a time (store/execute.py `export`), and sent
through the cluster engine's own ingest as batches of the producer `migrate:<test>`, each
numbered by the count of the test's events up to its last: a re-run, with any batch size, sends
what follows the last recorded event (a batch's index for its number skipped or stored again
events when a re-run was given another size). A batch in flight when a run stopped is sent
again; the replicas recognise its blocks when the batch size is the same. The copy is verified by counting each test's events on both
sides. Stop the server that owns the data directory first: this opens it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from abstream.clickhouse.engine import ClickHouseEngine
from abstream.core.types import ValidatedBatch
from abstream.store import Durability, EventStore

ROWS = 100_000


def migrate(data_dir: str | Path, engine: ClickHouseEngine, out=sys.stdout, rows: int = ROWS) -> int:
    """Copies every test; returns 0 when every test's count matches, 1 otherwise."""
    store = EventStore(durability=Durability(Path(data_dir)))
    try:
        tests = store.list_tests()
        for info in tests:
            started, sent, through = time.monotonic(), 0, 0
            producer = f"migrate:{info.test_id}"
            recorded = engine.last_sequence(producer)
            for table in store.export(info.test_id, rows=rows):
                first, through = through, through + table.num_rows
                if through <= recorded:
                    continue
                if first < recorded:  # a batch of another size across what is recorded: its rest
                    table = table.slice(recorded - first)
                batch = ValidatedBatch(table, [], time.time_ns(), producer, through)
                result = engine.apply(engine.prepare(batch))
                sent += result.accepted
            print(f"{info.test_id}: {info.events:,} events ({sent:,} sent now) in {time.monotonic() - started:.1f}s",
                  file=out, flush=True)
        there = {t.test_id: t.events for t in engine.list_tests()}
        wrong = [(t.test_id, t.events, there.get(t.test_id, 0)) for t in tests if there.get(t.test_id, 0) != t.events]
        for test_id, here, count in wrong:
            print(f"MISMATCH {test_id}: {here:,} events in {data_dir}, {count:,} in the cluster", file=out)
        print(f"{len(tests) - len(wrong)} of {len(tests)} tests verified: the same number of events on both sides",
              file=out)
        return 1 if wrong else 0
    finally:
        store.close(final_snapshot=False)
