"""Training-time augmentation from the `augment` group: a list of albumentations transforms."""

from __future__ import annotations

from collections.abc import Callable

from hydra.utils import instantiate
from omegaconf import DictConfig


def build_augment(augment: DictConfig) -> Callable[..., dict] | None:
    """An albumentations Compose over `augment.train` (each item a `_target_` block), or None if empty."""
    steps = list(augment.get("train") or [])
    if not steps:
        return None
    import albumentations as A

    return A.Compose([instantiate(step, _convert_="all") for step in steps])
