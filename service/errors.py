"""The one place where errors become gRPC statuses: a kind's code (core/errors.py), its details.

Invalid arguments carry a google.rpc.BadRequest naming the field; anything that can be retried
carries a google.rpc.RetryInfo saying when. An error nobody raised on purpose is INTERNAL, with
no detail: its trace goes to the server's log.
"""

from __future__ import annotations

import grpc
from abstream.core.errors import InvalidArgument, Kind, kind_of
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


def _retry_info(seconds: float) -> any_pb2.Any:
    detail = any_pb2.Any()
    whole, fraction = divmod(max(seconds, 0.001), 1)
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(whole),
                                                                             nanos=int(fraction * 1e9))))
    return detail


def _bad_request(error: InvalidArgument) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.reason)]))
    return detail


def to_status(error: BaseException) -> grpc.Status:
    """The status a caller sees for `error`: specific for ours, opaque for anything unexpected."""
    kind = kind_of(error)
    details = []
    if isinstance(error, InvalidArgument):
        details.append(_bad_request(error))
    if getattr(error, "retry_after", None) is not None:
        details.append(_retry_info(error.retry_after))
    message = "internal error; see the server log" if kind is Kind.INTERNAL else str(error)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.Code.Value(kind.grpc_code), message=message,
                                                  details=details))
