"""Batch-level augmentation that `FaceClassifier` applies itself, configured in the `augment` group.

- `augment.mix` (training only): mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019). One lambda per batch
  from Beta(alpha, alpha) and one random pairing of the batch's faces; mixup blends whole images
  (`lam * x + (1 - lam) * x[perm]`), CutMix pastes a random box of the partner into each face and sets lam to
  the exact area kept. The loss is `lam * loss(own labels) + (1 - lam) * loss(partner's labels)`. Every
  draw uses torch's global CPU generator, so `seed` (Lightning's `seed_everything`) makes it reproducible
  on any device; with both alphas 0 (the default) nothing is drawn at all.
- `augment.tta` (evaluation only): `none`, or `flip`: each eval-mode prediction combines the face and its
  left-right mirror (a mirrored face keeps its age, gender and ethnicity); how the two outputs are combined
  is each head's `Head.average`. `auto` (agecls-train only): validation during the fit runs without it;
  after the fit the best checkpoint is scored on validation both ways and keeps the better mode (ties:
  `none`), written into the checkpoint so agecls-eval/predict/serve use it (`evaluation.splits.choose_tta`).

A missing `mix` block or `tta` key (older checkpoints and configs) means off; a bad value raises ValueError
naming `augment.mix.<key>` or `augment.tta` and what is valid.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob")
TTA_CHOICES = ("none", "flip")  # what a model applies; `auto` (chosen on validation) is a config value only
TTA_AUTO = "auto"


@dataclass(frozen=True)
class MixSpec:
    """A validated `augment.mix` block. `enabled` when either alpha is above 0."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(frozen=True)
class Mix:
    """One batch's mixing: face i was mixed with face `perm[i]`, keeping `lam` of its own image."""

    perm: torch.Tensor
    lam: float
    kind: str  # "mixup" or "cutmix"


def _number(key: str, value: Any, low: float, high: float | None, valid: str) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        raise ValueError(f"augment.mix.{key}={value!r}; valid: {valid}")
    return float(value)


def mix_spec(augment: Mapping | None) -> MixSpec:
    """The validated `augment.mix` block of an `augment` node (a missing node or block: mixing off)."""
    block = augment.get("mix") if augment is not None else None
    if block is None:
        return MixSpec()
    if not isinstance(block, Mapping):
        raise ValueError(f"augment.mix={block!r}; valid: a mapping with keys {', '.join(MIX_KEYS)}")
    for key in block:
        if key not in MIX_KEYS:
            close = difflib.get_close_matches(str(key), MIX_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"augment.mix.{key} is not a key{hint}; valid: {', '.join(MIX_KEYS)}")
    alpha = "a number >= 0 (the Beta(alpha, alpha) of lambda; 0 turns it off)"
    chance = "a probability between 0 and 1"
    defaults = MixSpec()
    return MixSpec(
        mixup_alpha=_number("mixup_alpha", block.get("mixup_alpha", 0.0), 0.0, None, alpha),
        cutmix_alpha=_number("cutmix_alpha", block.get("cutmix_alpha", 0.0), 0.0, None, alpha),
        prob=_number("prob", block.get("prob", defaults.prob), 0.0, 1.0, chance),
        switch_prob=_number("switch_prob", block.get("switch_prob", defaults.switch_prob), 0.0, 1.0, chance),
    )


def tta_mode(augment: Mapping | None, allow_auto: bool = False) -> str:
    """The validated `augment.tta` of an `augment` node: `none` (also when missing or null) or `flip`, and
    with `allow_auto` (a training config) also `auto`."""
    value = augment.get("tta") if augment is not None else None
    if value is None:
        return "none"
    valid = (*TTA_CHOICES, TTA_AUTO) if allow_auto else TTA_CHOICES
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"augment.tta={value!r}; valid: {', '.join(valid)}")
    return value


def _beta(alpha: float) -> float:
    """One draw of Beta(alpha, alpha) from torch's global CPU generator."""
    concentration = torch.tensor(alpha, dtype=torch.float64)
    return float(torch.distributions.Beta(concentration, concentration).sample())


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box with about `1 - lam` of the image's area, centred on a uniform
    random pixel and clipped to the image (so its area may be smaller; callers use the exact area)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return top, bottom, left, right


def mix_batch(x: torch.Tensor, spec: MixSpec) -> tuple[torch.Tensor, Mix | None]:
    """`x` (N, C, H, W) mixed as `spec` says, with the `Mix` to weigh the loss by; `(x, None)` when this
    batch is not mixed (mixing off, or the `prob` draw said no)."""
    if not spec.enabled:
        return x, None
    if float(torch.rand(())) >= spec.prob:
        return x, None
    if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
        kind = "cutmix" if float(torch.rand(())) < spec.switch_prob else "mixup"
    else:
        kind = "cutmix" if spec.cutmix_alpha > 0 else "mixup"
    lam = _beta(spec.cutmix_alpha if kind == "cutmix" else spec.mixup_alpha)
    perm = torch.randperm(x.shape[0]).to(x.device)
    if kind == "mixup":
        return lam * x + (1.0 - lam) * x[perm], Mix(perm, lam, kind)
    height, width = x.shape[-2:]
    top, bottom, left, right = cutmix_box(height, width, lam)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, Mix(perm, kept, kind)
