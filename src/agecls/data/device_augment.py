"""Per-sample augmentation of whole batches on the accelerator (`data.pipeline=device`).

The `augment.train` steps are written once, as albumentations transforms; with `data.pipeline=loader`
albumentations runs them per image in the DataLoader workers (the reference path). With
`data.pipeline=device` the same built transforms are translated here into batched torch operations on the
device's float (B, C, H, W) batch in 0..1, each drawing its random parameters **per sample** (whether it
fires, angles, offsets, kernels ...), from one seeded torch.Generator on the device. (torchvision v2
transforms called on a batched tensor draw one parameter set for the whole batch, so they do not do this.)

Each translated step samples from the same distribution as its albumentations original, with the same
geometry conventions (albumentations' affine matrix and pixel-centre origin, reflect-101 borders), so a
configuration means the same thing on both paths; outputs differ only by interpolation and uint8 rounding
(albumentations works on uint8, this path on floats). tests/test_device_pipeline.py checks each step
against albumentations with fixed parameters, and the per-sample draws against their probabilities.

Supported: Affine, RandomCrop, CenterCrop, HorizontalFlip, GaussianBlur (and
agecls.data.augment.scaled_gaussian_blur, which builds one), RandomBrightnessContrast, RandomGamma,
GaussNoise, CoarseDropout, and OneOf over these. Anything else raises a ValueError naming its
`augment.train[i]` key; use `data.pipeline=loader` for such pipelines.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED = (
    "Affine",
    "RandomCrop",
    "CenterCrop",
    "HorizontalFlip",
    "GaussianBlur",
    "RandomBrightnessContrast",
    "RandomGamma",
    "GaussNoise",
    "CoarseDropout",
    "OneOf",
)
# cv2 border modes the affine step can reproduce: constant (fill), replicate, reflect-101.
_BORDERS = {0: "zeros", 1: "border", 4: "reflection"}


def _uniform(low: float, high: float, n: int, g: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _fires(p: float, active: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Which of the `active` samples this step acts on: each with probability p, independently."""
    if p >= 1.0:
        return active
    return active & (torch.rand(active.shape[0], generator=g, device=active.device) < p)


def _blend(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), new, old)


def _no_sync(x: torch.Tensor) -> bool:
    """On CUDA, steps never read a value back to the host (`mask.any()`, `nonzero()` wait for the GPU and
    stall the queue of kernels): they compute every sample and blend by the mask instead. On the CPU, they
    skip work for the samples a step does not act on."""
    return x.is_cuda


def _matrix(rows: list[list[float]], device) -> torch.Tensor:
    """A small constant matrix on `device`, built once by fills (a host-to-device copy would synchronise)."""
    return _cached_matrix(tuple(tuple(float(v) for v in row) for row in rows), str(device))


@functools.lru_cache(maxsize=256)
def _cached_matrix(rows: tuple[tuple[float, ...], ...], device: str) -> torch.Tensor:
    out = torch.empty(len(rows), len(rows[0]), device=device)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            out[i, j] = value
    return out


