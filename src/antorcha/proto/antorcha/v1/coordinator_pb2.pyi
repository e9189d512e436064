from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Instruction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTRUCTION_UNSPECIFIED: _ClassVar[Instruction]
    CONTINUE: _ClassVar[Instruction]
    RESYNC: _ClassVar[Instruction]
    STOP: _ClassVar[Instruction]
INSTRUCTION_UNSPECIFIED: Instruction
CONTINUE: Instruction
RESYNC: Instruction
STOP: Instruction

class DeviceInfo(_message.Message):
    __slots__ = ("kind", "name", "memory_bytes", "tokens_per_second")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    memory_bytes: int
    tokens_per_second: float
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("peer_id", "maddrs", "client_mode")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MODE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    client_mode: bool
    def __init__(self, peer_id: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ..., client_mode: _Optional[bool] = ...) -> None: ...

class DiscoverRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class DiscoverResponse(_message.Message):
    __slots__ = ("protocol_version", "software_version", "run_id", "bootstrap_maddrs", "tokens_required", "run_active", "serves_queue")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_MADDRS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    RUN_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SERVES_QUEUE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    software_version: str
    run_id: str
    bootstrap_maddrs: _containers.RepeatedScalarFieldContainer[str]
    tokens_required: bool
    run_active: bool
    serves_queue: bool
    def __init__(self, protocol_version: _Optional[int] = ..., software_version: _Optional[str] = ..., run_id: _Optional[str] = ..., bootstrap_maddrs: _Optional[_Iterable[str]] = ..., tokens_required: _Optional[bool] = ..., run_active: _Optional[bool] = ..., serves_queue: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "software_version", "name", "worker_id", "device", "peer", "token", "session_public_key")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    software_version: str
    name: str
    worker_id: str
    device: DeviceInfo
    peer: PeerInfo
    token: str
    session_public_key: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., software_version: _Optional[str] = ..., name: _Optional[str] = ..., worker_id: _Optional[str] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., peer: _Optional[_Union[PeerInfo, _Mapping]] = ..., token: _Optional[str] = ..., session_public_key: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("worker_id", "lease_seconds", "heartbeat_interval_seconds", "run_id", "run_spec_json", "run_spec_sha256", "bootstrap_maddrs", "round", "state_checksum", "session_id", "session_ttl_seconds", "server_time_unix")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_SPEC_SHA256_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_MADDRS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_seconds: float
    heartbeat_interval_seconds: float
    run_id: str
    run_spec_json: str
    run_spec_sha256: str
    bootstrap_maddrs: _containers.RepeatedScalarFieldContainer[str]
    round: int
    state_checksum: str
    session_id: str
    session_ttl_seconds: float
    server_time_unix: float
    def __init__(self, worker_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., heartbeat_interval_seconds: _Optional[float] = ..., run_id: _Optional[str] = ..., run_spec_json: _Optional[str] = ..., run_spec_sha256: _Optional[str] = ..., bootstrap_maddrs: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., state_checksum: _Optional[str] = ..., session_id: _Optional[str] = ..., session_ttl_seconds: _Optional[float] = ..., server_time_unix: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("round", "inner_step", "tokens", "loss", "tokens_per_second")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    INNER_STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    round: int
    inner_step: int
    tokens: int
    loss: float
    tokens_per_second: float
    def __init__(self, round: _Optional[int] = ..., inner_step: _Optional[int] = ..., tokens: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "progress")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    progress: Progress
    def __init__(self, worker_id: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("instruction", "round", "lease_seconds", "reason", "session_ttl_seconds")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instruction: Instruction
    round: int
    lease_seconds: float
    reason: str
    session_ttl_seconds: float
    def __init__(self, instruction: _Optional[_Union[Instruction, str]] = ..., round: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., session_ttl_seconds: _Optional[float] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportRoundRequest(_message.Message):
    __slots__ = ("worker_id", "round", "tokens", "inner_steps", "train_loss", "compute_seconds", "pseudo_gradient_norm")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_GRADIENT_NORM_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    tokens: int
    inner_steps: int
    train_loss: float
    compute_seconds: float
    pseudo_gradient_norm: float
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., tokens: _Optional[int] = ..., inner_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., pseudo_gradient_norm: _Optional[float] = ...) -> None: ...

class GroupMember(_message.Message):
    __slots__ = ("peer_id", "maddrs", "weight", "reduce_fraction", "worker_id")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    weight: float
    reduce_fraction: float
    worker_id: str
    def __init__(self, peer_id: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ..., weight: _Optional[float] = ..., reduce_fraction: _Optional[float] = ..., worker_id: _Optional[str] = ...) -> None: ...

class AveragingGroup(_message.Message):
    __slots__ = ("group_id", "members", "codec", "timeout_seconds")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    members: _containers.RepeatedCompositeFieldContainer[GroupMember]
    codec: str
    timeout_seconds: float
    def __init__(self, group_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[GroupMember, _Mapping]]] = ..., codec: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class ReportRoundResponse(_message.Message):
    __slots__ = ("accepted", "reason", "group", "next_round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    group: AveragingGroup
    next_round: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., group: _Optional[_Union[AveragingGroup, _Mapping]] = ..., next_round: _Optional[int] = ...) -> None: ...

class CommitRoundRequest(_message.Message):
    __slots__ = ("worker_id", "round", "checksum", "data_plane_bytes", "averaging_seconds", "failed_spans")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_SPANS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    checksum: str
    data_plane_bytes: int
    averaging_seconds: float
    failed_spans: int
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., checksum: _Optional[str] = ..., data_plane_bytes: _Optional[int] = ..., averaging_seconds: _Optional[float] = ..., failed_spans: _Optional[int] = ...) -> None: ...

