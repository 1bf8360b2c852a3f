"""HTTP's column of the error table: every error as JSON `{"error", "documentation"}` with the
status `Kind` gives it, as the tutorial's platform answers (its CLI reads `error`, and treats a
text body as a success, so no error is ever sent as text).

What only HTTP has (a body over the limit, no length, an unknown route) is a kind of its own here;
everything else comes from the core's errors unchanged.
"""

from __future__ import annotations

import json
import math

from abstream.core.errors import AbstreamError, Kind, RateLimited, ResourceExhausted, Unavailable, kind_of
from aiohttp import web

DOCUMENTATION = "docs/http.md#errors"


class HttpError(AbstreamError):
    """An error of HTTP itself, with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLarge(HttpError):
    def __init__(self, what: str, limit: int) -> None:
        super().__init__(413, f"{what} is larger than {limit:,} bytes (--http-max-body-bytes, "
                              "--http-max-upload-bytes): send it in smaller parts")


def status_of(error: BaseException) -> int:
    if isinstance(error, HttpError):
        return error.status
    if isinstance(error, web.HTTPException):
        return error.status
    return kind_of(error).http_status


def error_response(error: BaseException) -> web.Response:
    """The JSON answer to `error`; a rate limit or a retriable refusal says when to retry
    (`Retry-After`, and for a token over its rate the `X-RateLimit-*` headers the platform's
    clients read, in whole seconds)."""
    status = status_of(error)
    if isinstance(error, web.HTTPNotFound):
        message = "API method not found, check docs/http.md for the methods there are"
    elif isinstance(error, web.HTTPRequestEntityTooLarge):  # a form past what aiohttp reads into memory
        message = f"{error.text.rstrip('.')} (--http-max-body-bytes)"
    elif isinstance(error, web.HTTPMethodNotAllowed):
        message = f"{error.method} is not allowed here: use {', '.join(sorted(error.allowed_methods))}"
    elif isinstance(error, web.HTTPException):
        message = error.reason
    elif status == 500 and not isinstance(error, AbstreamError):
        message = "internal error (it is logged with this request's id)"
    else:
        message = str(error)
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if isinstance(error, (ResourceExhausted, Unavailable)) and retry_after:
        seconds = str(max(1, math.ceil(retry_after)))
        headers["Retry-After"] = seconds
        if isinstance(error, RateLimited):  # not memory or open streams: the token has no limit there
            headers.update({"X-RateLimit-Limit": str(int(error.rate)), "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": seconds})
    if isinstance(error, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(error.allowed_methods))
    return web.Response(status=status, headers=headers, content_type="application/json",
                        text=json.dumps({"error": message, "documentation": DOCUMENTATION}))


__all__ = ["BodyTooLarge", "HttpError", "Kind", "error_response", "status_of"]
