"""The decoded image cache staged on a device for `data.pipeline=device`: one copy per process and device.

A hierarchy run (agecls.training.hierarchy) trains a router and then an expert per group in one process, each
with its own FaceDataModule over the same cache file; staging per datamodule would copy the whole cache to
the GPU again for every stage (and keep the earlier copies until garbage collection gets to them). So
`StagedCache` objects that wrap the same data share one device tensor through a registry of weak
references: the copy lives while any of them holds it and is freed when none does."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Hashable

import numpy as np
import torch

# key -> (weak reference to the staged tensor, what keeps the key meaning the same data while it exists)
_STAGED: dict[Hashable, tuple[weakref.ref, object]] = {}
_LOCK = threading.RLock()  # re-entrant: a copy freed by the garbage collector mid-lookup forgets itself


def data_key(images: np.ndarray) -> tuple[Hashable, object]:
    """(key naming the data `images` holds, object the registry must keep alive for the key to stay valid).

    A view of a memory-mapped file (np.load(mmap_mode="r") as the image cache opens it, or any view of
    one) is named by the file (device, inode, size, modification time), the mapping's offset, where the
    view starts in the mapping, its shape, strides and dtype: two separate np.load calls of one cache file
    share, while two slices of it (equal shapes, different rows) or a rewritten file do not. Any other
    array is named by its identity: shared only with itself, and kept alive by the entry so that its id()
    cannot be reused by another array while the entry exists."""
    owner = images
    while owner is not None and not (isinstance(owner, np.memmap) and owner._mmap is not None):
        owner = getattr(owner, "base", None)
    if owner is not None and owner.filename:
        try:
            stat = os.stat(owner.filename)
            base = np.frombuffer(owner._mmap, dtype=np.uint8).__array_interface__["data"][0]
        except (OSError, ValueError, TypeError):  # file gone, mapping closed: fall back to identity
            pass
        else:
            start = images.__array_interface__["data"][0] - base
            where = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, int(owner.offset), start)
            return ("file", *where, images.shape, images.strides, images.dtype.str), None
    return ("object", id(images)), images


def _normalise(device: torch.device | str) -> torch.device:
    """`cuda` and `cuda:<current>` are one device (and one registry key)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _forget(key: Hashable, ref: weakref.ref) -> None:
    with _LOCK:
        if key in _STAGED and _STAGED[key][0] is ref:
            del _STAGED[key]


def staged_copies() -> int:
    """How many staged tensors are alive in this process (tests, diagnostics)."""
    with _LOCK:
        return sum(ref() is not None for ref, _ in _STAGED.values())


class StagedCache:
    """The decoded (N, H, W, C) uint8 cache as one (N, C, H, W) uint8 tensor on a device, copied there on
    first use (and again only if the device changes). Caches over the same data (`data_key`) share the
    tensor while any of them holds it, so a process holds one copy per device, not one per datamodule."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.key, self._keep = data_key(images)  # keyed now: the file is what was opened, not later edits
        self._tensor: torch.Tensor | None = None

    def on(self, device: torch.device | str) -> torch.Tensor:
        device = _normalise(device)
        if self._tensor is not None and self._tensor.device == device:
            return self._tensor
        self._tensor = None  # free this holder's old copy before making the new one
        key = (self.key, str(device))
        with _LOCK:  # one copy even when two threads stage the same data at once
            entry = _STAGED.get(key)
            tensor = entry[0]() if entry is not None else None
            if tensor is None:
                host = torch.from_numpy(np.array(self.images)).permute(0, 3, 1, 2)  # one writable copy
                tensor = host.contiguous().to(device)
                _STAGED[key] = (weakref.ref(tensor, lambda ref: _forget(key, ref)), self._keep)
        self._tensor = tensor
        return tensor
