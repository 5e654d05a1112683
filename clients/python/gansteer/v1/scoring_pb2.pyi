from gansteer.v1 import common_pb2 as _common_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListScorersRequest(_message.Message):
    __slots__ = ("model_kind",)
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    model_kind: _common_pb2.ModelKind
    def __init__(self, model_kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ...) -> None: ...

class ScorerParam(_message.Message):
    __slots__ = ("name", "type", "default_json", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Scorer(_message.Message):
    __slots__ = ("name", "description", "model_kind", "models", "params", "differentiable", "per_image")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    model_kind: _common_pb2.ModelKind
    models: _containers.RepeatedScalarFieldContainer[str]
    params: _containers.RepeatedCompositeFieldContainer[ScorerParam]
    differentiable: bool
    per_image: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., model_kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., models: _Optional[_Iterable[str]] = ..., params: _Optional[_Iterable[_Union[ScorerParam, _Mapping]]] = ..., differentiable: _Optional[bool] = ..., per_image: _Optional[bool] = ...) -> None: ...

class ListScorersResponse(_message.Message):
    __slots__ = ("scorers",)
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    scorers: _containers.RepeatedCompositeFieldContainer[Scorer]
    def __init__(self, scorers: _Optional[_Iterable[_Union[Scorer, _Mapping]]] = ...) -> None: ...

class BinomialNoise(_message.Message):
    __slots__ = ("impressions", "seed")
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    impressions: int
    seed: int
    def __init__(self, impressions: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class OutputRequest(_message.Message):
    __slots__ = ("output", "model", "params", "key", "noise")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    output: str
    model: _common_pb2.ModelRef
    params: _struct_pb2.Struct
    key: str
    noise: BinomialNoise
    def __init__(self, output: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., key: _Optional[str] = ..., noise: _Optional[_Union[BinomialNoise, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("images", "outputs", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.ImageBatch
    outputs: _containers.RepeatedCompositeFieldContainer[OutputRequest]
    model: _common_pb2.ModelRef
    def __init__(self, images: _Optional[_Union[_common_pb2.ImageBatch, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[OutputRequest, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ScoreOutput(_message.Message):
    __slots__ = ("key", "values", "extra", "model")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _common_pb2.Tensor
    extra: _containers.MessageMap[str, _common_pb2.Tensor]
    model: _common_pb2.ModelRef
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., extra: _Optional[_Mapping[str, _common_pb2.Tensor]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[ScoreOutput]
    def __init__(self, outputs: _Optional[_Iterable[_Union[ScoreOutput, _Mapping]]] = ...) -> None: ...

class ObjectiveTerm(_message.Message):
    __slots__ = ("output", "weight")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    output: OutputRequest
    weight: float
    def __init__(self, output: _Optional[_Union[OutputRequest, _Mapping]] = ..., weight: _Optional[float] = ...) -> None: ...

class ScoreGradRequest(_message.Message):
    __slots__ = ("images", "terms", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.ImageBatch
    terms: _containers.RepeatedCompositeFieldContainer[ObjectiveTerm]
    model: _common_pb2.ModelRef
    def __init__(self, images: _Optional[_Union[_common_pb2.ImageBatch, _Mapping]] = ..., terms: _Optional[_Iterable[_Union[ObjectiveTerm, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ScoreGradResponse(_message.Message):
    __slots__ = ("values", "grad_images", "terms")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GRAD_IMAGES_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    values: _common_pb2.Tensor
    grad_images: _common_pb2.Tensor
    terms: _containers.RepeatedCompositeFieldContainer[ScoreOutput]
    def __init__(self, values: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., grad_images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., terms: _Optional[_Iterable[_Union[ScoreOutput, _Mapping]]] = ...) -> None: ...