class CommitRoundResponse(_message.Message):
    __slots__ = ("instruction", "reason", "next_round", "expected_checksum")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    instruction: Instruction
    reason: str
    next_round: int
    expected_checksum: str
    def __init__(self, instruction: _Optional[_Union[Instruction, str]] = ..., reason: _Optional[str] = ..., next_round: _Optional[int] = ..., expected_checksum: _Optional[str] = ...) -> None: ...

class LeaseDataRequest(_message.Message):
    __slots__ = ("worker_id", "round", "index")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    index: int
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class LeaseDataResponse(_message.Message):
    __slots__ = ("shard", "num_shards", "epoch", "steps", "round_full", "reason", "last", "wait", "retry_after_seconds")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FULL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    num_shards: int
    epoch: int
    steps: int
    round_full: bool
    reason: str
    last: bool
    wait: bool
    retry_after_seconds: float
    def __init__(self, shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., epoch: _Optional[int] = ..., steps: _Optional[int] = ..., round_full: _Optional[bool] = ..., reason: _Optional[str] = ..., last: _Optional[bool] = ..., wait: _Optional[bool] = ..., retry_after_seconds: _Optional[float] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("worker_id", "min_round", "offset")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    min_round: int
    offset: int
    def __init__(self, worker_id: _Optional[str] = ..., min_round: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("round", "offset", "data", "chunk_sha256", "total_bytes", "state_sha256", "checksum")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    round: int
    offset: int
    data: bytes
    chunk_sha256: str
    total_bytes: int
    state_sha256: str
    checksum: str
    def __init__(self, round: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ..., state_sha256: _Optional[str] = ..., checksum: _Optional[str] = ...) -> None: ...

class GetRunStatusRequest(_message.Message):
    __slots__ = ("rounds_since", "rounds_limit")
    ROUNDS_SINCE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    rounds_since: int
    rounds_limit: int
    def __init__(self, rounds_since: _Optional[int] = ..., rounds_limit: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "name", "state", "device", "rounds_contributed", "seconds_since_heartbeat", "progress", "tokens", "detail")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_CONTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    name: str
    state: str
    device: DeviceInfo
    rounds_contributed: int
    seconds_since_heartbeat: float
    progress: Progress
    tokens: int
    detail: str
    def __init__(self, worker_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., rounds_contributed: _Optional[int] = ..., seconds_since_heartbeat: _Optional[float] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., tokens: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class RoundRecord(_message.Message):
    __slots__ = ("round", "workers", "tokens", "train_loss", "eval_loss", "data_plane_bytes", "seconds", "replicas_consistent", "checksum")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    round: int
    workers: int
    tokens: int
    train_loss: float
    eval_loss: float
    data_plane_bytes: int
    seconds: float
    replicas_consistent: bool
    checksum: str
    def __init__(self, round: _Optional[int] = ..., workers: _Optional[int] = ..., tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., data_plane_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., replicas_consistent: _Optional[bool] = ..., checksum: _Optional[str] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "round", "phase", "max_rounds", "workers", "rounds", "initial_eval_loss", "tokens", "data_plane_bytes", "state_bytes", "control_plane_bytes", "replicas_consistent", "joins", "leaves", "crashes", "resyncs", "epoch", "shards_trained", "num_data_shards", "restarts", "paused", "rounds_total", "train_loss", "eval_loss", "tokens_per_second", "evictions", "rejected_requests")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    JOINS_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    CRASHES_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARDS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    NUM_DATA_SHARDS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    phase: str
    max_rounds: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundRecord]
    initial_eval_loss: float
    tokens: int
    data_plane_bytes: int
    state_bytes: int
    control_plane_bytes: int
    replicas_consistent: bool
    joins: int
    leaves: int
    crashes: int
    resyncs: int
    epoch: int
    shards_trained: int
    num_data_shards: int
    restarts: int
    paused: bool
    rounds_total: int
    train_loss: float
    eval_loss: float
    tokens_per_second: float
    evictions: int
    rejected_requests: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., phase: _Optional[str] = ..., max_rounds: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundRecord, _Mapping]]] = ..., initial_eval_loss: _Optional[float] = ..., tokens: _Optional[int] = ..., data_plane_bytes: _Optional[int] = ..., state_bytes: _Optional[int] = ..., control_plane_bytes: _Optional[int] = ..., replicas_consistent: _Optional[bool] = ..., joins: _Optional[int] = ..., leaves: _Optional[int] = ..., crashes: _Optional[int] = ..., resyncs: _Optional[int] = ..., epoch: _Optional[int] = ..., shards_trained: _Optional[int] = ..., num_data_shards: _Optional[int] = ..., restarts: _Optional[int] = ..., paused: _Optional[bool] = ..., rounds_total: _Optional[int] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., evictions: _Optional[int] = ..., rejected_requests: _Optional[int] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("worker_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class OperatorResponse(_message.Message):
    __slots__ = ("changed", "message")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    message: str
    def __init__(self, changed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class SubmitRunRequest(_message.Message):
    __slots__ = ("run_spec_json",)
    RUN_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    run_spec_json: str
    def __init__(self, run_spec_json: _Optional[str] = ...) -> None: ...

class RunEntry(_message.Message):
    __slots__ = ("run_id", "state", "position", "submitted_unix", "started_unix", "finished_unix", "detail", "summary_json", "run_spec_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: str
    position: int
    submitted_unix: float
    started_unix: float
    finished_unix: float
    detail: str
    summary_json: str
    run_spec_json: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[str] = ..., position: _Optional[int] = ..., submitted_unix: _Optional[float] = ..., started_unix: _Optional[float] = ..., finished_unix: _Optional[float] = ..., detail: _Optional[str] = ..., summary_json: _Optional[str] = ..., run_spec_json: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunList(_message.Message):
    __slots__ = ("runs", "current_run_id")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunEntry]
    current_run_id: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunEntry, _Mapping]]] = ..., current_run_id: _Optional[str] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
