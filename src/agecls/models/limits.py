"""What input a configured model accepts, known before any data exists: its smallest image side, and a dry
build on the meta device (no memory, no weights file read) that runs every check its builder makes."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import torch

from agecls.models.registry import create_backbone, create_model, skip_weights
from agecls.models.residual_attention import STEM_STRIDE
from agecls.models.torchvision_zoo import _WHY as _ZOO_WHY
from agecls.models.torchvision_zoo import MIN_IMAGE_SIZE as _ZOO_MIN

_MODEL_META = ("name",)  # model-config keys that are not builder arguments
_ZOO = (
    "resnet50",
    "resnet152",
    "densenet121",
    "densenet201",
    "efficientnet_v2_s",
    "efficientnet_v2_m",
    "efficientnet_v2_l",
    "vgg16",
)
_LARGEST = 1024  # image side searched up to for a torchvision model's minimum


def min_image_size(model_cfg: Mapping[str, Any], in_chans: int = 1) -> tuple[int, str]:
    """(smallest data.image_size the configured model takes, why): from its strides where they are known,
    else (`model=torchvision`) the smallest side a dry forward pass accepts."""
    name = str(model_cfg.get("name"))
    if name == "basic_cnn":
        blocks = model_cfg.get("blocks", 4)
        if not isinstance(blocks, int) or not 1 <= blocks <= 5:
            return 1, ""  # the builder names the bad model.blocks
        return 2**blocks, f"model.blocks={blocks} max-pools of 2 need a multiple of {2**blocks}"
    if name in _ZOO:
        return _ZOO_MIN, _ZOO_WHY
    if name == "inception_resnet_v1":
        if model_cfg.get("padded", False):
            return 32, "total stride 32 with model.padded=true"
        return 75, "valid convs shrink 75 px to a 1x1 map; model.padded=true allows 32"
    if name == "residual_attention":
        stem = str(model_cfg.get("stem", "auto"))
        stride = STEM_STRIDE.get("small" if stem == "auto" else stem, 1)  # auto: small below 64 px
        return 8 * stride, f"stem {stem} (stride {stride}) then 3 stride-2 stages"
    if name != "torchvision":
        return 1, ""  # a model registered elsewhere: its builder checks the size
    low, high = 1, _LARGEST  # the forward pass fits at `high`, or no size fits
    if not _fits(model_cfg, in_chans, high):
        return _LARGEST + 1, f"no side up to {_LARGEST} px passes a test forward pass"
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if _fits(model_cfg, in_chans, mid) else (mid + 1, high)
    return low, "the smallest side a test forward pass accepts"


def _fits(model_cfg: Mapping[str, Any], in_chans: int, image_size: int) -> bool:
    try:
        dry_build(model_cfg, in_chans=in_chans, image_size=image_size)
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError):
        return False
    return True


def dry_build(
    model_cfg: Mapping[str, Any], *, in_chans: int, image_size: int, num_classes: int = 2, trunk: bool = False
) -> None:
    """Build the configured model (or, `trunk`, its multitask trunk) on the meta device: every check its
    builder makes raises here (ValueError/TypeError/KeyError naming the key), without allocating weights."""
    kwargs = {k: v for k, v in dict(model_cfg).items() if k not in _MODEL_META}
    name = str(model_cfg.get("name"))
    with torch.device("meta"), skip_weights():
        if trunk:
            create_backbone(name, in_chans=in_chans, image_size=image_size, **kwargs)
        else:
            create_model(name, num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)


def check_input(model_cfg: Mapping[str, Any], *, in_chans: int, image_size: Any, trunk: bool = False) -> None:
    """ValueError (one line) when the configured model cannot take `image_size` px images
    (`data.image_size=N: ...`) or has a key its builder does not take (`model.KEY: ...`, naming the closest
    key); nothing is allocated."""
    name = model_cfg.get("name")
    known = str(name) != "torchvision"  # a torchvision model's minimum is searched only when it does not fit
    label = repr(name) if known else f"torchvision {model_cfg.get('arch')!r}"
    minimum, why = min_image_size(model_cfg, in_chans) if known else (1, "")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < minimum:
        why = f" ({why})" if why else ""
        raise ValueError(
            f"data.image_size={image_size}: model {label} needs a whole number >= {minimum}{why}"
        )
    try:
        dry_build(model_cfg, in_chans=in_chans, image_size=image_size, trunk=trunk)
    except (ValueError, TypeError, KeyError) as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        unknown = re.search(r"unexpected keyword argument '(\w+)'|has no key\(s\) (\w+)", message)
        if unknown:
            key = unknown.group(1) or unknown.group(2)
            valid = [k for k in model_cfg if k != key and k not in _MODEL_META]
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean model.{close[0]}?" if close else ""
            message = f"model.{key}: model {label} has no such key{hint} (its keys: {', '.join(valid)})"
        elif not known and "data.image_size" in message:
            minimum, why = min_image_size(model_cfg, in_chans)
            message = f"data.image_size={image_size}: model {label} needs a whole number >= {minimum} ({why})"
        raise ValueError(message) from None
