"""Models as files with a card, never pickles (decision 2): the card format, the loaders and the registry."""

from gansteer_server.models.card import (
    CARD_FILE,
    FORMATS,
    KINDS,
    InputNormalization,
    LatentPrior,
    ModelCard,
)
from gansteer_server.models.errors import ModelNotFound, ModelRegistryError, ModelUnavailable
from gansteer_server.models.loaders import LoadedModel, load_latent_prior, load_model, verify_model_files
from gansteer_server.models.onnx_model import ForwardOnlyError, OnnxModel
from gansteer_server.models.registry import (
    ModelEntry,
    ModelRegistry,
    parse_ref,
)

__all__ = [
    "CARD_FILE",
    "FORMATS",
    "KINDS",
    "ForwardOnlyError",
    "InputNormalization",
    "LatentPrior",
    "LoadedModel",
    "ModelCard",
    "ModelEntry",
    "ModelNotFound",
    "ModelRegistry",
    "ModelRegistryError",
    "ModelUnavailable",
    "OnnxModel",
    "load_latent_prior",
    "load_model",
    "parse_ref",
    "verify_model_files",
]
