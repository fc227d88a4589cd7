"""From `data` config to arrays a run trains on: (generate) -> manifest + split -> decoded cache -> labels."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from agecls.data.bins import AgeBins
from agecls.data.cache import build_cache
from agecls.data.manifest import Manifest, prepare_manifest
from agecls.data.synthetic import generate_synthetic


@dataclass
class PreparedData:
    """A persisted split and its decoded images, row-aligned with `manifest.df`."""

    manifest: Manifest
    images: np.ndarray  # (N, H, W, C) uint8, memory-mapped


def manifest_dir(data: DictConfig, root: Path, data_dir: str) -> Path:
    """Where a folder's manifest lives: data.manifest_dir, else one folder per dataset root."""
    if data.get("manifest_dir"):
        return Path(data.manifest_dir)
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    return Path(data_dir) / "manifests" / f"{data.name}-{digest}"


@contextmanager
def data_lock(data_dir: str | Path) -> Iterator[None]:
    """Exclusive lock over data preparation: concurrent runs (sweep trials, workers sharing a folder)
    generate, split and cache one at a time; whoever comes second reuses what the first wrote."""
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(data: DictConfig, paths: DictConfig) -> PreparedData:
    """Generate synthetic data if configured, read or write the persisted split, and decode once
    (under data_lock, so parallel runs never write the same files at once)."""
    with data_lock(paths.data_dir):
        return _prepare_data(data, paths)


def _prepare_data(data: DictConfig, paths: DictConfig) -> PreparedData:
    root = Path(data.root)
    if data.get("synthetic"):
        generate_synthetic(root, n=int(data.synthetic.n), seed=int(data.synthetic.seed))
    manifest = prepare_manifest(
        root,
        manifest_dir(data, root, paths.data_dir),
        ratios=tuple(data.split.ratios),
        stratify=tuple(data.split.stratify),
        seed=int(data.split.seed),
        dedupe=bool(data.duplicates.dedupe),
        conflicts=str(data.duplicates.conflicts),
        check_images=bool(data.check_images),
        force=bool(data.split.force),
    )
    images = build_cache(
        [manifest.root / p for p in manifest.df["path"]],
        paths.cache_dir,
        key=manifest.hash,
        size=int(data.image_size) + int(data.get("crop_margin") or 0),  # margin: room for random crops
        grayscale=bool(data.grayscale),
    )
    return PreparedData(manifest=manifest, images=images)


def task_labels(prepared: PreparedData, target: str, bins: AgeBins) -> np.ndarray:
    """Integer label per manifest row for a task target; -1 where the row lacks that label."""
    df = prepared.manifest.df
    if target not in ("age", "gender", "ethnicity"):
        raise ValueError(f"task.target={target!r}; valid: age, gender, ethnicity")
    column = df[target]
    present = column.notna().to_numpy()
    labels = np.full(len(df), -1, dtype=np.int64)
    values = column[present].to_numpy(dtype=np.int64)
    labels[present] = bins.index(values) if target == "age" else values
    return labels
