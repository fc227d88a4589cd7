"""Batches for the one training loop: cached uint8 images + labels -> transforms -> normalise -> sampler.

Two pipelines build the same batches (`data.pipeline`): `loader`, the reference, runs the albumentations
transforms per image in DataLoader workers on the CPU; `device` copies the decoded cache to the accelerator
once per process (`StagedCache`, agecls.data.staged: datamodules over the same cache share the copy) and
assembles every batch there (`DeviceBatches`: index, per-sample augmentation translated by
agecls.data.device_augment, centre crop, normalise), so a GPU is not left waiting on CPU augmentation."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, get_worker_info

from agecls.data.augment import Transforms, check_normalize_spec, resolve_normalize, seed_transform
from agecls.data.device_augment import DeviceAugment, translate_pipeline
from agecls.data.staged import StagedCache

SPLITS = ("train", "val", "test")
PIPELINES = ("loader", "device")
# What a weighted sampler may balance (`sampler.groups`): the task's class, the age bin, gender, ethnicity.
SAMPLING_GROUPS = ("target", "age", "gender", "ethnicity")


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader worker init: give the worker's copy of a seeded albumentations pipeline its own stream
    (and run OpenCV single-threaded in the worker: the workers already use the cores).

    albumentations 2 ignores global seeds and every worker starts from a copy of the same Compose state, so
    without this all workers would draw the same augmentations. torch's per-worker seed is derived from the
    loader's seeded generator, so the streams are reproducible."""
    if os.environ.get("PL_SEED_WORKERS") == "1":  # what Lightning adds when no worker_init_fn is set
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
    info = get_worker_info()
    if info is not None:
        seed_transform(getattr(info.dataset, "transform", None), info.seed % 2**32)
        import cv2  # albumentations' backend; its thread pool would oversubscribe the cores

        cv2.setNumThreads(0)


def sample_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weights 1 / count of the sample's class (the dissertation's weighted sampler)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return 1.0 / counts[labels]


