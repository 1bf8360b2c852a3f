"""Thread pools whose threads the operating system knows by name.

Python's thread names are its own: top -H, perf, /proc and gdb show every thread of the server
as "python". The server's pools name theirs natively too, so that which of them uses the CPU
(storing, sealing, the log's writes and fsyncs, queries) can be read from outside the process
while it serves; the benchmark reads them to break row ingest's CPU down by thread.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

#: Longest name the kernel keeps for a thread, in bytes.
MAX_NAME = 15
_PR_SET_NAME = 15


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the names stay Python's own
        return None


_PRCTL = _prctl()


def name_native(name: str) -> None:
    """Names the calling thread for the operating system (its first MAX_NAME bytes)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:MAX_NAME]), 0, 0, 0)


def pool(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """A pool whose threads are named `name`, in Python (with their number) and natively."""
    if len(name.encode()) > MAX_NAME:
        raise ValueError(f"thread name {name!r} is longer than the kernel keeps ({MAX_NAME} bytes)")
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=name_native, initargs=(name,))