@dataclass
class Step:
    """One translated transform: acts on the samples of `active` that its own probability `p` picks
    (inside OneOf the chosen child always acts, as in albumentations)."""

    p: float = 1.0
    name: str = ""

    def __call__(self, x: torch.Tensor, active: torch.Tensor, g: torch.Generator, forced: bool = False):
        mask = active if forced else _fires(self.p, active, g)
        if not _no_sync(x) and not bool(mask.any()):
            return x
        return self.apply(x, mask, g)

    def apply(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Affine(Step):
    """albumentations.Affine: scale, rotate, shear, translate about the image centre, bilinear, borders
    as `border_mode` (constant `fill`, replicate or reflect-101)."""

    scale: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 1.0), (1.0, 1.0))
    keep_ratio: bool = False
    rotate: tuple[float, float] = (0.0, 0.0)
    shear: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    translate: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    translate_px: bool = False  # `translate` in whole pixels (else fractions of the side)
    padding: str = "reflection"
    fill: float = 0.0

    def matrices(self, n: int, g: torch.Generator, device, height: int, width: int) -> torch.Tensor:
        """(n, 3, 3) forward pixel-space matrices, drawn per sample (albumentations' composition:
        centre <- translate <- shear <- rotate <- scale <- to the centre; centre = (W/2 - 0.5, H/2 - 0.5))."""
        sx = _uniform(*self.scale[0], n, g, device)
        sy = sx if self.keep_ratio else _uniform(*self.scale[1], n, g, device)
        angle = torch.deg2rad(_uniform(*self.rotate, n, g, device))
        hx = torch.tan(torch.deg2rad(-_uniform(*self.shear[0], n, g, device)))  # albumentations negates
        hy = torch.tan(torch.deg2rad(-_uniform(*self.shear[1], n, g, device)))
        if self.translate_px:  # whole pixels, both ends included
            (x0, x1), (y0, y1) = self.translate
            tx = (_uniform(x0, x1 + 1, n, g, device).floor()).clamp(max=x1)
            ty = (_uniform(y0, y1 + 1, n, g, device).floor()).clamp(max=y1)
        else:  # a fraction of the side, truncated to whole pixels
            tx = (_uniform(*self.translate[0], n, g, device) * width).trunc()
            ty = (_uniform(*self.translate[1], n, g, device) * height).trunc()
        cos, sin, one, zero = (
            torch.cos(angle),
            torch.sin(angle),
            torch.ones_like(angle),
            torch.zeros_like(angle),
        )
        scale = torch.stack([sx, zero, zero, zero, sy, zero, zero, zero, one], 1).view(n, 3, 3)
        rotate = torch.stack([cos, sin, zero, -sin, cos, zero, zero, zero, one], 1).view(n, 3, 3)
        shear = torch.stack([one, hx, zero, hy, one, zero, zero, zero, one], 1).view(n, 3, 3)
        cx, cy = width / 2 - 0.5, height / 2 - 0.5
        to_centre = _matrix([[1, 0, cx], [0, 1, cy], [0, 0, 1]], device)
        to_origin = _matrix([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], device)
        translate = torch.eye(3, device=device).repeat(n, 1, 1)
        translate[:, 0, 2], translate[:, 1, 2] = tx, ty
        return to_centre @ translate @ shear @ rotate @ scale @ to_origin

    def apply(self, x, mask, g):
        whole = _no_sync(x)  # every sample, blended by the mask below (no read-back on a GPU)
        idx = None if whole else mask.nonzero().squeeze(1)
        sub = x if whole else x[idx]
        n, _, height, width = sub.shape
        forward = self.matrices(n, g, x.device, height, width)
        # grid_sample wants, per output pixel, where to read in the input: the inverse map, in
        # align_corners=True coordinates (-1 and 1 at the centres of the edge pixels, as cv2 indexes pixels;
        # reflection about those centres is reflect-101).
        to_norm = _matrix(
            [[2 / max(width - 1, 1), 0, -1], [0, 2 / max(height - 1, 1), -1], [0, 0, 1]], x.device
        )
        theta = (to_norm @ torch.linalg.inv(forward) @ torch.linalg.inv(to_norm))[:, :2]
        grid = F.affine_grid(theta, list(sub.shape), align_corners=True)
        out = F.grid_sample(sub, grid, mode="bilinear", padding_mode=self.padding, align_corners=True)
        if self.padding == "zeros" and self.fill:
            inside = F.grid_sample(
                torch.ones_like(sub[:, :1]), grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )
            out = out + (1 - inside) * self.fill
        if whole:
            return _blend(out.to(x.dtype), x, mask)
        x = x.clone()
        x[idx] = out.to(x.dtype)
        return x


@dataclass
class HorizontalFlip(Step):
    def apply(self, x, mask, g):
        return _blend(x.flip(-1), x, mask)


