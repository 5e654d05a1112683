from gansteer.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ("kind", "name_contains", "all_versions")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    kind: _common_pb2.ModelKind
    name_contains: str
    all_versions: bool
    def __init__(self, kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., name_contains: _Optional[str] = ..., all_versions: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelCard]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelCard, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("card",)
    CARD_FIELD_NUMBER: _ClassVar[int]
    card: _common_pb2.ModelCard
    def __init__(self, card: _Optional[_Union[_common_pb2.ModelCard, _Mapping]] = ...) -> None: ...

class SeededLatents(_message.Message):
    __slots__ = ("seed", "count")
    SEED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    seed: int
    count: int
    def __init__(self, seed: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "latents", "seeded", "condition", "truncation", "format", "chunk_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SEEDED_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    latents: _common_pb2.Tensor
    seeded: SeededLatents
    condition: _common_pb2.ClassCondition
    truncation: float
    format: _common_pb2.ImageFormat
    chunk_size: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., seeded: _Optional[_Union[SeededLatents, _Mapping]] = ..., condition: _Optional[_Union[_common_pb2.ClassCondition, _Mapping]] = ..., truncation: _Optional[float] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "latents", "class_ids", "class_embeddings", "model", "offset", "total")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.ImageBatch
    latents: _common_pb2.Tensor
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    class_embeddings: _common_pb2.Tensor
    model: _common_pb2.ModelRef
    offset: int
    total: int
    def __init__(self, images: _Optional[_Union[_common_pb2.ImageBatch, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., class_ids: _Optional[_Iterable[int]] = ..., class_embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("model", "latents", "condition", "grad_images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    GRAD_IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    latents: _common_pb2.Tensor
    condition: _common_pb2.ClassCondition
    grad_images: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., condition: _Optional[_Union[_common_pb2.ClassCondition, _Mapping]] = ..., grad_images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_latents", "grad_class_embeddings", "model")
    GRAD_LATENTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLASS_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    grad_latents: _common_pb2.Tensor
    grad_class_embeddings: _common_pb2.Tensor
    model: _common_pb2.ModelRef
    def __init__(self, grad_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., grad_class_embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...
