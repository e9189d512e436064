from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReduceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCE_STATUS_UNSPECIFIED: _ClassVar[ReduceStatus]
    REDUCE_OK: _ClassVar[ReduceStatus]
    REDUCE_UNKNOWN_GROUP: _ClassVar[ReduceStatus]
    REDUCE_REJECTED: _ClassVar[ReduceStatus]
    REDUCE_NO_CONTRIBUTORS: _ClassVar[ReduceStatus]
    REDUCE_NOT_A_MEMBER: _ClassVar[ReduceStatus]
REDUCE_STATUS_UNSPECIFIED: ReduceStatus
REDUCE_OK: ReduceStatus
REDUCE_UNKNOWN_GROUP: ReduceStatus
REDUCE_REJECTED: ReduceStatus
REDUCE_NO_CONTRIBUTORS: ReduceStatus
REDUCE_NOT_A_MEMBER: ReduceStatus

class ReducePartRequest(_message.Message):
    __slots__ = ("group_id", "chunk", "weight", "payload", "num_elements")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    chunk: int
    weight: float
    payload: bytes
    num_elements: int
    def __init__(self, group_id: _Optional[str] = ..., chunk: _Optional[int] = ..., weight: _Optional[float] = ..., payload: _Optional[bytes] = ..., num_elements: _Optional[int] = ...) -> None: ...

class ReducePartResponse(_message.Message):
    __slots__ = ("status", "reason", "payload", "total_weight", "contributors")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    status: ReduceStatus
    reason: str
    payload: bytes
    total_weight: float
    contributors: int
    def __init__(self, status: _Optional[_Union[ReduceStatus, str]] = ..., reason: _Optional[str] = ..., payload: _Optional[bytes] = ..., total_weight: _Optional[float] = ..., contributors: _Optional[int] = ...) -> None: ...
