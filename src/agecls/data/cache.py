"""Decode and resize every image once into a memory-mapped (N, size, size, C) uint8 .npy file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from agecls.data.records import DataError


def fit_square(img: Image.Image, size: int, grayscale: bool) -> np.ndarray:
    """An opened image as (size, size, C) uint8: shorter side resized to `size` (bilinear, reducing_gap=None),
    centre-cropped. The one preprocessing of training files and of faces found in photos (serving.predict)."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, P, LA, RGBA, I;16 ... via RGB
    img = img.convert("L" if grayscale else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_image(path: str | Path, size: int, grayscale: bool) -> np.ndarray:
    """One image file as (size, size, C) uint8 (`fit_square`); DataError naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            return fit_square(img, size, grayscale)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None


def cache_path(cache_dir: str | Path, *, key: str, size: int, grayscale: bool) -> Path:
    """The .npy file for a key, size and colour mode (key sanitised and shortened for a file name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key)).strip("-.")[:64] or "cache"
    return Path(cache_dir) / f"{safe}_{int(size)}px_{'L' if grayscale else 'RGB'}.npy"


def _paths_hash(paths: Sequence[str | Path]) -> str:
    return hashlib.sha256("\n".join(Path(p).as_posix() for p in paths).encode()).hexdigest()


def _open_existing(
    file: Path, meta_file: Path, expected: tuple[int, ...], paths_hash: str
) -> np.ndarray | None:
    """The cached array read-only when file, sidecar, shape, dtype and paths all match; None otherwise."""
    if not (file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        arr = np.load(file, mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if arr.shape != expected or arr.dtype != np.uint8 or meta.get("paths_sha256") != paths_hash:
        return None
    return arr


def build_cache(
    paths: Sequence[str | Path],
    cache_dir: str | Path,
    *,
    key: str,
    size: int,
    grayscale: bool,
    workers: int = 2,
) -> np.ndarray:
    """Decoded images, row i = paths[i], as a read-only memmap; built once per (key, size, mode), then reused.

    A cache whose shape, dtype or path list does not match (e.g. an interrupted or stale build) is rebuilt.
    """
    if size <= 0:
        raise ValueError(f"cache image size must be a positive number of pixels, got {size}")
    paths = list(paths)
    channels = 1 if grayscale else 3
    expected = (len(paths), size, size, channels)
    file = cache_path(cache_dir, key=key, size=size, grayscale=grayscale)
    meta_file = file.with_suffix(".json")
    paths_hash = _paths_hash(paths)
    existing = _open_existing(file, meta_file, expected, paths_hash)
    if existing is not None:
        return existing

    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.stem}.tmp-{os.getpid()}.npy")
    start = time.perf_counter()
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=expected)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = pool.map(lambda p: decode_image(p, size, grayscale), paths, chunksize=32)
            for i, image in enumerate(decoded):
                out[i] = image
        out.flush()
    except BaseException:
        del out
        tmp.unlink(missing_ok=True)
        raise
    del out
    seconds = time.perf_counter() - start
    os.replace(tmp, file)
    meta = {
        "key": str(key),
        "n": len(paths),
        "size": int(size),
        "mode": "L" if grayscale else "RGB",
        "shape": list(expected),
        "paths_sha256": paths_hash,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(paths) / seconds, 1) if seconds > 0 else None,
    }
    tmp_meta = meta_file.with_name(f".{meta_file.name}.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_meta, meta_file)
    return np.load(file, mmap_mode="r")