@dataclass
class GaussianBlur(Step):
    """albumentations.GaussianBlur: kernel size an integer drawn from `blur_limit` (an even draw becomes
    the next odd size), sigma from `sigma_limit`; separable, reflect-101 borders."""

    blur_limit: tuple[int, int] = (3, 7)
    sigma_limit: tuple[float, float] = (0.0, 0.0)

    def apply(self, x, mask, g):
        n, channels, height, width = x.shape
        low, high = self.blur_limit
        ksize = low + (torch.rand(n, generator=g, device=x.device) * (high - low + 1)).floor().clamp(
            max=high - low
        )
        ksize = ksize + (ksize % 2 == 0).float()  # odd sizes only
        sigma = _uniform(*self.sigma_limit, n, g, device=x.device).clamp(min=1e-3)
        kmax = int(high + (1 - high % 2))
        half = kmax // 2
        offsets = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
        kernel = kernel * (offsets[None].abs() <= (ksize[:, None] - 1) / 2)  # zero outside each sample's size
        kernel = kernel / kernel.sum(1, keepdim=True)
        weight = kernel.repeat_interleave(channels, 0)  # (n * C, kmax): one kernel per sample and channel
        pad = min(half, height - 1, width - 1)
        flat = x.reshape(1, n * channels, height, width)
        if pad < half:  # images smaller than the kernel: trim it (reflect padding needs pad < side)
            weight = weight[:, half - pad : half + pad + 1]
            weight = weight / weight.sum(1, keepdim=True)
        flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
        flat = F.conv2d(flat, weight.view(n * channels, 1, 1, -1), groups=n * channels)
        flat = F.conv2d(flat, weight.view(n * channels, 1, -1, 1), groups=n * channels)
        return _blend(flat.view(n, channels, height, width), x, mask)


@dataclass
class BrightnessContrast(Step):
    """albumentations.RandomBrightnessContrast: x * (1 + contrast) + brightness (times the value range,
    or times the image's mean when brightness_by_max=False), clipped to 0..1."""

    brightness: tuple[float, float] = (-0.2, 0.2)
    contrast: tuple[float, float] = (-0.2, 0.2)
    by_max: bool = True

    def apply(self, x, mask, g):
        n = x.shape[0]
        alpha = (1 + _uniform(*self.contrast, n, g, x.device)).view(-1, 1, 1, 1)
        beta = _uniform(*self.brightness, n, g, x.device).view(-1, 1, 1, 1)
        if not self.by_max:
            beta = beta * x.mean(dim=(1, 2, 3), keepdim=True)
        return _blend((x * alpha + beta).clamp(0, 1), x, mask)


@dataclass
class Gamma(Step):
    """albumentations.RandomGamma: x ** (gamma / 100), gamma drawn from `gamma_limit`."""

    gamma_limit: tuple[float, float] = (80.0, 120.0)

    def apply(self, x, mask, g):
        gamma = (_uniform(*self.gamma_limit, x.shape[0], g, x.device) / 100).view(-1, 1, 1, 1)
        return _blend(x.clamp(min=0).pow(gamma), x, mask)


@dataclass
class GaussNoise(Step):
    """albumentations.GaussNoise: additive normal noise, its std (and mean) drawn per sample as fractions of
    the value range; one noise image per channel (per_channel) or shared by the channels."""

    std_range: tuple[float, float] = (0.2, 0.44)
    mean_range: tuple[float, float] = (0.0, 0.0)
    per_channel: bool = True

    def apply(self, x, mask, g):
        n, channels, height, width = x.shape
        std = _uniform(*self.std_range, n, g, x.device).view(-1, 1, 1, 1)
        mean = _uniform(*self.mean_range, n, g, x.device).view(-1, 1, 1, 1)
        shape = (n, channels if self.per_channel else 1, height, width)
        noise = torch.randn(shape, generator=g, device=x.device) * std + mean
        return _blend((x + noise).clamp(0, 1), x, mask)


