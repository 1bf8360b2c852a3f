"""What the embedded engine stores of each event (core/events.py says what an event is).

Stored parts replace each string that queries group or count by with a code into a per-field
dictionary, which is what makes distinct counting and grouping cheap.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from abstream.core.events import MAX_DISTINCT

#: Stored columns: string fields that queries group or count by become codes into a dictionary,
#: sized to fit; low-cardinality fields get 16-bit codes (at most 65,535 distinct values each).
#: session_id, read only by the session metrics and nearly unique per few events, stays a string:
#: a dictionary would cost more memory and ingest time than it saves.
CODE_TYPES = {
    "user_id": pa.int32(),
    "variant": pa.uint16(),
    "event_type": pa.uint16(),
    "device": pa.uint16(),
    "country": pa.uint16(),
}
STORED_SCHEMA = pa.schema(
    [
        pa.field("timestamp", pa.int64()),
        pa.field("variant", CODE_TYPES["variant"]),
        pa.field("user_id", CODE_TYPES["user_id"]),
        pa.field("conversion", pa.uint8()),
        pa.field("revenue", pa.float64()),
        pa.field("event_type", CODE_TYPES["event_type"]),
        pa.field("device", CODE_TYPES["device"]),
        pa.field("country", CODE_TYPES["country"]),
        pa.field("session_id", pa.string()),
    ]
)

#: Each code type holds exactly the distinct values an event field may have.
assert all(int(np.iinfo(t.to_pandas_dtype()).max) == MAX_DISTINCT[name] for name, t in CODE_TYPES.items())
