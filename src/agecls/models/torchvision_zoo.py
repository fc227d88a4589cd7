"""torchvision architectures, always built with weights=None (nothing is ever downloaded).

Each keeps torchvision's module names, so a local torchvision weights file (e.g. ImageNet) loads through
`model.weights` as is; the first conv is replaced when `in_chans` != 3 and the classifier is rebuilt for
`num_classes`. Named models: vgg16, resnet50, resnet152, densenet121, densenet201, efficientnet_v2_s/m/l;
`model=torchvision model.arch=NAME` builds any torchvision classification model.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as vgg_layers

from agecls.models.parts import (
    ModelParts,
    adapt_first_conv,
    check_image_size,
    get_module,
    head_parts,
    make_head,
    set_module,
)
from agecls.models.registry import register_model

# Every named model below downsamples by 32; at 32 px its last feature map is 1x1 (VGG and DenseNet fail
# below that, ResNet and EfficientNet would only pool a 1x1 map of a 16 px image).
MIN_IMAGE_SIZE = 32
_WHY = "its total stride is 32, so the last feature map is 1x1 at 32 px"


def _torchvision(arch: str, **kwargs: Any) -> nn.Module:
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _with_head(
    model: nn.Module, *, stem: str, head: str, in_chans: int, num_classes: int, dropout: float, hidden: int
) -> nn.Module:
    """Adapt the stem to `in_chans` and replace the classifier at `head` by `make_head` (see parts.py)."""
    adapt_first_conv(model, stem, in_chans)
    old = get_module(model, head)
    linears = [m for m in old.modules() if isinstance(m, nn.Linear)]
    set_module(model, head, make_head(linears[-1].in_features, num_classes, float(dropout), int(hidden)))
    model.zoo_parts = head_parts(head, int(hidden), stem=(stem,))
    return model


def _register_simple(name: str, stem: str, head: str, dropout: float, **arch_defaults: Any) -> None:
    """Register `name`: torchvision's `name`, its first conv at `stem` and its classifier at `head`."""

    @register_model(name)
    def build(
        num_classes: int,
        in_chans: int,
        image_size: int,
        dropout: float = dropout,
        hidden: int = 0,
        **arch_kwargs: Any,
    ) -> nn.Module:
        check_image_size(name, image_size, MIN_IMAGE_SIZE, _WHY)
        unknown = sorted(set(arch_kwargs) - set(arch_defaults))
        if unknown:
            valid = ", ".join(["dropout", "hidden", *arch_defaults])
            raise TypeError(f"model {name!r} has no key(s) {', '.join(unknown)}; valid: {valid}")
        model = _torchvision(name, **(arch_defaults | arch_kwargs))
        return _with_head(
            model,
            stem=stem,
            head=head,
            in_chans=in_chans,
            num_classes=num_classes,
            dropout=dropout,
            hidden=hidden,
        )

    build.__doc__ = f"Registry builder for `model={name}` (torchvision {name}, weights=None)."


# name, first conv, classifier, default dropout before the classifier, torchvision builder defaults.
_register_simple("resnet50", "conv1", "fc", 0.0, zero_init_residual=False)
_register_simple("resnet152", "conv1", "fc", 0.0, zero_init_residual=False)
_register_simple("densenet121", "features.conv0", "classifier", 0.0, drop_rate=0.0, memory_efficient=False)
_register_simple("densenet201", "features.conv0", "classifier", 0.0, drop_rate=0.0, memory_efficient=False)
# torchvision's own dropout before the classifier: 0.2 / 0.3 / 0.4.
_register_simple("efficientnet_v2_s", "features.0.0", "classifier", 0.2, stochastic_depth_prob=0.2)
_register_simple("efficientnet_v2_m", "features.0.0", "classifier", 0.3, stochastic_depth_prob=0.2)
_register_simple("efficientnet_v2_l", "features.0.0", "classifier", 0.4, stochastic_depth_prob=0.2)


