"""An erasure that runs out of memory (its address space limited to what the process holds and
`argv[2]` MiB more), in a process of its own: prints, as JSON, whether it failed and each test's
(events, users) before, after, and in the store recovered from its directory (`argv[1]`)."""

import json
import resource, sys, time
from pathlib import Path
import numpy as np, pyarrow as pa
from abstream.store.engine import EventStore
from abstream.store.durability import Durability

def vm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

now = time.time_ns()
def batch(n, test, users, t0):
    return pa.table({"timestamp": pa.array(t0 + np.arange(n, dtype=np.int64) * 10**9, pa.int64()),
                     "user_id": pa.array([users[i % len(users)] for i in range(n)]),
                     "test_id": pa.array([test] * n), "variant": pa.array(["a", "b"] * (n // 2)),
                     "event_type": pa.array(["view"] * n), "conversion": pa.array(np.zeros(n, np.int64)),
                     "revenue": pa.array(np.zeros(n)), "session_id": pa.array([f"s{i}" for i in range(n)]),
                     "device": pa.array(["d"] * n), "country": pa.array(["c"] * n)})
d = Path(sys.argv[1]); margin = int(sys.argv[2]) << 20
s = EventStore(seal_rows=100_000, durability=Durability(d, snapshot_every_events=0, snapshot_every_seconds=0))
users = [f"u{i}" for i in range(1000)]
for i in range(10):
    s.append(batch(100_000, "A", users, now - 10**13 + i * 10**11))  # some in the future: rejected
s.wait_sealed()
s.append(batch(20, "B", ["b"], now - 10**12))
before = [(t.test_id, t.events, t.users) for t in s.list_tests()]
resource.setrlimit(resource.RLIMIT_AS, (vm() + margin, resource.RLIM_INFINITY))
try:
    s.erase_user("u1")
    failed = False
except MemoryError:
    failed = True
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
s.append(batch(2, "C", ["c"], now - 10**12))  # published with a new view
after = [(t.test_id, t.events, t.users) for t in s.list_tests()]
s.close()
s = EventStore(seal_rows=100_000, durability=Durability(d, snapshot_every_events=0, snapshot_every_seconds=0))
print(json.dumps({"failed": failed, "before": before, "after": after,
                  "recovered": [(t.test_id, t.events, t.users) for t in s.list_tests()]}))
