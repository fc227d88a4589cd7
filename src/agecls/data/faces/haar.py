"""Faces and eyes with OpenCV's bundled Haar cascades: the fallback finder (no landmarks but the eyes, and
fewer faces found than MTCNN: BENCHMARKS.md, photos)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_CASCADES: dict[str, Any] = {}


def _cascade(name: str):
    import cv2

    if name not in _CASCADES:
        path = Path(cv2.data.haarcascades) / name
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise RuntimeError(f"OpenCV cannot load its bundled cascade {path}")
        _CASCADES[name] = cascade
    return _CASCADES[name]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0, min(ax2, bx2) - max(a[0], b[0])), max(0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def _inside(small: Sequence[int], big: Sequence[int]) -> bool:
    cx, cy = small[0] + small[2] / 2, small[1] + small[3] / 2
    return big[0] <= cx <= big[0] + big[2] and big[1] <= cy <= big[1] + big[3]


def detect_boxes(gray: np.ndarray, min_face: int = 24) -> list[tuple[tuple[int, int, int, int], str]]:
    """Face boxes (x, y, w, h) and the cascade that found them, largest first: frontal default, else alt2,
    else the profile cascade on the photo and its mirror image."""
    import cv2

    gray = cv2.equalizeHist(gray)
    w = gray.shape[1]
    min_size = (min_face, min_face)
    found: list[tuple[tuple[int, int, int, int], str]] = []
    for name, neighbours in (
        ("haarcascade_frontalface_default.xml", 5),
        ("haarcascade_frontalface_alt2.xml", 4),
    ):
        boxes = _cascade(name).detectMultiScale(gray, 1.1, neighbours, minSize=min_size)
        if len(boxes):
            found = [(tuple(int(v) for v in b), name.split(".")[0][12:]) for b in boxes]
            break
    if not found:
        profile = _cascade("haarcascade_profileface.xml")
        for b in profile.detectMultiScale(gray, 1.1, 5, minSize=min_size):
            found.append((tuple(int(v) for v in b), "profileface"))
        for b in profile.detectMultiScale(cv2.flip(gray, 1), 1.1, 5, minSize=min_size):
            x, y, bw, bh = (int(v) for v in b)
            found.append(((w - x - bw, y, bw, bh), "profileface"))
    found.sort(key=lambda f: -f[0][2] * f[0][3])
    kept: list[tuple[tuple[int, int, int, int], str]] = []
    for box, name in found:  # non-maximum suppression: a box mostly inside a larger one is the same face
        if all(iou(box, k) < 0.3 and not _inside(box, k) for k, _ in kept):
            kept.append((box, name))
    return kept


def eye_centres(gray: np.ndarray, box: Sequence[int]) -> np.ndarray | None:
    """The two eye centres ((2, 2): the one on the image's left first) when haarcascade_eye finds one eye in
    each upper quarter of the face box and their line is tilted at most 30 degrees; None otherwise."""
    x, y, w, h = (int(v) for v in box)
    roi = gray[max(0, y) : max(0, y + h // 2), max(0, x) : max(0, x + w)]
    min_eye = max(4, w // 10)
    eyes = _cascade("haarcascade_eye.xml").detectMultiScale(roi, 1.1, 5, minSize=(min_eye, min_eye))
    left = [e for e in eyes if e[0] + e[2] / 2 < w / 2]
    right = [e for e in eyes if e[0] + e[2] / 2 >= w / 2]
    if not left or not right:
        return None
    (lx, ly, lw, lh), (rx, ry, rw, rh) = max(left, key=lambda e: e[2]), max(right, key=lambda e: e[2])
    ox, oy = max(0, x), max(0, y)
    centres = np.array([[ox + lx + lw / 2, oy + ly + lh / 2], [ox + rx + rw / 2, oy + ry + rh / 2]])
    dx, dy = centres[1] - centres[0]
    return centres if abs(np.degrees(np.arctan2(dy, dx))) <= 30 else None  # larger: a wrong eye, likely
