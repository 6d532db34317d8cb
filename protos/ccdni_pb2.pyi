from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "parts")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    parts: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., parts: _Optional[int] = ...) -> None: ...

class TensorPart(_message.Message):
    __slots__ = ("field", "part", "parts", "total_bytes", "dtype", "shape", "data")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    field: str
    part: int
    parts: int
    total_bytes: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, field: _Optional[str] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ..., total_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ActivityKey(_message.Message):
    __slots__ = ("run", "batch", "window", "chunk", "micro_batch")
    RUN_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    run: str
    batch: int
    window: int
    chunk: int
    micro_batch: int
    def __init__(self, run: _Optional[str] = ..., batch: _Optional[int] = ..., window: _Optional[int] = ..., chunk: _Optional[int] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class Activity(_message.Message):
    __slots__ = ("key", "outputs", "state", "context")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    key: ActivityKey
    outputs: Tensor
    state: _containers.RepeatedCompositeFieldContainer[Tensor]
    context: Tensor
    def __init__(self, key: _Optional[_Union[ActivityKey, _Mapping]] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., context: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("key", "kind", "target", "tensors")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Feedback.Kind]
        OBSERVED: _ClassVar[Feedback.Kind]
        PREDICTED: _ClassVar[Feedback.Kind]
    KIND_UNSPECIFIED: Feedback.Kind
    OBSERVED: Feedback.Kind
    PREDICTED: Feedback.Kind
    class Target(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TARGET_UNSPECIFIED: _ClassVar[Feedback.Target]
        OUTPUT: _ClassVar[Feedback.Target]
        STATE: _ClassVar[Feedback.Target]
        INPUT: _ClassVar[Feedback.Target]
    TARGET_UNSPECIFIED: Feedback.Target
    OUTPUT: Feedback.Target
    STATE: Feedback.Target
    INPUT: Feedback.Target
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    key: ActivityKey
    kind: Feedback.Kind
    target: Feedback.Target
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, key: _Optional[_Union[ActivityKey, _Mapping]] = ..., kind: _Optional[_Union[Feedback.Kind, str]] = ..., target: _Optional[_Union[Feedback.Target, str]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class ActivityFrame(_message.Message):
    __slots__ = ("activity", "part")
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    activity: Activity
    part: TensorPart
    def __init__(self, activity: _Optional[_Union[Activity, _Mapping]] = ..., part: _Optional[_Union[TensorPart, _Mapping]] = ...) -> None: ...

class FeedbackFrame(_message.Message):
    __slots__ = ("feedback", "part")
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    feedback: Feedback
    part: TensorPart
    def __init__(self, feedback: _Optional[_Union[Feedback, _Mapping]] = ..., part: _Optional[_Union[TensorPart, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class ZoneQuery(_message.Message):
    __slots__ = ("zone", "key", "activity", "context")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    zone: str
    key: ActivityKey
    activity: Tensor
    context: Tensor
    def __init__(self, zone: _Optional[str] = ..., key: _Optional[_Union[ActivityKey, _Mapping]] = ..., activity: _Optional[_Union[Tensor, _Mapping]] = ..., context: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[ZoneQuery]
    def __init__(self, queries: _Optional[_Iterable[_Union[ZoneQuery, _Mapping]]] = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("predictions", "available", "step")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Tensor]
    available: _containers.RepeatedScalarFieldContainer[bool]
    step: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., available: _Optional[_Iterable[bool]] = ..., step: _Optional[int] = ...) -> None: ...

class LearnRequest(_message.Message):
    __slots__ = ("zone", "key", "observed", "activity", "context", "update", "part")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    zone: str
    key: ActivityKey
    observed: Tensor
    activity: Tensor
    context: Tensor
    update: bool
    part: TensorPart
    def __init__(self, zone: _Optional[str] = ..., key: _Optional[_Union[ActivityKey, _Mapping]] = ..., observed: _Optional[_Union[Tensor, _Mapping]] = ..., activity: _Optional[_Union[Tensor, _Mapping]] = ..., context: _Optional[_Union[Tensor, _Mapping]] = ..., update: _Optional[bool] = ..., part: _Optional[_Union[TensorPart, _Mapping]] = ...) -> None: ...

class LearnReply(_message.Message):
    __slots__ = ("accepted", "cache_misses", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    cache_misses: int
    rejected: int
    def __init__(self, accepted: _Optional[int] = ..., cache_misses: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: bytes
    def __init__(self, config: _Optional[bytes] = ...) -> None: ...

class ConfigureReply(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: bytes
    def __init__(self, config: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("counters",)
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.ScalarMap[str, float]
    def __init__(self, counters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("path", "step", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class RestoreReply(_message.Message):
    __slots__ = ("path", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...
