import datetime

from abstream.v1 import analytics_pb2 as _analytics_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImportState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORT_STATE_UNSPECIFIED: _ClassVar[ImportState]
    IMPORT_STATE_STARTED: _ClassVar[ImportState]
    IMPORT_STATE_IMPORTED: _ClassVar[ImportState]
    IMPORT_STATE_SKIPPED: _ClassVar[ImportState]
    IMPORT_STATE_FAILED: _ClassVar[ImportState]
IMPORT_STATE_UNSPECIFIED: ImportState
IMPORT_STATE_STARTED: ImportState
IMPORT_STATE_IMPORTED: ImportState
IMPORT_STATE_SKIPPED: ImportState
IMPORT_STATE_FAILED: ImportState

class DeleteTestRequest(_message.Message):
    __slots__ = ("test_id",)
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    def __init__(self, test_id: _Optional[str] = ...) -> None: ...

class DeleteTestResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: int
    def __init__(self, events: _Optional[int] = ...) -> None: ...

class EraseUserRequest(_message.Message):
    __slots__ = ("user_id", "test_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TEST_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    test_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., test_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class EraseUserResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: int
    def __init__(self, events: _Optional[int] = ...) -> None: ...

class SetRetentionRequest(_message.Message):
    __slots__ = ("test_id", "days")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    days: float
    def __init__(self, test_id: _Optional[str] = ..., days: _Optional[float] = ...) -> None: ...

class SetRetentionResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: _analytics_pb2.Experiment
    def __init__(self, experiment: _Optional[_Union[_analytics_pb2.Experiment, _Mapping]] = ...) -> None: ...

class ExportEventsRequest(_message.Message):
    __slots__ = ("test_id", "start_time", "end_time")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, test_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExportEventsResponse(_message.Message):
    __slots__ = ("arrow_ipc", "events")
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    arrow_ipc: bytes
    events: int
    def __init__(self, arrow_ipc: _Optional[bytes] = ..., events: _Optional[int] = ...) -> None: ...

class ImportEventsRequest(_message.Message):
    __slots__ = ("uri", "format", "endpoint_url", "region")
    URI_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    uri: str
    format: str
    endpoint_url: str
    region: str
    def __init__(self, uri: _Optional[str] = ..., format: _Optional[str] = ..., endpoint_url: _Optional[str] = ..., region: _Optional[str] = ...) -> None: ...

class ImportEventsResponse(_message.Message):
    __slots__ = ("uri", "state", "size", "accepted", "quarantined", "already_stored", "error", "objects_total", "objects_done", "total_accepted", "total_quarantined")
    URI_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    uri: str
    state: ImportState
    size: int
    accepted: int
    quarantined: int
    already_stored: int
    error: str
    objects_total: int
    objects_done: int
    total_accepted: int
    total_quarantined: int
    def __init__(self, uri: _Optional[str] = ..., state: _Optional[_Union[ImportState, str]] = ..., size: _Optional[int] = ..., accepted: _Optional[int] = ..., quarantined: _Optional[int] = ..., already_stored: _Optional[int] = ..., error: _Optional[str] = ..., objects_total: _Optional[int] = ..., objects_done: _Optional[int] = ..., total_accepted: _Optional[int] = ..., total_quarantined: _Optional[int] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateSnapshotResponse(_message.Message):
    __slots__ = ("path", "events", "elapsed")
    PATH_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    path: str
    events: int
    elapsed: _duration_pb2.Duration
    def __init__(self, path: _Optional[str] = ..., events: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateExperimentRequest(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: _analytics_pb2.Experiment
    def __init__(self, experiment: _Optional[_Union[_analytics_pb2.Experiment, _Mapping]] = ...) -> None: ...

class CreateExperimentResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: _analytics_pb2.Experiment
    def __init__(self, experiment: _Optional[_Union[_analytics_pb2.Experiment, _Mapping]] = ...) -> None: ...

class UpdateExperimentRequest(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: _analytics_pb2.Experiment
    def __init__(self, experiment: _Optional[_Union[_analytics_pb2.Experiment, _Mapping]] = ...) -> None: ...

class UpdateExperimentResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: _analytics_pb2.Experiment
    def __init__(self, experiment: _Optional[_Union[_analytics_pb2.Experiment, _Mapping]] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments",)
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[_analytics_pb2.Experiment]
    def __init__(self, experiments: _Optional[_Iterable[_Union[_analytics_pb2.Experiment, _Mapping]]] = ...) -> None: ...

class StopExperimentRequest(_message.Message):
    __slots__ = ("test_id", "stop_time")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    stop_time: _timestamp_pb2.Timestamp
    def __init__(self, test_id: _Optional[str] = ..., stop_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StopExperimentResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: _analytics_pb2.Experiment
    def __init__(self, experiment: _Optional[_Union[_analytics_pb2.Experiment, _Mapping]] = ...) -> None: ...
