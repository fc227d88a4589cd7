"""One entry point for every architecture: `create_model(name, num_classes=..., in_chans=...)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator that registers a builder `fn(num_classes, in_chans, image_size, **kwargs) -> nn.Module`."""

    def add(fn: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return add


def available_models() -> list[str]:
    """Names accepted by `create_model` (and by `model.name` in config)."""
    return sorted(_BUILDERS)


def create_model(name: str, *, num_classes: int, in_chans: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names list the valid ones."""
    if name not in _BUILDERS:
        raise KeyError(
            f"model.name={name!r} is not a registered model; valid: {', '.join(available_models())}"
        )
    return _BUILDERS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
