"""Built-in architectures, looked up by the name a model card gives in its `architecture` field.

A card names an architecture and its keyword arguments; the registry builds the module with
`build_architecture(name, **kwargs)` and loads `.safetensors` weights into it. Adding an architecture is one
decorated class or function in a module of this package plus one import line below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a module constructor under `name` (the value of a card's `architecture` field)."""

    def decorate(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        _ARCHITECTURES[name] = constructor
        return constructor

    return decorate


def architecture_names() -> list[str]:
    _import_builtin_modules()
    return sorted(_ARCHITECTURES)


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build the named architecture; raises KeyError for an unknown name (the registry turns it into its error)."""
    _import_builtin_modules()
    if name not in _ARCHITECTURES:
        raise KeyError(name)
    return _ARCHITECTURES[name](**kwargs)


def _import_builtin_modules() -> None:
    # Imported lazily so that importing the registry does not build every network module up front.
    from gansteer_server.models.architectures import biggan, pir, scenes, torchvision_nets  # noqa: F401
