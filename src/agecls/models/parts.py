"""What every zoo model tells the registry about itself, and the generic operations built on it.

A builder returns an `nn.Module` carrying a `zoo_parts: ModelParts` attribute (a class attribute or one set on
the instance). From it the registry can, for any architecture: adapt the first conv to the input channels,
load a local weights file while tolerating only the layers that were replaced, freeze the feature extractor
(and the head's first FC), and cut the final classifier off to get a shared trunk (`create_backbone`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

FREEZE_MODES = ("none", "features", "features_fc1")


@dataclass(frozen=True)
class ModelParts:
    """Dotted module names (as in `model.named_modules()`) of the parts the generic operations need.

    stem: the first conv(s) that see the image; a weights file whose first conv has another number of input
      channels is adapted (3 -> 1: summed over RGB; 1 -> 3: repeated / 3), other mismatches there are skipped.
    head: everything `freeze=features` leaves trainable (the classifier).
    fc1: the head's first FC (plus its norm), also frozen by `freeze=features_fc1`; empty: a one-layer head.
    new: layers built fresh for this task (the classifier sized by num_classes); a weights file may lack them
      or hold them in another shape, and they are then left as initialised.
    last: the final layer that produces the logits; `create_backbone` replaces it by an identity.
    """

    stem: tuple[str, ...]
    head: tuple[str, ...]
    fc1: tuple[str, ...]
    new: tuple[str, ...]
    last: str


def parts_of(model: nn.Module) -> ModelParts:
    """The `ModelParts` of a model built by the registry (error when a builder forgot to attach them)."""
    parts = getattr(model, "zoo_parts", None)
    if not isinstance(parts, ModelParts):
        raise TypeError(f"{type(model).__name__} has no `zoo_parts`; registered builders must attach them")
    return parts


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    """True when the dotted `name` is one of `prefixes` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """`model.get_submodule` with an error that names the missing part."""
    try:
        return model.get_submodule(dotted)
    except AttributeError as err:
        raise AttributeError(f"{type(model).__name__} has no submodule {dotted!r}") from err


def set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    """Replace the submodule at `dotted` (e.g. 'features.0.0') by `module`."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def make_head(in_features: int, num_classes: int, dropout: float = 0.0, hidden: int = 0) -> nn.Sequential:
    """The zoo's classifier. hidden=0: Dropout -> Linear (torchvision's EfficientNet layout, `.1` is last);
    hidden>0: Linear(hidden) -> ReLU -> Dropout -> Linear, as the dissertation's CNN (`.0` fc1, `.3` last)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    if hidden < 0:
        raise ValueError(f"model.hidden={hidden} must be >= 0 (0: no hidden layer)")
    if hidden == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def head_parts(head: str, hidden: int, stem: tuple[str, ...]) -> ModelParts:
    """`ModelParts` for a model whose whole classifier at `head` was built by `make_head`."""
    last = f"{head}.{3 if hidden else 1}"
    return ModelParts(stem=stem, head=(head,), fc1=(f"{head}.0",) if hidden else (), new=(head,), last=last)


def adapt_first_conv(model: nn.Module, dotted: str, in_chans: int) -> None:
    """Give the conv at `dotted` `in_chans` input channels, keeping its initialisation's scale.

    The new weight is the freshly initialised one's channels, cycled (1 channel: the first RGB slice), so
    the init's distribution (torchvision's fan-out Kaiming for most models) is unchanged."""
    conv = get_module(model, dotted)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{dotted!r} is a {type(conv).__name__}, not the first Conv2d")
    if in_chans < 1:
        raise ValueError(f"in_chans={in_chans} must be >= 1")
    if conv.in_channels == in_chans:
        return
    if conv.groups != 1:
        raise ValueError(
            f"first conv {dotted!r} is grouped ({conv.groups}); cannot change its input channels"
        )
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    reps = math.ceil(in_chans / conv.in_channels)
    new.weight.data.copy_(conv.weight.data.repeat(1, reps, 1, 1)[:, :in_chans])
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    set_module(model, dotted, new)


def check_image_size(name: str, image_size: int, minimum: int, why: str) -> None:
    """A clear error, before any shape error, when the image is smaller than the architecture allows."""
    if image_size < minimum:
        raise ValueError(
            f"data.image_size={image_size} is too small for model {name!r}: "
            f"it needs at least {minimum} px ({why})"
        )


def _keep_eval(module: nn.Module, args) -> None:
    """Forward pre-hook: a frozen BatchNorm keeps its running statistics (eval mode) even in training."""
    module.train(False)


def freeze(model: nn.Module, mode: str | None, name: str) -> None:
    """Apply `model.freeze`: none | features | features_fc1 (see `ModelParts`).

    Frozen parameters get requires_grad=False; frozen BatchNorm layers also stay in eval mode (their running
    statistics stay those of the loaded weights, as the dissertation's `feature_extractor.eval()`)."""
    mode = "none" if mode is None else str(mode)
    if mode not in FREEZE_MODES:
        raise ValueError(f"model.freeze={mode!r}; valid: {', '.join(FREEZE_MODES)}")
    if mode == "none":
        return
    parts = parts_of(model)
    if mode == "features_fc1" and not parts.fc1:
        raise ValueError(
            f"model.freeze=features_fc1: model {name!r} has a one-layer head, so there is no first FC to "
            "freeze; set model.hidden>0 to give it one (where the model has that knob) or use freeze=features"
        )
    frozen_fc1 = parts.fc1 if mode == "features_fc1" else ()

    def trainable(dotted: str) -> bool:
        return under(dotted, parts.head) and not under(dotted, frozen_fc1)

    for pname, param in model.named_parameters():
        param.requires_grad = trainable(pname)
    for mname, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not trainable(mname):
            module.register_forward_pre_hook(_keep_eval)