@dataclass
class CoarseDropout(Step):
    """albumentations.CoarseDropout: a number of holes drawn from `holes`, each of a height and width drawn
    from `height`/`width` (fractions of the side when floats, pixels when ints), filled with `fill`
    (on the 0..255 scale)."""

    holes: tuple[int, int] = (1, 1)
    height: tuple[float, float] = (0.1, 0.1)
    width: tuple[float, float] = (0.1, 0.1)
    fill: float = 0.0

    def _sizes(self, limits, side: int, shape, g, device) -> torch.Tensor:
        low, high = limits
        if isinstance(low, int) and isinstance(high, int):
            return (low + (torch.rand(shape, generator=g, device=device) * (high - low + 1)).floor()).clamp(
                1, side
            )
        size = (low + (high - low) * torch.rand(shape, generator=g, device=device)) * side
        return size.floor().clamp(1, side)

    def apply(self, x, mask, g):
        n, _, height, width = x.shape
        most = int(self.holes[1])
        count = (
            self.holes[0] + (torch.rand(n, generator=g, device=x.device) * (most - self.holes[0] + 1)).floor()
        )
        hh = self._sizes(self.height, height, (n, most), g, x.device)
        ww = self._sizes(self.width, width, (n, most), g, x.device)
        y0 = (torch.rand((n, most), generator=g, device=x.device) * (height - hh + 1)).floor()
        x0 = (torch.rand((n, most), generator=g, device=x.device) * (width - ww + 1)).floor()
        used = torch.arange(most, device=x.device)[None] < count[:, None]
        rows = torch.arange(height, device=x.device).view(1, 1, -1, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, 1, -1)
        inside = (rows >= y0[..., None, None]) & (rows < (y0 + hh)[..., None, None])
        inside = inside & (cols >= x0[..., None, None]) & (cols < (x0 + ww)[..., None, None])
        holes = (inside & used[..., None, None]).any(1, keepdim=True)  # (n, 1, H, W)
        holes = holes & mask.view(-1, 1, 1, 1)
        return torch.where(holes, torch.full_like(x, self.fill / 255.0), x)


@dataclass
class OneOf(Step):
    """albumentations.OneOf: with probability p, one child per sample, chosen with weights ∝ the children's
    own p; the chosen child always acts."""

    children: list[Step] = field(default_factory=list)
    weights: tuple[float, ...] = ()

    def apply(self, x, mask, g):
        # child i when u falls in its share of [0, 1) (cumulative weights as Python floats: nothing to copy)
        u = torch.rand(x.shape[0], generator=g, device=x.device)
        total, edge = sum(self.weights), 0.0
        for i, child in enumerate(self.children):
            low, edge = edge, edge + self.weights[i] / total
            last = i == len(self.children) - 1
            picked = mask & (u >= low) & ((u < edge) if not last else torch.ones_like(mask))
            x = child(x, picked, g, forced=True)
        return x


@dataclass
class Crop:
    """RandomCrop (an offset per sample) or CenterCrop to height x width; applies to every sample."""

    height: int
    width: int
    random: bool

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, height, width = x.shape
        if (height, width) == (self.height, self.width):
            return x
        if not self.random:
            top, left = (height - self.height) // 2, (width - self.width) // 2
            return x[:, :, top : top + self.height, left : left + self.width]
        top = (torch.rand(n, generator=g, device=x.device) * (height - self.height + 1)).floor().long()
        left = (torch.rand(n, generator=g, device=x.device) * (width - self.width + 1)).floor().long()
        rows = (top[:, None] + torch.arange(self.height, device=x.device)[None])[:, :, None]
        cols = (left[:, None] + torch.arange(self.width, device=x.device)[None])[:, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None]
        return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class DeviceAugment:
    """The translated `augment.train` pipeline: call it on a float (B, C, H, W) batch in 0..1 with a
    torch.Generator on the batch's device; returns the augmented batch (same dtype and device)."""

    def __init__(self, steps: Sequence[Step | Crop]) -> None:
        self.steps = list(steps)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        everyone = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for step in self.steps:
            x = step(x, g) if isinstance(step, Crop) else step(x, everyone, g)
        return x

    def __len__(self) -> int:
        return len(self.steps)


def _pair(value: Any) -> tuple[float, float]:
    low, high = value
    return float(low), float(high)


