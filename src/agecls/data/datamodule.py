"""Batches for the one training loop: cached uint8 images + label arrays -> augment -> sampler."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from agecls.tasks.classification import sample_weights

SPLITS = ("train", "val", "test")


class FaceDataset(Dataset):
    """Rows `indices` of a decoded (N, H, W, C) uint8 array with one integer label per row."""

    def __init__(
        self,
        images: np.ndarray,
        indices: np.ndarray,
        labels: np.ndarray,
        transform: Callable[..., dict] | None = None,
    ) -> None:
        self.images, self.indices, self.labels, self.transform = images, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.indices[i]
        image = np.array(self.images[row])  # a writable copy of the memory-mapped row
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return x, torch.tensor(self.labels[row], dtype=torch.long)


class FaceDataModule(L.LightningDataModule):
    """Train/val/test loaders over one persisted split; rows without the task's label are left out."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        split: np.ndarray,
        num_classes: int,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        weighted_sampler: bool = False,
        train_transform: Callable[..., dict] | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if len(images) != len(labels) or len(labels) != len(split):
            raise ValueError(f"images ({len(images)}), labels ({len(labels)}), split ({len(split)}) differ")
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.batch_size, self.num_workers = batch_size, num_workers
        self.weighted_sampler, self.train_transform, self.seed = weighted_sampler, train_transform, seed
        has_label = labels >= 0
        self.indices = {s: np.flatnonzero((split == s) & has_label) for s in SPLITS}
        for s, idx in self.indices.items():
            if len(idx) == 0:
                raise ValueError(f"the {s} split has no rows with this task's label")

    def split_labels(self, split: str) -> np.ndarray:
        """Labels of one split, in loader order (before sampling)."""
        return self.labels[self.indices[split]]

    def _loader(self, split: str, transform, sampler=None, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            FaceDataset(self.images, self.indices[split], self.labels, transform),
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.weighted_sampler:
            return self._loader("train", self.train_transform, shuffle=True)
        weights = sample_weights(self.split_labels("train"), self.num_classes)
        sampler = WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double),
            num_samples=len(weights),
            replacement=True,
            generator=torch.Generator().manual_seed(self.seed),
        )
        return self._loader("train", self.train_transform, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", None)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", None)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Any split in fixed order, without augmentation or sampling (for scoring a trained model)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; valid: {', '.join(SPLITS)}")
        return self._loader(split, None)