class VGG16(nn.Module):
    """torchvision's VGG16 (same module names: features, avgpool, classifier, and its initialisation),
    built here so that a small head (avgpool_size=1) never allocates torchvision's 25088x4096 fc1."""

    zoo_parts = ModelParts(
        stem=("features.0",),
        head=("classifier",),
        fc1=("classifier.0",),
        new=("classifier.6",),
        last="classifier.6",
    )

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        dropout: float,
        hidden: int,
        avgpool_size: int,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        self.features = vgg_layers(vgg_cfgs["D"], batch_norm=batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(avgpool_size)
        self.classifier = nn.Sequential(
            nn.Linear(512 * avgpool_size**2, hidden),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        adapt_first_conv(self, "features.0", in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model("vgg16")
def vgg16(
    num_classes: int,
    in_chans: int,
    image_size: int,
    dropout: float = 0.5,
    hidden: int = 4096,
    avgpool_size: int = 7,
    batch_norm: bool = False,
) -> VGG16:
    """VGG16 (vgg16_bn's layout with batch_norm=true): its 3-FC classifier, fc1 = classifier.0.

    hidden and avgpool_size other than torchvision's 4096 and 7 resize the first two FCs (ImageNet weights
    then no longer fit them); avgpool_size=1 cuts fc1 from 25088x4096 to 512x4096 inputs for small images."""
    check_image_size("vgg16", image_size, MIN_IMAGE_SIZE, _WHY)
    if hidden < 1 or avgpool_size < 1:
        raise ValueError(f"model.hidden={hidden} and model.avgpool_size={avgpool_size} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    return VGG16(num_classes, in_chans, float(dropout), int(hidden), int(avgpool_size), bool(batch_norm))


# Builder arguments some torchvision families need to build without weights at any image size.
def _arch_defaults(arch: str, image_size: int) -> dict[str, Any]:
    if arch in ("inception_v3", "googlenet"):
        return {"aux_logits": False, "init_weights": True}
    if arch.startswith("vit_"):
        return {"image_size": image_size}
    if arch.startswith("maxvit"):
        return {"input_size": (image_size, image_size)}
    return {}


def classification_models() -> list[str]:
    """torchvision's classification architectures (what `model.arch` accepts)."""
    return torchvision.models.list_models(module=torchvision.models)


def _last_layer(model: nn.Module) -> str:
    """The final Linear (or, e.g. SqueezeNet, the final Conv2d) producing the logits."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


@register_model("torchvision")
def torchvision_model(
    num_classes: int,
    in_chans: int,
    image_size: int,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Any torchvision classification model by name (`model.arch`), built for num_classes with weights=None.

    Its first Conv2d is adapted to `in_chans`; its final layer is the head (freeze=features trains only it;
    features_fc1 is not defined). The image size is checked with one forward pass at build time."""
    valid = classification_models()
    if arch not in valid:
        raise ValueError(
            f"model.arch={arch!r} is not a torchvision classification model; valid: {', '.join(valid)}"
        )
    try:
        model = _torchvision(
            arch, num_classes=num_classes, **(_arch_defaults(arch, image_size) | dict(kwargs or {}))
        )
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(
            f"model.arch={arch}: torchvision cannot build it with model.kwargs={kwargs} ({err})"
        ) from err
    stem = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    adapt_first_conv(model, stem, in_chans)
    last = _last_layer(model)
    model.zoo_parts = ModelParts(stem=(stem,), head=(last,), fc1=(), new=(last,), last=last)
    _check_forward(model, arch, in_chans, image_size)
    return model


def _check_forward(model: nn.Module, arch: str, in_chans: int, image_size: int) -> None:
    """One tiny forward pass (eval mode, no grad) so a too-small image is a clear error at build time."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ValueError(
            f"data.image_size={image_size} does not fit torchvision model {arch!r} (a test forward pass "
            f"failed: {err}); use a larger image"
        ) from err
    finally:
        model.train(was_training)
