"""From `data` config to arrays a run trains on: (generate) -> manifest + split -> decoded cache -> labels.

The split comes from one of two places: with `data.path` set (`data=manifest`), someone else's split CSV
imported as it is (`load_manifest`); otherwise agecls's own persisted split of `data.root`
(`prepare_manifest`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from agecls.data.bins import AgeBins
from agecls.data.cache import build_cache
from agecls.data.manifest import Manifest, ManifestError, load_manifest, prepare_manifest
from agecls.data.records import DataError
from agecls.data.synthetic import generate_synthetic
from agecls.errors import UsageError
from agecls.files import file_lock

log = logging.getLogger(__name__)


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
    with file_lock(Path(data_dir) / ".prepare.lock"):
        yield


def prepare_data(data: DictConfig, paths: DictConfig) -> PreparedData:
    """Generate synthetic data if configured, read or write the persisted split, and decode once
    (under data_lock, so parallel runs never write the same files at once)."""
    with data_lock(paths.data_dir):
        return _prepare_data(data, paths)


def _prepare_data(data: DictConfig, paths: DictConfig) -> PreparedData:
    manifest = resolve_manifest(data, paths)
    images = build_cache(
        [manifest.root / p for p in manifest.df["path"]],
        paths.cache_dir,
        key=manifest.hash,
        size=int(data.image_size) + int(data.get("crop_margin") or 0),  # margin: room for random crops
        grayscale=bool(data.grayscale),
    )
    return PreparedData(manifest=manifest, images=images)


def declares(data: DictConfig, key: str) -> bool:
    """Whether a config node has `key` at all (`key in node` is False while its value is `???`)."""
    return key in list(data.keys())


def is_set(data: DictConfig, key: str) -> bool:
    """Whether data.<key> holds a value (not absent, null, empty or Hydra's mandatory `???`)."""
    return declares(data, key) and not OmegaConf.is_missing(data, key) and data[key] not in (None, "")


def data_root(data: DictConfig) -> Path:
    """data.root as a Path; DataError naming the key when it is still `???` or empty."""
    if not is_set(data, "root"):
        raise DataError(
            f"data={data.get('name', '?')} needs data.root=/path/to/images "
            "(the folder of UTKFace-named images)"
        )
    return Path(str(data.root))


def resolve_manifest(data: DictConfig, paths: DictConfig) -> Manifest:
    """The run's split (no decoding): data.path's external CSV when set, else the folder's persisted split
    (generating synthetic images first when data.synthetic is set). Call under data_lock."""
    if declares(data, "path") and not is_set(data, "path"):
        raise DataError(
            "data.path is not set: data=manifest needs data.path=FILE.csv (columns path, age, gender, "
            "ethnicity, split; sha1 optional) and, for relative paths not under the CSV's folder, "
            "data.root=DIR"
        )
    if is_set(data, "path"):
        return import_manifest(data)
    root = data_root(data)
    recursive = data.get("recursive", True)  # a config saved before the key: sub-folders are scanned
    if not isinstance(recursive, bool):
        raise UsageError(
            f"data.recursive={recursive!r}: must be true or false (scan the sub-folders of data.root)"
        )
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
        recursive=recursive,
    )
    scan = manifest.info.get("scan") or {}
    if scan.get("n_skipped_folders"):
        log.warning(
            "data.root=%s: %d sub-folder(s) not scanned (data.recursive=false), e.g. %s",
            root,
            scan["n_skipped_folders"],
            ", ".join(scan["skipped_folders"][:3]),
        )
    return manifest


def import_manifest(data: DictConfig) -> Manifest:
    """data.path's split CSV (relative paths against data.root when set; see load_manifest), with every
    listed file checked to exist; errors name data.path / data.root."""
    path = Path(str(data.path)).expanduser()
    if not path.is_file():
        raise ManifestError(
            f"data.path={path}: no such file (a CSV with columns path, age, gender, ethnicity, split)"
        )
    root = Path(str(data.root)).expanduser() if is_set(data, "root") else None
    if data.get("synthetic") and root is not None:
        generate_synthetic(root, n=int(data.synthetic.n), seed=int(data.synthetic.seed))
    if root is not None and not root.is_dir():
        raise DataError(
            f"data.root={root}: no such folder (the folder data.path's relative paths start from)"
        )
    try:
        manifest = load_manifest(path, root=root)
    except DataError as exc:
        raise type(exc)(f"data.path={path}: {exc}") from None
    missing = [p for p in manifest.df["path"] if not (manifest.root / p).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ManifestError(
            f"data.path={path}: {len(missing)} listed file(s) not found under {manifest.root} "
            f"(e.g. {missing[:3]}{more}); set data.root=DIR to the folder the paths are relative to"
        )
    return manifest


def task_labels(prepared: PreparedData, target: str, bins: AgeBins) -> np.ndarray:
    """Integer label per manifest row for a task target; -1 where the row lacks that label."""
    return frame_labels(prepared.manifest.df, target, bins)


def frame_labels(df, target: str, bins: AgeBins) -> np.ndarray:
    """Integer label per row of a records/manifest frame (age: its bin; `age_years`: the exact age); -1
    where the row lacks it."""
    column_name = "age" if target == "age_years" else target
    if column_name not in ("age", "gender", "ethnicity"):
        raise ValueError(f"task.target={target!r}; valid: age, gender, ethnicity")
    column = df[column_name]
    present = column.notna().to_numpy()
    labels = np.full(len(df), -1, dtype=np.int64)
    values = column[present].to_numpy(dtype=np.int64)
    labels[present] = bins.index(values) if target == "age" else values
    return labels


def frame_targets(df, columns: list[str], bins: AgeBins) -> np.ndarray:
    """Target array of a frame: 1-D labels for one column, else (rows, columns) (see frame_labels)."""
    if len(columns) == 1:
        return frame_labels(df, columns[0], bins)
    return np.stack([frame_labels(df, c, bins) for c in columns], axis=1)


def subset_labels(labels: np.ndarray, df, subset: Any) -> np.ndarray:
    """Labels with every row outside `subset` ({column: value, ...} of the manifest) set to -1 (left out).

    A row whose subset column is missing is left out too."""
    if not subset:
        return labels
    keep = np.ones(len(df), dtype=bool)
    for column, value in dict(subset).items():
        if column not in df.columns:
            raise DataError(f"data.subset.{column}: no such manifest column; valid: {', '.join(df.columns)}")
        keep &= (df[column] == value).fillna(False).to_numpy(dtype=bool)
    if not keep.any():
        raise DataError(f"data.subset={dict(subset)} selects no row of the manifest")
    return np.where(keep.reshape(-1, *[1] * (labels.ndim - 1)), labels, -1)  # 2-D targets: whole rows
