"""Image transforms from the `augment` group and the `data` keys.

The cache holds (image_size + crop_margin)-pixel images. Training runs the `augment.train` steps and, when
the cache keeps a margin, ends with a centre crop to `data.image_size` (a no-op after the pipeline's own
RandomCrop); evaluation only centre-crops, so it is deterministic. `data.normalize` is applied to the
float tensors of both paths alike by the datamodule (see `resolve_normalize`).
"""

from __future__ import annotations

import difflib
import importlib
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

# The ImageNet statistics on the 0..1 scale; greyscale images use the mean of the three channels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_CHOICES = ("none", "imagenet", "dataset")
NORMALIZE_VALID = "none, imagenet, dataset or {mean: [...], std: [...]} (0..1 scale, 1 or C values each)"
# Rows the `dataset` statistics are estimated from (evenly spaced over the train split).
DATASET_STATS_ROWS = 4096


@dataclass
class Transforms:
    """What the datamodule needs from `augment` + `data`: per-path transforms and the normalisation spec.

    `train` and `eval` map a uint8 (H, W, C) image (`t(image=x)["image"]`) to a (image_size, image_size, C)
    uint8 image; either is None when it would do nothing. `normalize` is `data.normalize`, resolved against
    the train split by the datamodule (`resolve_normalize`).
    """

    train: Callable[..., dict] | None
    eval: Callable[..., dict] | None
    normalize: Any = "none"


def seed_transform(transform: Any, seed: int | None) -> None:
    """Seed an albumentations pipeline: one shared numpy + python stream for all its steps.

    Not `Compose(seed=...)`/`set_random_seed`: in albumentations 2.0.8 they give every step its own
    generator with the same seed, so the steps draw identical numbers (all p=0.5 steps fire together).
    Does nothing for transforms without random state (plain callables, None)."""
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def cache_size(data: Mapping | DictConfig) -> int:
    """Side of the cached images: data.image_size + data.crop_margin (validated)."""
    image_size, margin = data.get("image_size"), data.get("crop_margin") or 0
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"data.image_size={image_size!r} must be a positive whole number of pixels")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(
            f"data.crop_margin={margin!r} must be a whole number of pixels >= 0 (0: no crop; e.g. 8 at 64 px)"
        )
    return image_size + margin


