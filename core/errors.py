"""The one error vocabulary: every error abstream raises on purpose, each carrying its kind.

A transport maps a kind to its own status through one table (service/errors.py for gRPC, the
HTTP layer's for HTTP): the gRPC code and the HTTP status are two columns of `Kind`, not two sets
of `except` blocks. Engines raise these too, so that a caller sees the same error whichever
engine answers. Anything else that escapes is a bug: it is logged with its trace and reaches
the caller as INTERNAL, without detail.
"""

from __future__ import annotations

import contextvars
import enum
import threading
import time


class Kind(enum.Enum):
    """(gRPC status code name, HTTP status) of each kind of error."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 400)
    NOT_FOUND = ("NOT_FOUND", 404)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 403)  # the tutorial's platform answers 403 to a missing token too
    PERMISSION_DENIED = ("PERMISSION_DENIED", 403)
    RESOURCE_EXHAUSTED = ("RESOURCE_EXHAUSTED", 429)
    FAILED_PRECONDITION = ("FAILED_PRECONDITION", 409)
    UNAVAILABLE = ("UNAVAILABLE", 503)
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", 504)
    INTERNAL = ("INTERNAL", 500)

    @property
    def grpc_code(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


class AbstreamError(Exception):
    """Base class of every error raised on purpose; `kind` says how transports report it."""

    kind = Kind.FAILED_PRECONDITION


class InvalidArgument(AbstreamError):
    """A parameter or field is missing or wrong; `field` names it as the caller spelled it."""

    kind = Kind.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(AbstreamError):
    """What was asked for does not exist (a route, a pipe, a datasource)."""

    kind = Kind.NOT_FOUND


class Unauthenticated(AbstreamError):
    """No token, or one nobody issued."""

    kind = Kind.UNAUTHENTICATED


class PermissionDenied(AbstreamError):
    """The caller's token does not cover what it asked for."""

    kind = Kind.PERMISSION_DENIED


class ResourceExhausted(AbstreamError):
    """Too much at once (a rate limit, memory, streams): retry after `retry_after` seconds."""

    kind = Kind.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(ResourceExhausted):
    """The caller's token is over its rate: the HTTP answer says so in the platform's headers."""

    def __init__(self, message: str, retry_after: float, rate: float) -> None:
        super().__init__(message, retry_after)
        self.rate = rate


class FailedPrecondition(AbstreamError):
    """The call conflicts with the state it finds (a plan that exists already, say)."""

    kind = Kind.FAILED_PRECONDITION


class Unavailable(AbstreamError):
    """This call cannot be taken now (starting, draining, a backend down); retrying later may
    work, after `retry_after` seconds when it is known."""

    kind = Kind.UNAVAILABLE

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Stopped(Unavailable):
    """The engine stores nothing more until the server is restarted (its log failed): work that
    waits and retries on this server (an import) gives up; a producer sends elsewhere."""


class DeadlineExceeded(AbstreamError):
    """The caller's deadline passed; the work stopped where it noticed."""

    kind = Kind.DEADLINE_EXCEEDED


#: Set once the caller of the work running in this context went away (it cancelled its call, or
#: its HTTP connection closed): nobody waits for the answer any more.
ABANDONED: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("abandoned", default=None)


def in_time(deadline: float | None) -> None:
    """Stops work whose caller has stopped waiting (`deadline`: time.monotonic(), or the caller
    went away), checked between its stages."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the query's deadline passed (the caller's, or the server's --max-query-seconds); "
                               "it was stopped")
    if (gone := ABANDONED.get()) is not None and gone.is_set():
        raise DeadlineExceeded("the caller went away; the query was stopped")


class RecoveryError(AbstreamError):
    """A data directory cannot be recovered without losing acknowledged events."""


def kind_of(error: BaseException) -> Kind:
    return error.kind if isinstance(error, AbstreamError) else Kind.INTERNAL