def _axes(value: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    return _pair(value["x"]), _pair(value["y"])


def _unsupported(key: str, what: str) -> ValueError:
    return ValueError(
        f"{key}: {what} has no device version; valid with data.pipeline=device: albumentations."
        f"{', albumentations.'.join(SUPPORTED)} (and agecls.data.augment.scaled_gaussian_blur); "
        f"or set data.pipeline=loader to run this pipeline with albumentations"
    )


def _translate(t: Any, key: str, top_level: bool) -> Step | Crop:
    import albumentations as A

    name = type(t).__name__
    if isinstance(t, A.Affine):
        if t.fit_output or t.interpolation != 1 or t.border_mode not in _BORDERS:
            raise _unsupported(
                key,
                f"albumentations.Affine with fit_output={t.fit_output}, interpolation={t.interpolation}, "
                f"border_mode={t.border_mode} (device version: fit_output=false, interpolation=1 (linear), "
                f"border_mode 0, 1 or 4)",
            )
        fill = t.fill if isinstance(t.fill, int | float) else None
        if fill is None:
            raise _unsupported(
                key, f"albumentations.Affine with fill={t.fill!r} (device version: one number)"
            )
        return Affine(
            p=float(t.p),
            name=name,
            scale=_axes(t.scale),
            keep_ratio=bool(t.keep_ratio),
            rotate=_pair(t.rotate),
            shear=_axes(t.shear),
            translate=_axes(t.translate_px if t.translate_px is not None else t.translate_percent),
            translate_px=t.translate_px is not None,
            padding=_BORDERS[t.border_mode],
            fill=float(fill) / 255.0,
        )
    if isinstance(t, A.RandomCrop | A.CenterCrop):
        if not top_level or float(t.p) < 1.0 or t.pad_if_needed:
            raise _unsupported(key, f"albumentations.{name} inside OneOf, with p < 1 or with pad_if_needed")
        return Crop(int(t.height), int(t.width), random=isinstance(t, A.RandomCrop))
    if isinstance(t, A.HorizontalFlip):
        return HorizontalFlip(p=float(t.p), name=name)
    if isinstance(t, A.GaussianBlur):
        low, high = (int(v) for v in t.blur_limit)
        return GaussianBlur(p=float(t.p), name=name, blur_limit=(low, high), sigma_limit=_pair(t.sigma_limit))
    if isinstance(t, A.RandomBrightnessContrast):
        return BrightnessContrast(
            p=float(t.p),
            name=name,
            brightness=_pair(t.brightness_limit),
            contrast=_pair(t.contrast_limit),
            by_max=bool(t.brightness_by_max),
        )
    if isinstance(t, A.RandomGamma):
        return Gamma(p=float(t.p), name=name, gamma_limit=_pair(t.gamma_limit))
    if isinstance(t, A.GaussNoise):
        return GaussNoise(
            p=float(t.p),
            name=name,
            std_range=_pair(t.std_range),
            mean_range=_pair(t.mean_range),
            per_channel=bool(t.per_channel),
        )
    if isinstance(t, A.CoarseDropout):
        if not isinstance(t.fill, int | float):
            raise _unsupported(
                key, f"albumentations.CoarseDropout with fill={t.fill!r} (device version: a number)"
            )
        return CoarseDropout(
            p=float(t.p),
            name=name,
            holes=(int(t.num_holes_range[0]), int(t.num_holes_range[1])),
            height=tuple(t.hole_height_range),
            width=tuple(t.hole_width_range),
            fill=float(t.fill),
        )
    if type(t) is A.OneOf:
        children = [_translate(c, f"{key}.transforms[{i}]", False) for i, c in enumerate(t.transforms)]
        return OneOf(
            p=float(t.p), name=name, children=children, weights=tuple(float(c.p) for c in t.transforms)
        )
    raise _unsupported(key, f"albumentations.{name}")


def translate_pipeline(compose: Any) -> DeviceAugment | None:
    """The DeviceAugment of a built train pipeline (`Transforms.train` of agecls.data.augment.build_augment:
    an albumentations Compose of the `augment.train` steps plus the closing centre crop), or None for none.
    Raises ValueError naming `augment.train[i]` for a step that has no device version."""
    if compose is None:
        return None
    steps = list(getattr(compose, "transforms", [compose]))
    return DeviceAugment([_translate(t, f"augment.train[{i}]", True) for i, t in enumerate(steps)])
