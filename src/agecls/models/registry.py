"""One entry point for every architecture: `create_model(name, num_classes=, in_chans=, image_size=)`.

Builders registered with `@register_model(name)` only build the architecture (and attach its `ModelParts`);
the keys every model config shares are handled here, once, for all of them:
  weights: null | PATH         a local state dict loaded after building (never a download)
  weights_prefix: null | STR   load the file's keys under this prefix (null: 'model.'/'module.' if needed)
  strict_weights: true         any missing/unexpected/mis-shaped key outside the replaced layers is an error
  freeze: none | features | features_fc1
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import nn

from agecls.models.parts import freeze as apply_freeze
from agecls.models.parts import get_module, parts_of, set_module
from agecls.models.weights import load_weights

ModelBuilder = Callable[..., nn.Module]
_BUILDERS: dict[str, ModelBuilder] = {}
_SKIP_WEIGHTS: ContextVar[bool] = ContextVar("agecls_skip_weights", default=False)


@contextmanager
def skip_weights() -> Iterator[None]:
    """Inside this block `model.weights` is ignored: for rebuilding a model whose checkpoint holds every
    tensor anyway (`FaceClassifier.load_from_checkpoint`), so the initial weights file need not exist."""
    token = _SKIP_WEIGHTS.set(True)
    try:
        yield
    finally:
        _SKIP_WEIGHTS.reset(token)


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator that registers a builder `fn(num_classes, in_chans, image_size, **kwargs) -> nn.Module`.

    The module it returns carries `zoo_parts: ModelParts` (see agecls.models.parts)."""

    def add(fn: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return add


def available_models() -> list[str]:
    """Names accepted by `create_model` (and by `model.name` in config)."""
    return sorted(_BUILDERS)


def _builder(name: str) -> ModelBuilder:
    if name not in _BUILDERS:
        raise KeyError(
            f"model.name={name!r} is not a registered model; valid: {', '.join(available_models())}"
        )
    return _BUILDERS[name]


def _finish(
    model: nn.Module,
    name: str,
    weights: str | None,
    weights_prefix: str | None,
    strict_weights: bool,
    freeze_mode: str | None,
) -> nn.Module:
    """Load the weights file (if any), then freeze: shared by `create_model` and `create_backbone`."""
    parts = parts_of(model)
    if weights and not _SKIP_WEIGHTS.get():
        prefix = None if weights_prefix is None else str(weights_prefix)
        load_weights(model, parts, str(weights), name=name, prefix=prefix, strict=bool(strict_weights))
    apply_freeze(model, freeze_mode, name)
    return model


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int,
    weights: str | None = None,
    weights_prefix: str | None = None,
    strict_weights: bool = True,
    freeze: str | None = "none",
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model whose forward gives (N, num_classes) logits; unknown names list the valid
    ones. `weights`/`weights_prefix`/`strict_weights`/`freeze` are described in the module docstring."""
    model = _builder(name)(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
    return _finish(model, name, weights, weights_prefix, strict_weights, freeze)


def create_backbone(
    name: str,
    *,
    in_chans: int,
    image_size: int,
    weights: str | None = None,
    weights_prefix: str | None = None,
    strict_weights: bool = True,
    freeze: str | None = "none",
    **kwargs: Any,
) -> tuple[nn.Module, int]:
    """The model of `create_model` without its final classifier layer: forward gives (N, feature_dim).

    The final layer (`ModelParts.last`) becomes an identity, so whatever precedes it stays in the trunk
    (e.g. basic_cnn's fc(hidden) -> ReLU -> Dropout, the dissertation's multitask trunk; InceptionResnetV1's
    512-d bottleneck). A weights file's final-layer keys are ignored."""
    model = _builder(name)(num_classes=2, in_chans=in_chans, image_size=image_size, **kwargs)
    last_name = parts_of(model).last
    last = get_module(model, last_name)
    if isinstance(last, nn.Linear):
        feature_dim = last.in_features
    elif isinstance(last, nn.Conv2d):
        feature_dim = last.in_channels
    else:
        raise TypeError(f"model {name!r}: final layer {last_name!r} is a {type(last).__name__}")
    set_module(model, last_name, nn.Identity())
    return _finish(model, name, weights, weights_prefix, strict_weights, freeze), feature_dim
