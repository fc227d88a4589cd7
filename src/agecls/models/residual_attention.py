"""Residual Attention Network (Wang et al. 2017, "Residual Attention Network for Image Classification").

Pre-activation bottleneck residual units; in each of 3 stages, attention modules whose output is
(1 + M(x)) * T(x): T is the trunk branch (2 residual units), M the soft-mask branch, an hourglass (max-pool
down, residual units, bilinear up-sampling, with a skip connection at every level) ending in
BN-ReLU-1x1 conv twice and a sigmoid. Each module has one residual unit before and after it (p=1, t=2, r=1).
Stage i's mask goes down 3, 2, 1 times, so every mask bottoms out at the last stage's resolution, as in the
paper's 224 px network (56 -> 7, 28 -> 7, 14 -> 7).

depth=56: one attention module per stage; depth=92: 1, 2, 3. Channels after the stages are 4, 8, 16, 32 x
`width` (the paper's width 64: 256 ... 2048).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agecls.models.parts import check_image_size, head_parts, make_head
from agecls.models.registry import register_model

MODULES_PER_STAGE = {56: (1, 1, 1), 92: (1, 2, 3)}
STEMS = ("auto", "imagenet", "small")
STEM_STRIDE = {"imagenet": 4, "small": 1}


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1, plus a projection shortcut
    (1x1 conv on the pre-activated input) when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        mid = max(out_ch // 4, 1)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualUnit(channels, channels) for _ in range(n)))


class Hourglass(nn.Module):
    """One level of the soft-mask branch: max-pool, r units, [inner level + skip unit], r units, up-sample
    back to the input's size (bilinear; any input size works)."""

    def __init__(self, channels: int, depth: int, r: int = 1) -> None:
        super().__init__()
        self.down = _units(channels, r)
        self.skip = ResidualUnit(channels, channels) if depth > 1 else None
        self.inner = Hourglass(channels, depth - 1, r) if depth > 1 else None
        self.up = _units(channels, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(F.max_pool2d(x, kernel_size=3, stride=2, padding=1))
        if self.inner is not None:
            y = self.inner(y) + self.skip(y)
        y = self.up(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class AttentionModule(nn.Module):
    """p units -> [trunk T: t units | mask M: hourglass -> BN-ReLU-1x1 x2 -> sigmoid] -> (1+M)*T -> p units"""

    def __init__(self, channels: int, mask_depth: int, p: int = 1, t: int = 2, r: int = 1) -> None:
        super().__init__()
        self.pre = _units(channels, p)
        self.trunk = _units(channels, t)
        self.mask = Hourglass(channels, mask_depth, r)
        self.mask_out = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.post = _units(channels, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask_out(self.mask(x))
        return self.post((1 + mask) * trunk)


class ResidualAttentionNet(nn.Module):
    """stem -> 3 x [residual unit (stride 2 after the first) -> attention modules] -> 3 units at 32*width ->
    BN-ReLU-global average pool (`features`) -> `fc` (make_head: dropout -> linear, or fc1/fc2 if hidden)."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        stem: str,
        depth: int = 56,
        width: int = 64,
        dropout: float = 0.0,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        if stem == "imagenet":
            stem_layers = [
                nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        else:
            stem_layers = [
                nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(True),
            ]
        chans = [width, 4 * width, 8 * width, 16 * width, 32 * width]
        stages: list[nn.Module] = []
        for i, n_modules in enumerate(MODULES_PER_STAGE[depth]):
            unit = ResidualUnit(chans[i], chans[i + 1], stride=1 if i == 0 else 2)
            attention = (AttentionModule(chans[i + 1], mask_depth=3 - i) for _ in range(n_modules))
            stages.append(nn.Sequential(unit, *attention))
        stages.append(nn.Sequential(ResidualUnit(chans[3], chans[4], stride=2), _units(chans[4], 2)))
        self.features = nn.Sequential(
            nn.Sequential(*stem_layers),
            *stages,
            nn.Sequential(
                nn.BatchNorm2d(chans[4]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            ),
        )
        self.fc = make_head(chans[4], num_classes, dropout, hidden)
        self.zoo_parts = head_parts("fc", hidden, stem=("features.0.0",))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model("residual_attention")
def residual_attention(
    num_classes: int,
    in_chans: int,
    image_size: int,
    depth: int = 56,
    width: int = 64,
    stem: str = "auto",
    dropout: float = 0.0,
    hidden: int = 0,
) -> ResidualAttentionNet:
    """Registry builder for `model=residual_attention` (see the module docstring and the config file)."""
    if depth not in MODULES_PER_STAGE:
        raise ValueError(f"model.depth={depth}; valid: {', '.join(map(str, MODULES_PER_STAGE))}")
    if stem not in STEMS:
        raise ValueError(f"model.stem={stem!r}; valid: {', '.join(STEMS)}")
    if width < 1:
        raise ValueError(f"model.width={width} must be >= 1")
    if stem == "auto":
        stem = "small" if image_size < 64 else "imagenet"
    minimum = 8 * STEM_STRIDE[stem]
    check_image_size(
        "residual_attention",
        image_size,
        minimum,
        f"stem {stem} (stride {STEM_STRIDE[stem]}) then 3 stride-2 stages",
    )
    return ResidualAttentionNet(
        num_classes, in_chans, stem, int(depth), int(width), float(dropout), int(hidden)
    )