def group_weights(groups: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Per-row weights 1 / size**power of the row's group, a group being one distinct row of `groups`
    ((rows,) or (rows, k) integer codes; -1, an unknown value, is a code like any other, so faces with
    an unknown value form their own group). power 1: every group is drawn equally often; 0: every face."""
    codes = np.asarray(groups).reshape(len(groups), -1)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse.reshape(-1)].astype(np.float64) ** float(power)


def labelled_rows(labels: np.ndarray, split: np.ndarray, name: str) -> np.ndarray:
    """Rows of split `name` with any of the task's targets (-1 marks a missing one): the rows a
    FaceDataModule serves for that split."""
    has_label = labels >= 0 if labels.ndim == 1 else (labels >= 0).any(axis=1)
    return np.flatnonzero((split == name) & has_label)


def normalize_input(
    x: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """`(x - mean) / std` per channel of a 0..1-scale (C, H, W) or (B, C, H, W) tensor (`mean`, `std`
    shaped to broadcast over the channel axis); `x` itself when `mean` is None. Out of place: the
    ensemble's members each normalise the same batch."""
    return x if mean is None else (x - mean) / std


def face_tensor(
    image: np.ndarray,
    transform: Callable[..., dict] | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoded (H, W, C) uint8 face (a cache row, or `agecls.data.cache.fit_square` of a photo's crop)
    as the model's (C, H, W) float input: `transform` on the uint8 image (eval: the centre crop of
    `build_augment`), then /255, then `normalize_input`. Every loader item and every predicted face is
    made here, so training, scoring and prediction feed a model the same numbers."""
    image = np.array(image)  # a writable copy (memory-mapped cache rows and PIL-backed arrays are read-only)
    if transform is not None:
        image = transform(image=image)["image"]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return normalize_input(x, mean, std)


class FaceDataset(Dataset):
    """Rows `indices` of a decoded (N, H, W, C) uint8 array with one integer label per row (or a row of
    integer targets, e.g. age bin and exact age, when `labels` is 2-D; -1 marks a missing one).

    An item is `face_tensor` of the row (`transform`, /255, `(x - mean) / std` per channel when `mean` and
    `std` are given, 0..1 scale) and its label."""

    def __init__(
        self,
        images: np.ndarray,
        indices: np.ndarray,
        labels: np.ndarray,
        transform: Callable[..., dict] | None = None,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
    ) -> None:
        self.images, self.indices, self.labels, self.transform = images, indices, labels, transform
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.indices[i]
        x = face_tensor(self.images[row], self.transform, self.mean, self.std)
        return x, torch.as_tensor(self.labels[row], dtype=torch.long)


class DeviceBatches:
    """An iterable of (x, y) batches built on the device from a StagedCache: the rows `rows` of the cache
    (shuffled, weighted-sampled or in order), `augment` per sample, a centre crop to `size`, `(x - mean) /
    std`; x is float32 (B, C, size, size) (channels_last memory when asked), y the rows' labels.

    The order is drawn from a CPU generator seeded with `seed` and the augmentation from a device generator
    seeded with `seed` + 1; both run on across epochs (each epoch differs, the run is reproducible). With
    `weights`, each epoch draws len(rows) rows with replacement, with those probabilities."""

    def __init__(
        self,
        cache: StagedCache,
        rows: np.ndarray,
        labels: np.ndarray,
        device: Callable[[], torch.device],
        *,
        size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = False,
        weights: np.ndarray | None = None,
        augment: DeviceAugment | None = None,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        channels_last: bool = False,
    ) -> None:
        self.cache, self.rows, self.device = cache, torch.as_tensor(rows, dtype=torch.long), device
        self.labels = torch.as_tensor(labels[rows], dtype=torch.long)
        self.size, self.batch_size, self.shuffle, self.augment = size, batch_size, shuffle, augment
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.channels_last, self.seed = channels_last, seed
        self._order = torch.Generator().manual_seed(seed)
        self._augment: torch.Generator | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._augment is None or self._augment.device != device:
            self._augment = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._augment

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = torch.device(self.device())
        images = self.cache.on(device)
        n = len(self.rows)
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=self._order)
        elif self.shuffle:
            order = torch.randperm(n, generator=self._order)
        else:
            order = torch.arange(n)
        rows, labels = self.rows[order].to(device), self.labels[order].to(device)
        mean = None if self.mean is None else self.mean.to(device)
        std = None if self.std is None else self.std.to(device)
        for start in range(0, n, self.batch_size):
            x = images[rows[start : start + self.batch_size]].float().div_(255.0)
            if self.augment is not None:
                x = self.augment(x, self._generator(device))
            top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
            x = x[:, :, top : top + self.size, left : left + self.size]
            x = normalize_input(x, mean, std)
            x = x.contiguous(
                memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
            )
            yield x, labels[start : start + self.batch_size]


class FaceDataModule(L.LightningDataModule):
    """Train/val/test loaders over one persisted split; rows without the task's label are left out.

    `labels` is one integer label per row, or (rows, columns) targets of which the first column is the
    primary one (weighted sampler, class weights); a row is kept when it has any of its targets.

    `train_transform` is either one callable (train only; eval images pass as cached) or the `Transforms`
    of `agecls.data.augment.build_augment`, which also brings the eval transform (a centre crop when the
    cache keeps a margin) and `data.normalize`. Normalisation is resolved once (`dataset`: from the train
    split) and applied identically to every split. A seeded train pipeline is re-seeded with `seed`, and per
    DataLoader worker from the loader's seeded generator.

    `sampling_weights` (one per row of `images`, e.g. `group_weights` of the faces' groups) draws the
    train split's rows with these relative probabilities, with replacement (as `weighted_sampler` does with
    1 / count of the class, which it replaces); seeded with `seed` and saved in checkpoints like the order.

    `pipeline="device"` serves `DeviceBatches` instead of DataLoaders: the cache is staged on the device the
    trainer runs on (else `device`, default CPU; one copy shared by every datamodule of the process over
    the same cache, see agecls.data.staged), the train pipeline is translated to per-sample torch
    operations (a ValueError names a step that has no device version), and `num_workers` is not used.
    `image_size` is the side the model sees (default: the cache's; larger caches are centre-cropped, as
    the eval transform does). `channels_last` hands the model channels-last batches on either pipeline."""

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
        train_transform: Callable[..., dict] | Transforms | None = None,
        eval_transform: Callable[..., dict] | None = None,
        normalize: object = "none",
        seed: int = 42,
        pipeline: str = "loader",
        image_size: int | None = None,
        channels_last: bool = False,
        device: str | torch.device | None = None,
        sampling_weights: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if pipeline not in PIPELINES:
            raise ValueError(f"data.pipeline={pipeline!r}; valid: {', '.join(PIPELINES)}")
        self.pipeline, self.channels_last = pipeline, bool(channels_last)
        self.image_size = int(image_size or images.shape[1])
        self._device = torch.device(device) if device is not None else None
        if len(images) != len(labels) or len(labels) != len(split):
            raise ValueError(f"images ({len(images)}), labels ({len(labels)}), split ({len(split)}) differ")
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.batch_size, self.num_workers = batch_size, num_workers
        if isinstance(train_transform, Transforms):
            if eval_transform is not None or normalize != "none":
                raise ValueError("pass eval_transform and normalize inside the Transforms, not beside it")
            train_transform, eval_transform, normalize = (
                train_transform.train,
                train_transform.eval,
                train_transform.normalize,
            )
        check_normalize_spec(normalize)
        self.weighted_sampler, self.seed = bool(weighted_sampler) or sampling_weights is not None, seed
        self.train_transform, self.eval_transform = train_transform, eval_transform
        seed_transform(train_transform, seed)
        self.indices = {s: labelled_rows(labels, split, s) for s in SPLITS}
        for s, idx in self.indices.items():
            if len(idx) == 0:
                raise ValueError(f"the {s} split has no rows with this task's label")
        self.sampling_weights = None
        if sampling_weights is not None:
            weights = np.asarray(sampling_weights, dtype=np.float64)
            train = weights[self.indices["train"]] if len(weights) == len(labels) else None
            if train is None or not np.isfinite(train).all() or (train < 0).any() or train.sum() <= 0:
                raise ValueError(
                    f"sampling_weights: {len(weights)} weights for {len(labels)} rows; valid: one finite "
                    "weight >= 0 per row, some train row's > 0"
                )
            self.sampling_weights = weights
        stats = resolve_normalize(normalize, images, self.indices["train"])
        self.mean, self.std = stats if stats is not None else (None, None)
        self.device_augment = translate_pipeline(train_transform) if pipeline == "device" else None
        self.cache = StagedCache(images) if pipeline == "device" else None
        self._device_train: DeviceBatches | None = None
        self._train_generators: list[torch.Generator] = []  # the train loader's order and sampling streams
        self._resumed: dict[str, Any] | None = None  # streams of a checkpoint, for the next train loader

    @property
    def device(self) -> torch.device:
        """Where `pipeline="device"` builds batches: the attached trainer's device, else the one given."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return self._device or torch.device("cpu")

    def _device_batches(
        self, rows: np.ndarray, *, train: bool = False, weights: np.ndarray | None = None
    ) -> DeviceBatches:
        return DeviceBatches(
            self.cache,
            rows,
            self.labels,
            lambda: self.device,
            size=self.image_size,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=train and weights is None,
            weights=weights,
            augment=self.device_augment if train else None,
            mean=self.mean,
            std=self.std,
            channels_last=self.channels_last,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Channels-last inputs for loader batches (device batches are built that way)."""
        if self.channels_last and self.pipeline == "loader":
            x, y = batch
            return x.contiguous(memory_format=torch.channels_last), y
        return batch

    def split_labels(self, split: str) -> np.ndarray:
        """Labels (the primary column of 2-D targets) of one split, in loader order (before sampling)."""
        rows = self.labels[self.indices[split]]
        return rows if rows.ndim == 1 else rows[:, 0]

    def _loader(
        self, split: str, transform, sampler=None, shuffle: bool = False, rows: np.ndarray | None = None
    ) -> DataLoader | DeviceBatches:
        rows = self.indices[split] if rows is None else rows
        if self.pipeline == "device":
            return self._device_batches(rows)
        generator = torch.Generator().manual_seed(self.seed)
        seeded = hasattr(transform, "set_random_state") and self.num_workers > 0
        return DataLoader(
            FaceDataset(self.images, rows, self.labels, transform, self.mean, self.std),
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
            worker_init_fn=seed_worker_transform if seeded else None,
        )

    def _sample_weights(self) -> np.ndarray:
        if self.sampling_weights is not None:
            return self.sampling_weights[self.indices["train"]]
        labels = self.split_labels("train")
        weights = np.zeros(len(labels))  # a row without the primary label is never drawn
        weights[labels >= 0] = sample_weights(labels[labels >= 0], self.num_classes)
        return weights

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        if self.pipeline == "device":  # one iterable per datamodule: its generators run on across fits
            if self._device_train is None:
                weights = self._sample_weights() if self.weighted_sampler else None
                self._device_train = self._device_batches(self.indices["train"], train=True, weights=weights)
            self._restore_streams()
            return self._device_train
        if not self.weighted_sampler:
            loader = self._loader("train", self.train_transform, shuffle=True)
            self._train_generators = [loader.generator]
        else:
            weights = self._sample_weights()
            sampler = WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double),
                num_samples=len(weights),
                replacement=True,
                generator=torch.Generator().manual_seed(self.seed),
            )
            loader = self._loader("train", self.train_transform, sampler=sampler)
            self._train_generators = [loader.generator, sampler.generator]
        self._restore_streams()
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Where the train batches' random streams stand (order, weighted sampling, and augmentation drawn in
        this process), saved in checkpoints so a resumed fit draws the batches the uninterrupted fit would.
        Augmentation in DataLoader workers (num_workers > 0) is drawn in the workers and is not saved."""
        state: dict[str, Any] = {}
        if self._device_train is not None:
            batches = self._device_train
            state["order"] = [batches._order.get_state()]
            if batches._augment is not None:
                state["device_augment"] = batches._augment.get_state().cpu()
        elif self._train_generators:
            state["order"] = [g.get_state() for g in self._train_generators]
        transform = self.train_transform
        in_process = self.num_workers == 0 and hasattr(transform, "random_generator")
        if in_process and hasattr(transform, "py_random"):
            version, internal, gauss_next = transform.py_random.getstate()
            bits = transform.random_generator.bit_generator.state
            state["augment"] = {"numpy": json.dumps(bits), "python": [version, list(internal), gauss_next]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's streams (`state_dict`) for the train loader the resumed fit builds next."""
        self._resumed = dict(state_dict)

    def _restore_streams(self) -> None:
        state, self._resumed = self._resumed, None
        if not state:
            return
        if self._device_train is not None:
            generators = [self._device_train._order]
            if "device_augment" in state:
                augment = self._device_train._generator(self.device)
                augment.set_state(state["device_augment"])
        else:
            generators = self._train_generators
        for generator, saved in zip(generators, state.get("order", []), strict=False):
            generator.set_state(saved)
        transform = self.train_transform
        if "augment" in state and hasattr(transform, "random_generator"):
            # in place: the pipeline's steps share these two generator objects
            transform.random_generator.bit_generator.state = json.loads(state["augment"]["numpy"])
            version, internal, gauss_next = state["augment"]["python"]
            transform.py_random.setstate((version, tuple(internal), gauss_next))

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("val", self.eval_transform)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test", self.eval_transform)

    def eval_dataloader(self, split: str) -> DataLoader | DeviceBatches:
        """Any split in fixed order, without augmentation or sampling (for scoring a trained model)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; valid: {', '.join(SPLITS)}")
        return self._loader(split, self.eval_transform)

    def rows_dataloader(self, rows: np.ndarray) -> DataLoader | DeviceBatches:
        """Given rows of the images array (any split, e.g. faces routed to a hierarchy's expert), in order,
        preprocessed like eval data; their label is -1 where this datamodule's task has none."""
        return self._loader("test", self.eval_transform, rows=np.asarray(rows, dtype=np.int64))
