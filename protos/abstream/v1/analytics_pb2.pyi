import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dimension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIMENSION_UNSPECIFIED: _ClassVar[Dimension]
    DIMENSION_DEVICE: _ClassVar[Dimension]
    DIMENSION_COUNTRY: _ClassVar[Dimension]
    DIMENSION_EVENT_TYPE: _ClassVar[Dimension]

class Interval(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERVAL_UNSPECIFIED: _ClassVar[Interval]
    INTERVAL_MINUTE: _ClassVar[Interval]
    INTERVAL_HOUR: _ClassVar[Interval]
    INTERVAL_DAY: _ClassVar[Interval]
    INTERVAL_WEEK: _ClassVar[Interval]

class Correction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CORRECTION_UNSPECIFIED: _ClassVar[Correction]
    CORRECTION_NONE: _ClassVar[Correction]
    CORRECTION_HOLM: _ClassVar[Correction]
    CORRECTION_BENJAMINI_HOCHBERG: _ClassVar[Correction]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_CONVERSION: _ClassVar[Metric]
    METRIC_REVENUE_PER_USER: _ClassVar[Metric]
    METRIC_CONVERSIONS_PER_USER: _ClassVar[Metric]
    METRIC_REVENUE_PER_CONVERSION: _ClassVar[Metric]
    METRIC_CONVERSIONS_PER_SESSION: _ClassVar[Metric]
    METRIC_EVENTS_PER_SESSION: _ClassVar[Metric]

class ComparisonStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARISON_STATUS_UNSPECIFIED: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_OK: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_NOT_ENOUGH_DATA: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_ZERO_VARIANCE: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_ZERO_CONTROL_MEAN: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_ZERO_TREATMENT: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_NOT_FINITE: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_NO_CONTROL: _ClassVar[ComparisonStatus]
    COMPARISON_STATUS_UNBOUNDED: _ClassVar[ComparisonStatus]

class RelativeInterval(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELATIVE_INTERVAL_UNSPECIFIED: _ClassVar[RelativeInterval]
    RELATIVE_INTERVAL_DELTA: _ClassVar[RelativeInterval]
    RELATIVE_INTERVAL_FIELLER: _ClassVar[RelativeInterval]

class HealthStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_STATUS_UNSPECIFIED: _ClassVar[HealthStatus]
    HEALTH_STATUS_HEALTHY: _ClassVar[HealthStatus]
    HEALTH_STATUS_WARNING: _ClassVar[HealthStatus]
    HEALTH_STATUS_UNHEALTHY: _ClassVar[HealthStatus]
DIMENSION_UNSPECIFIED: Dimension
DIMENSION_DEVICE: Dimension
DIMENSION_COUNTRY: Dimension
DIMENSION_EVENT_TYPE: Dimension
INTERVAL_UNSPECIFIED: Interval
INTERVAL_MINUTE: Interval
INTERVAL_HOUR: Interval
INTERVAL_DAY: Interval
INTERVAL_WEEK: Interval
CORRECTION_UNSPECIFIED: Correction
CORRECTION_NONE: Correction
CORRECTION_HOLM: Correction
CORRECTION_BENJAMINI_HOCHBERG: Correction
METRIC_UNSPECIFIED: Metric
METRIC_CONVERSION: Metric
METRIC_REVENUE_PER_USER: Metric
METRIC_CONVERSIONS_PER_USER: Metric
METRIC_REVENUE_PER_CONVERSION: Metric
METRIC_CONVERSIONS_PER_SESSION: Metric
METRIC_EVENTS_PER_SESSION: Metric
COMPARISON_STATUS_UNSPECIFIED: ComparisonStatus
COMPARISON_STATUS_OK: ComparisonStatus
COMPARISON_STATUS_NOT_ENOUGH_DATA: ComparisonStatus
COMPARISON_STATUS_ZERO_VARIANCE: ComparisonStatus
COMPARISON_STATUS_ZERO_CONTROL_MEAN: ComparisonStatus
COMPARISON_STATUS_ZERO_TREATMENT: ComparisonStatus
COMPARISON_STATUS_NOT_FINITE: ComparisonStatus
COMPARISON_STATUS_NO_CONTROL: ComparisonStatus
COMPARISON_STATUS_UNBOUNDED: ComparisonStatus
RELATIVE_INTERVAL_UNSPECIFIED: RelativeInterval
RELATIVE_INTERVAL_DELTA: RelativeInterval
RELATIVE_INTERVAL_FIELLER: RelativeInterval
HEALTH_STATUS_UNSPECIFIED: HealthStatus
HEALTH_STATUS_HEALTHY: HealthStatus
HEALTH_STATUS_WARNING: HealthStatus
HEALTH_STATUS_UNHEALTHY: HealthStatus

class Event(_message.Message):
    __slots__ = ("timestamp", "user_id", "test_id", "variant", "event_type", "conversion", "revenue", "session_id", "device", "country")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_FIELD_NUMBER: _ClassVar[int]
    REVENUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    timestamp: _timestamp_pb2.Timestamp
    user_id: str
    test_id: str
    variant: str
    event_type: str
    conversion: int
    revenue: float
    session_id: str
    device: str
    country: str
    def __init__(self, timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[str] = ..., test_id: _Optional[str] = ..., variant: _Optional[str] = ..., event_type: _Optional[str] = ..., conversion: _Optional[int] = ..., revenue: _Optional[float] = ..., session_id: _Optional[str] = ..., device: _Optional[str] = ..., country: _Optional[str] = ...) -> None: ...

class IngestEventsRequest(_message.Message):
    __slots__ = ("events", "arrow_ipc", "producer_id", "sequence")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    arrow_ipc: bytes
    producer_id: str
    sequence: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., arrow_ipc: _Optional[bytes] = ..., producer_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class IngestEventsResponse(_message.Message):
    __slots__ = ("batch", "accepted", "rejected", "rejections", "duplicate")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    batch: int
    accepted: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    duplicate: bool
    def __init__(self, batch: _Optional[int] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("index", "field", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    field: str
    message: str
    def __init__(self, index: _Optional[int] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Filters(_message.Message):
    __slots__ = ("device", "country", "event_type")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    device: str
    country: str
    event_type: str
    def __init__(self, device: _Optional[str] = ..., country: _Optional[str] = ..., event_type: _Optional[str] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("users", "conversions", "conversion_rate", "total_revenue", "revenue_per_user", "events", "converted_users", "user_conversion_rate")
    USERS_FIELD_NUMBER: _ClassVar[int]
    CONVERSIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_RATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_REVENUE_FIELD_NUMBER: _ClassVar[int]
    REVENUE_PER_USER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_USERS_FIELD_NUMBER: _ClassVar[int]
    USER_CONVERSION_RATE_FIELD_NUMBER: _ClassVar[int]
    users: int
    conversions: int
    conversion_rate: float
    total_revenue: float
    revenue_per_user: float
    events: int
    converted_users: int
    user_conversion_rate: float
    def __init__(self, users: _Optional[int] = ..., conversions: _Optional[int] = ..., conversion_rate: _Optional[float] = ..., total_revenue: _Optional[float] = ..., revenue_per_user: _Optional[float] = ..., events: _Optional[int] = ..., converted_users: _Optional[int] = ..., user_conversion_rate: _Optional[float] = ...) -> None: ...

class QueryStats(_message.Message):
    __slots__ = ("events_scanned", "elapsed")
    EVENTS_SCANNED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    events_scanned: int
    elapsed: _duration_pb2.Duration
    def __init__(self, events_scanned: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AnalysisOptions(_message.Message):
    __slots__ = ("control_variant", "confidence_level", "sequential", "sequential_tuning", "prior_mean", "prior_variance", "expected_weights", "srm_threshold", "correction", "exclude_multi_variant_users", "relative_interval", "guardrail_margins", "metric_event_type", "revenue_cap", "session_metrics")
    class ExpectedWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class GuardrailMarginsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CONTROL_VARIANT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_TUNING_FIELD_NUMBER: _ClassVar[int]
    PRIOR_MEAN_FIELD_NUMBER: _ClassVar[int]
    PRIOR_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SRM_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_MULTI_VARIANT_USERS_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_MARGINS_FIELD_NUMBER: _ClassVar[int]
    METRIC_EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    REVENUE_CAP_FIELD_NUMBER: _ClassVar[int]
    SESSION_METRICS_FIELD_NUMBER: _ClassVar[int]
    control_variant: str
    confidence_level: float
    sequential: bool
    sequential_tuning: float
    prior_mean: float
    prior_variance: float
    expected_weights: _containers.ScalarMap[str, float]
    srm_threshold: float
    correction: Correction
    exclude_multi_variant_users: bool
    relative_interval: RelativeInterval
    guardrail_margins: _containers.ScalarMap[str, float]
    metric_event_type: str
    revenue_cap: RevenueCap
    session_metrics: bool
    def __init__(self, control_variant: _Optional[str] = ..., confidence_level: _Optional[float] = ..., sequential: _Optional[bool] = ..., sequential_tuning: _Optional[float] = ..., prior_mean: _Optional[float] = ..., prior_variance: _Optional[float] = ..., expected_weights: _Optional[_Mapping[str, float]] = ..., srm_threshold: _Optional[float] = ..., correction: _Optional[_Union[Correction, str]] = ..., exclude_multi_variant_users: _Optional[bool] = ..., relative_interval: _Optional[_Union[RelativeInterval, str]] = ..., guardrail_margins: _Optional[_Mapping[str, float]] = ..., metric_event_type: _Optional[str] = ..., revenue_cap: _Optional[_Union[RevenueCap, _Mapping]] = ..., session_metrics: _Optional[bool] = ...) -> None: ...

class RevenueCap(_message.Message):
    __slots__ = ("percentile", "value", "nonzero_only")
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NONZERO_ONLY_FIELD_NUMBER: _ClassVar[int]
    percentile: float
    value: float
    nonzero_only: bool
    def __init__(self, percentile: _Optional[float] = ..., value: _Optional[float] = ..., nonzero_only: _Optional[bool] = ...) -> None: ...

class RevenueCapApplied(_message.Message):
    __slots__ = ("cap", "threshold", "pooled_users", "capped_users")
    CAP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POOLED_USERS_FIELD_NUMBER: _ClassVar[int]
    CAPPED_USERS_FIELD_NUMBER: _ClassVar[int]
    cap: RevenueCap
    threshold: float
    pooled_users: int
    capped_users: int
    def __init__(self, cap: _Optional[_Union[RevenueCap, _Mapping]] = ..., threshold: _Optional[float] = ..., pooled_users: _Optional[int] = ..., capped_users: _Optional[int] = ...) -> None: ...

class Guardrail(_message.Message):
    __slots__ = ("margin", "non_inferior", "p_value", "lower_bound", "status", "status_message")
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    NON_INFERIOR_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    margin: float
    non_inferior: bool
    p_value: float
    lower_bound: float
    status: ComparisonStatus
    status_message: str
    def __init__(self, margin: _Optional[float] = ..., non_inferior: _Optional[bool] = ..., p_value: _Optional[float] = ..., lower_bound: _Optional[float] = ..., status: _Optional[_Union[ComparisonStatus, str]] = ..., status_message: _Optional[str] = ...) -> None: ...

class Lift(_message.Message):
    __slots__ = ("estimate", "standard_error", "ci_low", "ci_high", "p_value", "adjusted_p_value", "status", "status_message")
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    STANDARD_ERROR_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    ADJUSTED_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    estimate: float
    standard_error: float
    ci_low: float
    ci_high: float
    p_value: float
    adjusted_p_value: float
    status: ComparisonStatus
    status_message: str
    def __init__(self, estimate: _Optional[float] = ..., standard_error: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., p_value: _Optional[float] = ..., adjusted_p_value: _Optional[float] = ..., status: _Optional[_Union[ComparisonStatus, str]] = ..., status_message: _Optional[str] = ...) -> None: ...

class MetricComparison(_message.Message):
    __slots__ = ("variant", "metric", "control_mean", "treatment_mean", "absolute", "relative", "degrees_of_freedom", "chance_to_win", "risk_control", "risk_treatment", "posterior_mean", "status", "status_message", "guardrail")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    CONTROL_MEAN_FIELD_NUMBER: _ClassVar[int]
    TREATMENT_MEAN_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_FIELD_NUMBER: _ClassVar[int]
    DEGREES_OF_FREEDOM_FIELD_NUMBER: _ClassVar[int]
    CHANCE_TO_WIN_FIELD_NUMBER: _ClassVar[int]
    RISK_CONTROL_FIELD_NUMBER: _ClassVar[int]
    RISK_TREATMENT_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_MEAN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    variant: str
    metric: Metric
    control_mean: float
    treatment_mean: float
    absolute: Lift
    relative: Lift
    degrees_of_freedom: float
    chance_to_win: float
    risk_control: float
    risk_treatment: float
    posterior_mean: float
    status: ComparisonStatus
    status_message: str
    guardrail: Guardrail
    def __init__(self, variant: _Optional[str] = ..., metric: _Optional[_Union[Metric, str]] = ..., control_mean: _Optional[float] = ..., treatment_mean: _Optional[float] = ..., absolute: _Optional[_Union[Lift, _Mapping]] = ..., relative: _Optional[_Union[Lift, _Mapping]] = ..., degrees_of_freedom: _Optional[float] = ..., chance_to_win: _Optional[float] = ..., risk_control: _Optional[float] = ..., risk_treatment: _Optional[float] = ..., posterior_mean: _Optional[float] = ..., status: _Optional[_Union[ComparisonStatus, str]] = ..., status_message: _Optional[str] = ..., guardrail: _Optional[_Union[Guardrail, _Mapping]] = ...) -> None: ...

class Analysis(_message.Message):
    __slots__ = ("control_variant", "srm_p_value", "sample_ratio_mismatch", "comparisons", "revenue_cap")
    CONTROL_VARIANT_FIELD_NUMBER: _ClassVar[int]
    SRM_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATIO_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    REVENUE_CAP_FIELD_NUMBER: _ClassVar[int]
    control_variant: str
    srm_p_value: float
    sample_ratio_mismatch: bool
    comparisons: _containers.RepeatedCompositeFieldContainer[MetricComparison]
    revenue_cap: RevenueCapApplied
    def __init__(self, control_variant: _Optional[str] = ..., srm_p_value: _Optional[float] = ..., sample_ratio_mismatch: _Optional[bool] = ..., comparisons: _Optional[_Iterable[_Union[MetricComparison, _Mapping]]] = ..., revenue_cap: _Optional[_Union[RevenueCapApplied, _Mapping]] = ...) -> None: ...

class Health(_message.Message):
    __slots__ = ("status", "reasons", "users", "multi_variant_users", "multi_variant_users_excluded", "srm_p_value", "srm", "events_before_start", "future_events")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    MULTI_VARIANT_USERS_FIELD_NUMBER: _ClassVar[int]
    MULTI_VARIANT_USERS_EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    SRM_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SRM_FIELD_NUMBER: _ClassVar[int]
    EVENTS_BEFORE_START_FIELD_NUMBER: _ClassVar[int]
    FUTURE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    status: HealthStatus
    reasons: _containers.RepeatedScalarFieldContainer[str]
    users: int
    multi_variant_users: int
    multi_variant_users_excluded: bool
    srm_p_value: float
    srm: HealthStatus
    events_before_start: int
    future_events: int
    def __init__(self, status: _Optional[_Union[HealthStatus, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., users: _Optional[int] = ..., multi_variant_users: _Optional[int] = ..., multi_variant_users_excluded: _Optional[bool] = ..., srm_p_value: _Optional[float] = ..., srm: _Optional[_Union[HealthStatus, str]] = ..., events_before_start: _Optional[int] = ..., future_events: _Optional[int] = ...) -> None: ...

class SummaryRequest(_message.Message):
    __slots__ = ("test_id", "start_time", "end_time", "analysis", "filters")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    analysis: AnalysisOptions
    filters: Filters
    def __init__(self, test_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., analysis: _Optional[_Union[AnalysisOptions, _Mapping]] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ...) -> None: ...

class SummaryRow(_message.Message):
    __slots__ = ("variant", "metrics")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    variant: str
    metrics: Metrics
    def __init__(self, variant: _Optional[str] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class SummaryResponse(_message.Message):
    __slots__ = ("test_id", "rows", "stats", "analysis", "health")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    rows: _containers.RepeatedCompositeFieldContainer[SummaryRow]
    stats: QueryStats
    analysis: Analysis
    health: Health
    def __init__(self, test_id: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[SummaryRow, _Mapping]]] = ..., stats: _Optional[_Union[QueryStats, _Mapping]] = ..., analysis: _Optional[_Union[Analysis, _Mapping]] = ..., health: _Optional[_Union[Health, _Mapping]] = ...) -> None: ...

class SegmentsRequest(_message.Message):
    __slots__ = ("test_id", "start_time", "end_time", "dimension", "filters", "analysis")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    dimension: Dimension
    filters: Filters
    analysis: AnalysisOptions
    def __init__(self, test_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dimension: _Optional[_Union[Dimension, str]] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., analysis: _Optional[_Union[AnalysisOptions, _Mapping]] = ...) -> None: ...

class SegmentRow(_message.Message):
    __slots__ = ("variant", "segment", "metrics")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    variant: str
    segment: str
    metrics: Metrics
    def __init__(self, variant: _Optional[str] = ..., segment: _Optional[str] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class SegmentsResponse(_message.Message):
    __slots__ = ("test_id", "dimension", "rows", "stats", "analyses")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    dimension: Dimension
    rows: _containers.RepeatedCompositeFieldContainer[SegmentRow]
    stats: QueryStats
    analyses: _containers.RepeatedCompositeFieldContainer[SegmentAnalysis]
    def __init__(self, test_id: _Optional[str] = ..., dimension: _Optional[_Union[Dimension, str]] = ..., rows: _Optional[_Iterable[_Union[SegmentRow, _Mapping]]] = ..., stats: _Optional[_Union[QueryStats, _Mapping]] = ..., analyses: _Optional[_Iterable[_Union[SegmentAnalysis, _Mapping]]] = ...) -> None: ...

class SegmentAnalysis(_message.Message):
    __slots__ = ("segment", "analysis")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    analysis: Analysis
    def __init__(self, segment: _Optional[str] = ..., analysis: _Optional[_Union[Analysis, _Mapping]] = ...) -> None: ...

class TimeseriesRequest(_message.Message):
    __slots__ = ("test_id", "start_time", "end_time", "interval", "cumulative", "filters", "time_zone", "lift", "analysis", "since_first_exposure")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    LIFT_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIRST_EXPOSURE_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    interval: Interval
    cumulative: bool
    filters: Filters
    time_zone: str
    lift: bool
    analysis: AnalysisOptions
    since_first_exposure: bool
    def __init__(self, test_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., interval: _Optional[_Union[Interval, str]] = ..., cumulative: _Optional[bool] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., time_zone: _Optional[str] = ..., lift: _Optional[bool] = ..., analysis: _Optional[_Union[AnalysisOptions, _Mapping]] = ..., since_first_exposure: _Optional[bool] = ...) -> None: ...

class BucketLift(_message.Message):
    __slots__ = ("bucket_start", "analysis", "exposure")
    BUCKET_START_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    EXPOSURE_FIELD_NUMBER: _ClassVar[int]
    bucket_start: _timestamp_pb2.Timestamp
    analysis: Analysis
    exposure: _duration_pb2.Duration
    def __init__(self, bucket_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., analysis: _Optional[_Union[Analysis, _Mapping]] = ..., exposure: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class TimeseriesRow(_message.Message):
    __slots__ = ("bucket_start", "variant", "metrics")
    BUCKET_START_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    bucket_start: _timestamp_pb2.Timestamp
    variant: str
    metrics: Metrics
    def __init__(self, bucket_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., variant: _Optional[str] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class TimeseriesResponse(_message.Message):
    __slots__ = ("test_id", "interval", "cumulative", "rows", "stats", "lifts")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LIFTS_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    interval: Interval
    cumulative: bool
    rows: _containers.RepeatedCompositeFieldContainer[TimeseriesRow]
    stats: QueryStats
    lifts: _containers.RepeatedCompositeFieldContainer[BucketLift]
    def __init__(self, test_id: _Optional[str] = ..., interval: _Optional[_Union[Interval, str]] = ..., cumulative: _Optional[bool] = ..., rows: _Optional[_Iterable[_Union[TimeseriesRow, _Mapping]]] = ..., stats: _Optional[_Union[QueryStats, _Mapping]] = ..., lifts: _Optional[_Iterable[_Union[BucketLift, _Mapping]]] = ...) -> None: ...

class ListTestsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TestInfo(_message.Message):
    __slots__ = ("test_id", "variants", "events", "users", "first_event_time", "last_event_time", "experiment")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    FIRST_EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    variants: _containers.RepeatedScalarFieldContainer[str]
    events: int
    users: int
    first_event_time: _timestamp_pb2.Timestamp
    last_event_time: _timestamp_pb2.Timestamp
    experiment: Experiment
    def __init__(self, test_id: _Optional[str] = ..., variants: _Optional[_Iterable[str]] = ..., events: _Optional[int] = ..., users: _Optional[int] = ..., first_event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("test_id", "control_variant", "split", "start_time", "stop_time", "hypothesis", "created_time", "updated_time", "retention_days")
    class SplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_VARIANT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESIS_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATED_TIME_FIELD_NUMBER: _ClassVar[int]
    RETENTION_DAYS_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    control_variant: str
    split: _containers.ScalarMap[str, float]
    start_time: _timestamp_pb2.Timestamp
    stop_time: _timestamp_pb2.Timestamp
    hypothesis: str
    created_time: _timestamp_pb2.Timestamp
    updated_time: _timestamp_pb2.Timestamp
    retention_days: float
    def __init__(self, test_id: _Optional[str] = ..., control_variant: _Optional[str] = ..., split: _Optional[_Mapping[str, float]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stop_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hypothesis: _Optional[str] = ..., created_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retention_days: _Optional[float] = ...) -> None: ...

class ListTestsResponse(_message.Message):
    __slots__ = ("tests", "stats")
    TESTS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    tests: _containers.RepeatedCompositeFieldContainer[TestInfo]
    stats: QueryStats
    def __init__(self, tests: _Optional[_Iterable[_Union[TestInfo, _Mapping]]] = ..., stats: _Optional[_Union[QueryStats, _Mapping]] = ...) -> None: ...

class ListQuarantineRequest(_message.Message):
    __slots__ = ("test_id", "limit")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    limit: int
    def __init__(self, test_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class QuarantinedEvent(_message.Message):
    __slots__ = ("received_time", "index", "field", "message", "event")
    RECEIVED_TIME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    received_time: _timestamp_pb2.Timestamp
    index: int
    field: str
    message: str
    event: Event
    def __init__(self, received_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., index: _Optional[int] = ..., field: _Optional[str] = ..., message: _Optional[str] = ..., event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class ListQuarantineResponse(_message.Message):
    __slots__ = ("events", "total")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[QuarantinedEvent]
    total: int
    def __init__(self, events: _Optional[_Iterable[_Union[QuarantinedEvent, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class PowerRequest(_message.Message):
    __slots__ = ("test_id", "minimum_detectable_effect", "power", "alpha", "control_variant", "users_per_variant")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_DETECTABLE_EFFECT_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    CONTROL_VARIANT_FIELD_NUMBER: _ClassVar[int]
    USERS_PER_VARIANT_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    minimum_detectable_effect: float
    power: float
    alpha: float
    control_variant: str
    users_per_variant: int
    def __init__(self, test_id: _Optional[str] = ..., minimum_detectable_effect: _Optional[float] = ..., power: _Optional[float] = ..., alpha: _Optional[float] = ..., control_variant: _Optional[str] = ..., users_per_variant: _Optional[int] = ...) -> None: ...

class MetricPower(_message.Message):
    __slots__ = ("metric", "baseline_mean", "baseline_variance", "users_per_variant", "days", "status_message", "at_users_per_variant", "detectable_effect", "power")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BASELINE_MEAN_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    USERS_PER_VARIANT_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_USERS_PER_VARIANT_FIELD_NUMBER: _ClassVar[int]
    DETECTABLE_EFFECT_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    metric: Metric
    baseline_mean: float
    baseline_variance: float
    users_per_variant: int
    days: float
    status_message: str
    at_users_per_variant: int
    detectable_effect: float
    power: float
    def __init__(self, metric: _Optional[_Union[Metric, str]] = ..., baseline_mean: _Optional[float] = ..., baseline_variance: _Optional[float] = ..., users_per_variant: _Optional[int] = ..., days: _Optional[float] = ..., status_message: _Optional[str] = ..., at_users_per_variant: _Optional[int] = ..., detectable_effect: _Optional[float] = ..., power: _Optional[float] = ...) -> None: ...

class PowerResponse(_message.Message):
    __slots__ = ("test_id", "control_variant", "metrics")
    TEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_VARIANT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    test_id: str
    control_variant: str
    metrics: _containers.RepeatedCompositeFieldContainer[MetricPower]
    def __init__(self, test_id: _Optional[str] = ..., control_variant: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[MetricPower, _Mapping]]] = ...) -> None: ...
