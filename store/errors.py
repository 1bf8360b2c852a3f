"""Errors the store raises; the service maps them to status codes in one place."""


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class InvalidArgument(StoreError):
    """A query parameter is missing or wrong; `field` names it as the caller spelled it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Unavailable(StoreError):
    """The store cannot take this call now (starting, or shutting down); retrying later may work."""


class DeadlineExceeded(StoreError):
    """The caller's deadline passed; the query stopped where it noticed."""
