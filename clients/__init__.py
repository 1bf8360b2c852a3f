"""What other programs use: the Python client and producer, and the `abstream` command.

The names load on first use, so that `abstream` starts its work (hashing a file to ingest)
before grpc, pyarrow and numpy are imported.
"""

import importlib

_FROM = {"Client": "client", "arrow_ipc": "client", "BufferFull": "producer", "Delivery": "producer",
         "NoAck": "producer", "Producer": "producer", "ProducerClosed": "producer"}

__all__ = ["BufferFull", "Client", "Delivery", "NoAck", "Producer", "ProducerClosed", "arrow_ipc"]


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module 'abstream.clients' has no attribute {name!r}")
    return getattr(importlib.import_module(f"abstream.clients.{_FROM[name]}"), name)
