import datetime

from abstream.v1 import analytics_pb2 as _analytics_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
