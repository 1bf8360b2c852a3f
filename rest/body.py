"""Request bodies as the file readers take them: a blocking binary stream read in a worker
thread, fed from the event loop a piece at a time, gunzipped on the way, and cut off at a limit.

A file of millions of rows is never held whole: the reader asks the loop for the next piece
only when it has parsed the last, so the client is slowed to the pace of ingest (TCP's own
backpressure). A gzip member is inflated at most `_INFLATE` bytes at a time, and the inflated
total counts against the same limit as the wire's, so a small bomb costs what its limit allows.
Members follow one another (as `gzip >>`, pigz and log shippers write them), and a body that
ends inside one is refused: it was cut short.
"""

from __future__ import annotations

import asyncio
import io
import zlib
from typing import Awaitable, Callable

from abstream.clients.files import GZIP_MAGIC
from abstream.rest.errors import BodyTooLarge, HttpError

_INFLATE = 1 << 20
#: Compressed bytes handed to the inflater at a time: a member's end leaves the rest of them over,
#: copied, so that a body of many tiny members cost time in the square of a piece's size (1.66 s
#: for 1 MiB of empty members in one piece).
_FEED = 8 << 10


class _Pieces(io.RawIOBase):
    def __init__(self, read: Callable[[], Awaitable[bytes]], loop: asyncio.AbstractEventLoop, limit: int, what: str,
                 gzip: bool | None) -> None:
        self._read, self._loop, self._limit, self._what = read, loop, limit, what
        self._gzip = gzip  # None: decided by the first bytes
        self._head = b""  # the body's first bytes while too few to decide
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self._inflating = False  # the member being inflated has begun
        self._pending = memoryview(b"")  # compressed input not inflated yet
        self._out = b""
        self._eof = False
        self.wire_bytes = 0
        self.body_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            if not self._fill():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _fill(self) -> bool:
        """More output, or False at the end."""
        if self._gzip and self._pending:
            feed = self._pending[:_FEED]  # a view: what a member leaves over is copied, at most this
            if not self._inflating and feed[0] == 0 and not bytes(feed).strip(b"\0"):
                self._pending = self._pending[len(feed):]  # zeros padding the end, as gzip allows
                return True
            try:
                self._emit(self._inflate.decompress(feed, _INFLATE))
            except zlib.error as error:
                raise HttpError(400, f"{self._what} is not valid gzip ({error})") from None
            if self._inflate.eof:  # a member ended: what follows it is the next one (`gzip >>` appends)
                self._pending = self._pending[len(feed) - len(self._inflate.unused_data):]
                self._inflate, self._inflating = zlib.decompressobj(zlib.MAX_WBITS | 16), False
            else:
                self._pending = self._pending[len(feed) - len(self._inflate.unconsumed_tail):]
                self._inflating = True
            return True
        if self._eof:
            return False
        piece = asyncio.run_coroutine_threadsafe(self._read(), self._loop).result()
        self.wire_bytes += len(piece)
        if self.wire_bytes > self._limit:
            raise BodyTooLarge(self._what, self._limit)
        if self._gzip is None:  # decided by the body's first two bytes, whatever pieces they come in
            head = self._head + piece
            if piece and len(head) < len(GZIP_MAGIC) and GZIP_MAGIC.startswith(head):
                self._head = head
                return True
            self._gzip, self._head = head.startswith(GZIP_MAGIC), b""
            if not piece:  # the body ended within its first bytes
                self._eof = True
                self._emit(head)
                return bool(self._out)
            piece = head
        if not piece:
            self._eof = True
            if self._gzip:
                self._emit(self._inflate.flush())
                if self._inflating and not self._inflate.eof:
                    raise HttpError(400, f"{self._what} is not valid gzip (it ends inside a gzip member: cut short?)")
            return bool(self._out)
        if self._gzip:
            self._pending = memoryview(piece)
        else:
            self._emit(piece)
        return True

    def _emit(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes > self._limit:
            raise BodyTooLarge(f"{self._what} (inflated)", self._limit)
        self._out += data


def stream(read: Callable[[], Awaitable[bytes]], loop: asyncio.AbstractEventLoop, limit: int, what: str,
           gzip: bool | None = None) -> io.BufferedReader:
    """A blocking stream over `read()` (the next piece of the body, b"" at its end), for a worker
    thread; gunzipped when `gzip`, or when it starts like gzip if `gzip` is None."""
    return io.BufferedReader(_Pieces(read, loop, limit, what, gzip), buffer_size=1 << 16)
