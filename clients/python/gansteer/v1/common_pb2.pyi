from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_TENSOR: _ClassVar[ImageFormat]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_GENERATOR: _ClassVar[ModelKind]
    MODEL_KIND_DISCRIMINATOR: _ClassVar[ModelKind]
    MODEL_KIND_CLASSIFIER: _ClassVar[ModelKind]
    MODEL_KIND_PIR_ESTIMATOR: _ClassVar[ModelKind]
    MODEL_KIND_FEATURE_EXTRACTOR: _ClassVar[ModelKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_TENSOR: ImageFormat
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_GENERATOR: ModelKind
MODEL_KIND_DISCRIMINATOR: ModelKind
MODEL_KIND_CLASSIFIER: ModelKind
MODEL_KIND_PIR_ESTIMATOR: ModelKind
MODEL_KIND_FEATURE_EXTRACTOR: ModelKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("png", "tensor")
    PNG_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    tensor: Tensor
    def __init__(self, png: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ImageBatch(_message.Message):
    __slots__ = ("images", "tensor")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    tensor: Tensor
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class LatentPrior(_message.Message):
    __slots__ = ("kind", "mean", "covariance")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[LatentPrior.Kind]
        KIND_STANDARD_NORMAL: _ClassVar[LatentPrior.Kind]
        KIND_GAUSSIAN: _ClassVar[LatentPrior.Kind]
    KIND_UNSPECIFIED: LatentPrior.Kind
    KIND_STANDARD_NORMAL: LatentPrior.Kind
    KIND_GAUSSIAN: LatentPrior.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    COVARIANCE_FIELD_NUMBER: _ClassVar[int]
    kind: LatentPrior.Kind
    mean: Tensor
    covariance: Tensor
    def __init__(self, kind: _Optional[_Union[LatentPrior.Kind, str]] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., covariance: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ValueRange(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("name", "version", "kind", "architecture", "latent_size", "prior", "num_classes", "class_names", "embedding_size", "resolution", "channels", "value_range", "metrics", "card_json", "description", "backends", "format", "created")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LATENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_RANGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: ModelKind
    architecture: str
    latent_size: int
    prior: LatentPrior
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    embedding_size: int
    resolution: int
    channels: int
    value_range: ValueRange
    metrics: _containers.ScalarMap[str, float]
    card_json: str
    description: str
    backends: _containers.RepeatedScalarFieldContainer[str]
    format: str
    created: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., architecture: _Optional[str] = ..., latent_size: _Optional[int] = ..., prior: _Optional[_Union[LatentPrior, _Mapping]] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., embedding_size: _Optional[int] = ..., resolution: _Optional[int] = ..., channels: _Optional[int] = ..., value_range: _Optional[_Union[ValueRange, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., card_json: _Optional[str] = ..., description: _Optional[str] = ..., backends: _Optional[_Iterable[str]] = ..., format: _Optional[str] = ..., created: _Optional[str] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("field", "reason", "message")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    field: str
    reason: str
    message: str
    def __init__(self, field: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ErrorDetails(_message.Message):
    __slots__ = ("details",)
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    details: _containers.RepeatedCompositeFieldContainer[ErrorDetail]
    def __init__(self, details: _Optional[_Iterable[_Union[ErrorDetail, _Mapping]]] = ...) -> None: ...

class ClassCondition(_message.Message):
    __slots__ = ("class_ids", "embeddings")
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    class_ids: ClassIds
    embeddings: Tensor
    def __init__(self, class_ids: _Optional[_Union[ClassIds, _Mapping]] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...
