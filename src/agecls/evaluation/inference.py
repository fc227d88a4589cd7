"""Inference from a checkpoint: the one loader and the one way a decoded face becomes the model's input.

    module = load_checkpoint(path, device)       # FaceClassifier, eval mode; EvalError naming the file
    pre = Preprocess.of(module)                  # its run's image size, crop margin, colour mode, input_stats
    x = pre.batch([pre.decode(photo_crop)])      # (N, C, image_size, image_size) float tensor

`Preprocess` turns a decoded (size, size, C) uint8 face (a row of the image cache, `agecls.data.cache
.decode_image` of a file or `fit_square` of a photo's crop, size = data.image_size + data.crop_margin) into
the model's input with `agecls.data.datamodule.face_tensor`, the function the datamodule's loaders make
every item with: the eval transform of `build_augment` (a centre crop when the cache keeps a margin), /255,
and the run's normalisation (`normalize_stats`). Post-fit scoring (the datamodule's eval loaders),
agecls-eval, agecls-predict and agecls-serve therefore hand a model the same tensor for the same face.
Torch is imported inside functions: agecls-predict's `--help` imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf

from agecls.evaluation.scoring import EvalError, normalize_stats

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from agecls.data.datamodule import FaceDataset
    from agecls.tasks.module import FaceClassifier

# The eval side of `build_augment` needs no augmentation steps: only `data`'s sizes decide it.
NO_AUGMENT = {"name": "none", "train": []}


def load_checkpoint(path: str | Path, device: Any = "cpu") -> FaceClassifier:
    """The FaceClassifier saved at `path`, in eval mode on `device`; EvalError naming the file when it is
    not a loadable agecls checkpoint."""
    from agecls.tasks.module import FaceClassifier

    try:
        module = FaceClassifier.load_from_checkpoint(path, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not one of ours
        raise EvalError(
            f"ckpt={path}: not a loadable agecls checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    return module.to(device).eval()


class Preprocess:
    """How a checkpoint's run turned a decoded face into its model's input: `size` (decode side,
    image_size + crop_margin), the eval transform (centre crop to `image_size`, or None), colour mode and
    per-channel `mean`/`std` (0..1 scale; None for data.normalize=none)."""

    def __init__(
        self,
        image_size: int,
        crop_margin: int = 0,
        grayscale: bool = True,
        mean: Sequence[float] | np.ndarray | None = None,
        std: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        from agecls.data.augment import build_augment

        if (mean is None) != (std is None):
            raise ValueError("Preprocess: give both mean and std, or neither")
        data = OmegaConf.create(
            {"image_size": image_size, "crop_margin": crop_margin, "grayscale": grayscale}
        )
        # build_augment validates data.image_size and data.crop_margin (a ValueError naming the key)
        self.transform: Callable[..., dict] | None = build_augment(OmegaConf.create(NO_AUGMENT), data).eval
        self.image_size, self.crop_margin, self.grayscale = int(image_size), int(crop_margin), bool(grayscale)
        self.size = self.image_size + self.crop_margin
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        self._stats: tuple[Any, Any] | None = None

    @classmethod
    def of(cls, module: Any) -> Preprocess:
        """The preprocessing of a loaded checkpoint: its config's `data` keys and its `input_stats` (a
        checkpoint without them recomputes `data.normalize` as `normalize_stats` does: EvalError when a
        `dataset` run's train split is gone)."""
        data = module.cfg.data
        grayscale = bool(data.grayscale)
        channels = np.zeros((1, 1, 1, 1 if grayscale else 3), np.uint8)  # only the channel count is read
        stats = normalize_stats(module.cfg, channels, np.arange(1), getattr(module, "input_stats", None))
        mean, std = stats if stats is not None else (None, None)
        return cls(int(data.image_size), int(data.get("crop_margin") or 0), grayscale, mean, std)

    def __repr__(self) -> str:
        mean = None if self.mean is None else self.mean.tolist()
        std = None if self.std is None else self.std.tolist()
        return (
            f"Preprocess(image_size={self.image_size}, crop_margin={self.crop_margin}, "
            f"grayscale={self.grayscale}, mean={mean}, std={std})"
        )

    def stats(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mean, std) as (C, 1, 1) float32 tensors for `face_tensor` (None, None without normalisation)."""
        import torch

        if self._stats is None:
            self._stats = (
                (None, None)
                if self.mean is None
                else tuple(
                    torch.as_tensor(s, dtype=torch.float32).view(-1, 1, 1) for s in (self.mean, self.std)
                )
            )
        return self._stats

    def decode(self, img: Image.Image) -> np.ndarray:
        """An opened image (a face crop) as the (size, size, C) uint8 array training decoded files into."""
        from agecls.data.cache import fit_square

        return fit_square(img, self.size, self.grayscale)

    def tensor(self, image: np.ndarray, normalize: bool = True) -> torch.Tensor:
        """The model's (C, image_size, image_size) input of one decoded face (`face_tensor`); `normalize`
        False leaves it on the 0..1 scale (an ensemble normalises per member)."""
        from agecls.data.datamodule import face_tensor

        mean, std = self.stats() if normalize else (None, None)
        return face_tensor(image, self.transform, mean, std)

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, C, image_size, image_size) of decoded faces, stacked as a DataLoader collates them."""
        import torch

        return torch.stack([self.tensor(image) for image in images])

    def dataset(
        self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, normalize: bool = True
    ) -> FaceDataset:
        """The FaceDataset of `rows` of decoded `images` with their `labels`, items as `tensor` makes them."""
        from agecls.data.datamodule import FaceDataset

        mean, std = (self.mean, self.std) if normalize else (None, None)
        return FaceDataset(images, rows, labels, self.transform, mean, std)