def scaled_gaussian_blur(
    sigma_limit: float | tuple[float, float],
    image_size: int,
    blur_limit: tuple[int, int] = (3, 7),
    reference_size: int = 224,
    p: float = 0.5,
):
    """A.GaussianBlur whose sigma and kernel sizes, given for `reference_size` px, scale to `image_size` px.

    At reference size it is the dissertation's albumentations-1 GaussianBlur (kernel 3..7, sigma 0..limit);
    smaller images get proportionally smaller sigma and kernels (odd, at least 3).
    """
    import albumentations as A

    scale = image_size / reference_size
    low, high = (0.0, sigma_limit) if isinstance(sigma_limit, int | float) else sigma_limit
    kernels = tuple(max(3, int(round(k * scale)) // 2 * 2 + 1) for k in blur_limit)
    return A.GaussianBlur(blur_limit=kernels, sigma_limit=(low * scale, max(low * scale, high * scale)), p=p)


def _data_node(augment: DictConfig, data: Mapping | DictConfig | None) -> Mapping | DictConfig | None:
    """`data` as given, else the `data` node of the composed config `augment` belongs to (train.py's call)."""
    if data is not None or not isinstance(augment, DictConfig):
        return data
    return OmegaConf.select(augment, "..data", default=None)


def _unknown_target(key: str, target: Any) -> ValueError:
    import albumentations as A

    names = sorted(n for n in dir(A) if n[:1].isupper())
    close = difflib.get_close_matches(str(target).rsplit(".", 1)[-1], names, n=3)
    hint = f"; did you mean {', '.join('albumentations.' + n for n in close)}?" if close else ""
    return ValueError(
        f"{key}._target_={target!r} is not a known transform; valid: a transform class of albumentations "
        f"(albumentations.<Name>, e.g. Affine, RandomCrop, GaussianBlur) or "
        f"agecls.data.augment.scaled_gaussian_blur{hint}"
    )


def _locate(target: str) -> Any:
    """The object a dotted `_target_` names (quietly; hydra's own lookup logs an error on failure)."""
    module, _, name = str(target).rpartition(".")
    if not module or not name:
        raise ImportError(target)
    return getattr(importlib.import_module(module), name)


def _walk(transform: Any) -> Iterator[Any]:
    """A transform and every transform nested in it (OneOf, SomeOf, Sequential ...)."""
    yield transform
    for child in getattr(transform, "transforms", None) or []:
        yield from _walk(child)


def _build_steps(augment: DictConfig, side: int | None, where: str) -> list[Any]:
    import albumentations as A

    steps = augment.get("train") or []
    if not isinstance(steps, list | ListConfig):
        raise ValueError(
            f"augment.train must be a list of transform blocks (`- _target_: ...`), got {steps!r}"
        )
    built = []
    for i, step in enumerate(steps):
        key = f"augment.train[{i}]"
        if not isinstance(step, Mapping | DictConfig) or "_target_" not in step:
            raise ValueError(
                f"{key} must be a mapping with a `_target_` (an albumentations transform), got {step!r}"
            )
        try:
            _locate(step["_target_"])
        except (ImportError, AttributeError):
            raise _unknown_target(key, step["_target_"]) from None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                transform = instantiate(step, _convert_="all")
            except Exception as exc:
                raise ValueError(f"{key} ({step['_target_']}): {exc}") from exc
        for w in caught:  # albumentations only warns about arguments it does not know
            if "not valid for transform" in str(w.message):
                raise ValueError(f"{key} ({step['_target_']}): {w.message}")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not isinstance(transform, A.BasicTransform | A.BaseCompose):
            raise ValueError(f"{key}._target_={step['_target_']!r} did not build an albumentations transform")
        for t in _walk(transform) if side is not None else ():
            h, w = getattr(t, "height", None), getattr(t, "width", None)
            if "Crop" in type(t).__name__ and isinstance(h, int) and isinstance(w, int) and max(h, w) > side:
                raise ValueError(
                    f"{key} ({type(t).__name__}) crops {h}x{w} but the cache holds {side}x{side} images "
                    f"({where}); valid: height and width <= {side}, e.g. ${{data.image_size}}, "
                    f"or raise data.crop_margin"
                )
        built.append(transform)
    return built


def build_augment(
    augment: DictConfig, data: Mapping | DictConfig | None = None, *, seed: int | None = None
) -> Transforms:
    """Train and eval transforms for `augment` (the group's node) and `data` (the data group's node).

    `data` defaults to the composed config's `data` node (so `build_augment(cfg.augment)` works); without
    one, the train steps are built as they are and nothing is cropped. The train pipeline is seeded with
    `seed` (`seed_transform`; the datamodule re-seeds it with the run's seed, and per DataLoader worker).
    Raises ValueError naming the offending key for an unknown transform, a bad argument, a crop larger
    than the cached image, or a pipeline whose output is not data.image_size square.
    """
    import albumentations as A

    data = _data_node(augment, data)
    if data is None:
        steps = _build_steps(augment, None, "")
        train = A.Compose(steps) if steps else None
        seed_transform(train, seed)
        return Transforms(train=train, eval=None)
    side = cache_size(data)
    size = int(data.image_size)
    where = f"data.image_size={size} + data.crop_margin={side - size}"
    steps = _build_steps(augment, side, where)
    normalize = data.get("normalize", "none")
    check_normalize_spec(normalize)
    out = side
    if steps:  # one probe image through the steps: their output must still cover data.image_size
        channels = 1 if data.get("grayscale", True) else 3
        probe = A.Compose(steps)(image=np.zeros((side, side, channels), dtype=np.uint8))["image"]
        if min(probe.shape[:2]) < size:
            raise ValueError(
                f"augment.train turns {side}x{side} cached images ({where}) into "
                f"{probe.shape[1]}x{probe.shape[0]}; the model expects data.image_size={size}"
            )
        out = max(probe.shape[:2])
    centre = [A.CenterCrop(height=size, width=size)] if out > size else []
    train = A.Compose([*steps, *centre]) if steps or centre else None
    seed_transform(train, seed)
    eval_ = A.Compose([A.CenterCrop(height=size, width=size)]) if side > size else None
    return Transforms(train=train, eval=eval_, normalize=normalize)


def _explicit_mean_std(spec: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) of a `{mean: [...], std: [...]}` spec with as many positive stds as means; else None."""
    if not isinstance(spec, Mapping | DictConfig) or set(spec) != {"mean", "std"}:
        return None
    try:
        mean, std = (
            np.atleast_1d(np.asarray(OmegaConf.to_object(v) if isinstance(v, ListConfig) else v, float))
            for v in (spec["mean"], spec["std"])
        )
    except (TypeError, ValueError):
        return None
    if mean.ndim != 1 or mean.shape != std.shape or len(mean) == 0 or not (std > 0).all():
        return None
    return mean, std


def check_normalize_spec(spec: Any) -> None:
    """Raise ValueError naming data.normalize unless `spec` is one of the valid forms."""
    if spec is None or (isinstance(spec, str) and spec in NORMALIZE_CHOICES):
        return
    if _explicit_mean_std(spec) is None:
        raise ValueError(f"data.normalize={spec!r}; valid: {NORMALIZE_VALID}")


def resolve_normalize(
    spec: Any, images: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) per channel on the 0..1 scale for `data.normalize`, or None for `none`.

    `dataset` estimates them from the cached pixels of `rows` (the train split; at most
    DATASET_STATS_ROWS rows, evenly spaced), so train and eval share one pair.
    """
    check_normalize_spec(spec)
    channels = images.shape[-1]
    if spec is None or spec == "none":
        return None
    if spec == "imagenet":
        mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
        if channels == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    elif spec == "dataset":
        if len(rows) == 0:
            raise ValueError("data.normalize=dataset needs train rows to estimate mean and std from")
        pick = np.unique(rows[np.linspace(0, len(rows) - 1, min(len(rows), DATASET_STATS_ROWS)).astype(int)])
        total, squares, count = np.zeros(channels), np.zeros(channels), 0
        for start in range(0, len(pick), 256):
            chunk = np.asarray(images[pick[start : start + 256]], dtype=np.float64) / 255.0
            total += chunk.sum(axis=(0, 1, 2))
            squares += np.square(chunk).sum(axis=(0, 1, 2))
            count += chunk.shape[0] * chunk.shape[1] * chunk.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)  # a constant channel: centre it, do not blow it up
    else:
        mean, std = _explicit_mean_std(spec)
        if len(mean) not in (1, channels):
            raise ValueError(
                f"data.normalize has {len(mean)} mean/std values for {channels}-channel images; "
                f"valid: 1 or {channels}"
            )
        mean, std = np.broadcast_to(mean, channels), np.broadcast_to(std, channels)
    return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
