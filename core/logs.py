"""Structured logs: one JSON object per line, with the id of the call being served.

Nothing identifying goes in: tokens never (callers appear by their token's name), user ids
never (events are logged by count, rejections by field and reason).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def new_request_id(incoming: str = "") -> str:
    """The caller's x-request-id when it sent a sane one, else a fresh id."""
    if incoming and len(incoming) <= 64 and incoming.replace("-", "").replace("_", "").isalnum():
        return incoming
    return uuid.uuid4().hex[:16]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if request_id := REQUEST_ID.get():
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _WithoutQueries(logging.Filter):
    """aiohttp logs a request it could not parse (a raw space, a byte that is no character) with
    the line it stopped at, a request line's query or an Authorization header: a token may be in
    it. That error is logged without a traceback, each query and credential in it cut; any other
    error aiohttp logs keeps its traceback."""

    SECRETS = re.compile(r"\?\S*|(?i:(bearer|basic)\s+)\S+|(?i:authorization:\s*)[^\r\n]*")

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            error = record.exc_info[1]
            record.msg = self.SECRETS.sub("…", f"{record.getMessage()}: {type(error).__name__}: {error}")
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _WithoutQueries) for f in server.filters):
        server.addFilter(_WithoutQueries())
    root.setLevel(level.upper())
