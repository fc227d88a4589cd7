"""InceptionResnetV1, the FaceNet architecture (Szegedy et al. 2017; Schroff et al. 2015), written here.

Module and parameter names follow facenet-pytorch's `InceptionResnetV1` (conv2d_1a ... repeat_1 ...
mixed_6a ... block8, last_linear, last_bn, logits), so a FaceNet state dict on local disk (e.g. the
CASIA-WebFace or VGGFace2 one) loads with `model.weights=PATH`: its `logits` (10575 / 8631 identities) are the
layer this model replaces, so they are skipped, and a greyscale model sums the first conv's RGB weights.

stem -> Block35 x5 (scale 0.17) -> Mixed_6a -> Block17 x10 (0.10) -> Mixed_7a -> Block8 x5 (0.20) ->
Block8 (no ReLU) -> global average pool -> dropout -> 512-d bottleneck (last_linear, no bias) ->
BatchNorm1d (last_bn) -> logits.
"""

from __future__ import annotations

import torch
from torch import nn

from agecls.models.parts import ModelParts, check_image_size
from agecls.models.registry import register_model


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (TensorFlow's eps 1e-3) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _chain(*specs: tuple) -> nn.Sequential:
    """BasicConv2d layers from (in, out, kernel, stride, padding) tuples."""
    return nn.Sequential(*(BasicConv2d(*spec) for spec in specs))


class _ResidualInception(nn.Module):
    """Parallel branches, concatenated, projected by a 1x1 conv (`conv2d`), scaled, added to the input."""

    def __init__(
        self, channels: int, branches: list[nn.Module], concat: int, scale: float, relu: bool
    ) -> None:
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)
        self.n_branches = len(branches)
        self.scale = scale
        self.conv2d = nn.Conv2d(concat, channels, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], dim=1)
        out = self.conv2d(out) * self.scale + x
        return self.relu(out) if self.relu is not None else out


class Block35(_ResidualInception):
    """35x35-grid block (on 160 px input: 17x17), 256 channels."""

    def __init__(self, scale: float = 1.0) -> None:
        branches = [
            BasicConv2d(256, 32, 1),
            _chain((256, 32, 1), (32, 32, 3, 1, 1)),
            _chain((256, 32, 1), (32, 32, 3, 1, 1), (32, 32, 3, 1, 1)),
        ]
        super().__init__(256, branches, 96, scale, relu=True)


class Block17(_ResidualInception):
    """17x17-grid block, 896 channels, factorised 1x7 / 7x1 convs."""

    def __init__(self, scale: float = 1.0) -> None:
        branches = [
            BasicConv2d(896, 128, 1),
            _chain((896, 128, 1), (128, 128, (1, 7), 1, (0, 3)), (128, 128, (7, 1), 1, (3, 0))),
        ]
        super().__init__(896, branches, 256, scale, relu=True)


class Block8(_ResidualInception):
    """8x8-grid block, 1792 channels, factorised 1x3 / 3x1 convs; the last one has no ReLU."""

    def __init__(self, scale: float = 1.0, relu: bool = True) -> None:
        branches = [
            BasicConv2d(1792, 192, 1),
            _chain((1792, 192, 1), (192, 192, (1, 3), 1, (0, 1)), (192, 192, (3, 1), 1, (1, 0))),
        ]
        super().__init__(1792, branches, 384, scale, relu=relu)


class _Reduction(nn.Module):
    """Stride-2 branches plus a max pool, concatenated (Mixed_6a: 256 -> 896; Mixed_7a: 896 -> 1792)."""

    def __init__(self, branches: list[nn.Module], pad: int) -> None:
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)
        self.add_module(f"branch{len(branches)}", nn.MaxPool2d(3, stride=2, padding=pad))
        self.n_branches = len(branches) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], dim=1)


def mixed_6a(pad: int) -> _Reduction:
    return _Reduction(
        [BasicConv2d(256, 384, 3, 2, pad), _chain((256, 192, 1), (192, 192, 3, 1, 1), (192, 256, 3, 2, pad))],
        pad,
    )


def mixed_7a(pad: int) -> _Reduction:
    return _Reduction(
        [
            _chain((896, 256, 1), (256, 384, 3, 2, pad)),
            _chain((896, 256, 1), (256, 256, 3, 2, pad)),
            _chain((896, 256, 1), (256, 256, 3, 1, 1), (256, 256, 3, 2, pad)),
        ],
        pad,
    )


class InceptionResnetV1(nn.Module):
    """FaceNet's InceptionResnetV1 with a `num_classes` classifier (`logits`) on its 512-d embedding.

    padded=False is the original (valid convs; at least 75 px, FaceNet used 160); padded=True pads the
    stem's and the reductions' valid 3x3 convs/pools by 1, so 32 px works. Padding has no parameters, so
    FaceNet weights load either way."""

    zoo_parts = ModelParts(
        stem=("conv2d_1a.conv",),
        head=("last_linear", "last_bn", "logits"),
        fc1=("last_linear", "last_bn"),
        new=("logits",),
        last="logits",
    )

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        dropout: float = 0.6,
        embedding: int = 512,
        padded: bool = False,
    ) -> None:
        super().__init__()
        p = 1 if padded else 0
        self.conv2d_1a = BasicConv2d(in_chans, 32, 3, 2, p)
        self.conv2d_2a = BasicConv2d(32, 32, 3, 1, p)
        self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2, padding=p)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3, 1, p)
        self.conv2d_4b = BasicConv2d(192, 256, 3, 2, p)
        self.repeat_1 = nn.Sequential(*(Block35(scale=0.17) for _ in range(5)))
        self.mixed_6a = mixed_6a(p)
        self.repeat_2 = nn.Sequential(*(Block17(scale=0.10) for _ in range(10)))
        self.mixed_7a = mixed_7a(p)
        self.repeat_3 = nn.Sequential(*(Block8(scale=0.20) for _ in range(5)))
        self.block8 = Block8(relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.last_linear = nn.Linear(1792, embedding, bias=False)
        self.last_bn = nn.BatchNorm1d(embedding, eps=0.001, momentum=0.1)
        self.logits = nn.Linear(embedding, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in (
            "conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
            "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "avgpool_1a", "dropout",
        ):  # fmt: skip
            x = getattr(self, name)(x)
        return self.logits(self.last_bn(self.last_linear(x.flatten(1))))


@register_model("inception_resnet_v1")
def inception_resnet_v1(
    num_classes: int,
    in_chans: int,
    image_size: int,
    dropout: float = 0.6,
    embedding: int = 512,
    padded: bool = False,
) -> InceptionResnetV1:
    """Registry builder for `model=inception_resnet_v1`."""
    if padded:
        check_image_size("inception_resnet_v1", image_size, 32, "total stride 32 with model.padded=true")
    else:
        check_image_size(
            "inception_resnet_v1",
            image_size,
            75,
            "valid convs shrink 75 px to a 1x1 map; model.padded=true allows 32",
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    return InceptionResnetV1(num_classes, in_chans, float(dropout), int(embedding), bool(padded))
