from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoints(_message.Message):
    __slots__ = ("grpc", "ucx")
    GRPC_FIELD_NUMBER: _ClassVar[int]
    UCX_FIELD_NUMBER: _ClassVar[int]
    grpc: str
    ucx: str
    def __init__(self, grpc: _Optional[str] = ..., ucx: _Optional[str] = ...) -> None: ...

class PlanReplica(_message.Message):
    __slots__ = ("id", "endpoints", "plane", "shard")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PLANE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    id: str
    endpoints: Endpoints
    plane: int
    shard: str
    def __init__(self, id: _Optional[str] = ..., endpoints: _Optional[_Union[Endpoints, _Mapping]] = ..., plane: _Optional[int] = ..., shard: _Optional[str] = ...) -> None: ...

class ExpertReplicas(_message.Message):
    __slots__ = ("replica_ids",)
    REPLICA_IDS_FIELD_NUMBER: _ClassVar[int]
    replica_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replica_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerPlan(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertReplicas]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertReplicas, _Mapping]]] = ...) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("version", "n_routed_experts", "layers", "replicas", "missing", "created_unix_ms")
    class ReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PlanReplica
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PlanReplica, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    N_ROUTED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    version: int
    n_routed_experts: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerPlan]
    replicas: _containers.MessageMap[str, PlanReplica]
    missing: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    created_unix_ms: int
    def __init__(self, version: _Optional[int] = ..., n_routed_experts: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerPlan, _Mapping]]] = ..., replicas: _Optional[_Mapping[str, PlanReplica]] = ..., missing: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("plan_version", "missing")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    missing: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    def __init__(self, plan_version: _Optional[int] = ..., missing: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("id", "kind", "endpoints", "plane", "experts", "shard", "pid", "host", "state", "capacity", "started_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PLANE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    endpoints: Endpoints
    plane: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    shard: str
    pid: int
    host: str
    state: str
    capacity: int
    started_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., endpoints: _Optional[_Union[Endpoints, _Mapping]] = ..., plane: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., shard: _Optional[str] = ..., pid: _Optional[int] = ..., host: _Optional[str] = ..., state: _Optional[str] = ..., capacity: _Optional[int] = ..., started_unix_ms: _Optional[int] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("name", "experts", "replica_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    experts: _containers.RepeatedScalarFieldContainer[int]
    replica_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., experts: _Optional[_Iterable[int]] = ..., replica_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "expert", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("plan_version", "shards", "replicas", "missing", "load_window_start_unix_s", "load_window_s", "expert_load")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    LOAD_WINDOW_START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    missing: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    load_window_start_unix_s: int
    load_window_s: int
    expert_load: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    def __init__(self, plan_version: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., missing: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., load_window_start_unix_s: _Optional[int] = ..., load_window_s: _Optional[int] = ..., expert_load: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ...) -> None: ...
