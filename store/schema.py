"""The event schema as users send it, and the limits every event is checked against.

Incoming batches are Arrow tables with `EVENT_SCHEMA` (plain strings, timestamps in nanoseconds
since the Unix epoch, UTC). Stored parts replace each string by a code into a per-field
dictionary, which is what makes distinct counting and grouping cheap.
"""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa

EVENT_SCHEMA = pa.schema(
    [
        pa.field("timestamp", pa.int64()),  # ns since epoch, UTC; null when absent
        pa.field("user_id", pa.string()),
        pa.field("test_id", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("event_type", pa.string()),
        pa.field("conversion", pa.int64()),
        pa.field("revenue", pa.float64()),
        pa.field("session_id", pa.string()),
        pa.field("device", pa.string()),
        pa.field("country", pa.string()),
    ]
)

#: Fields an event cannot do without; an empty string counts as missing.
REQUIRED_STRINGS = ("test_id", "variant", "user_id")
#: Fields that may be empty.
OPTIONAL_STRINGS = ("event_type", "session_id", "device", "country")
#: Longest accepted value of any string field, in UTF-8 bytes.
MAX_STRING_BYTES = 256
#: The most one valid event can take in any Arrow layout a sender may use: three 8-byte numbers,
#: seven strings with 8-byte offsets, validity bits. Bounds what a columnar batch may decompress to.
MAX_EVENT_BYTES = 3 * 8 + 7 * (8 + MAX_STRING_BYTES) + 2

NS_PER_SECOND = 1_000_000_000
#: Earliest accepted event time: 2000-01-01T00:00:00Z.
MIN_TIMESTAMP_NS = 946_684_800 * NS_PER_SECOND
#: How far past the server's clock an event may be (clock skew of producers).
MAX_FUTURE_SKEW_NS = 24 * 3600 * NS_PER_SECOND

#: Stored columns: string fields that queries group or count by become codes into a dictionary,
#: sized to fit; low-cardinality fields get 16-bit codes (at most 65,535 distinct values each).
#: session_id, which no query reads and which is nearly unique per few events, stays a string:
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


class Rejection(NamedTuple):
    """Why one event of a batch was not stored (a tuple: a batch may reject 100,000 events)."""

    index: int
    field: str
    message: str
