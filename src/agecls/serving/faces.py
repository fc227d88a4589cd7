"""Photos decoded and their faces found: the first half of agecls-predict and agecls-serve.

A photo is decoded with its EXIF orientation applied, its pixel count checked from the header first
(`decode_image`; JPEGs may decode reduced). Faces are found with OpenCV's bundled Haar cascades (frontal face
default, then alt2, then profile, both ways round); overlapping boxes are merged. A face is cut out as a
square centred on the detector's box whose side is the box side * (1 + 2 * margin): UTKFace's aligned crops
show the whole head with some hair and neck, about 1.6x the tight Haar box, hence margin=0.3 by default.
With align=true and two eyes found (haarcascade_eye, upper half of the box), the photo is rotated about the
face centre so the eyes are level first.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from agecls.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # larger photos are refused (decompression-bomb guard); conf/predict.yaml too


class ImageError(ValueError):
    """A file that is not a readable image, or one too large."""


class TooLargeError(ImageError):
    """An image with more pixels than allowed."""


def open_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "") -> Image.Image:
    """A decoded RGB image (EXIF orientation applied) from a path or bytes; ImageError / TooLargeError.

    The pixel count is checked from the header before any pixel is decoded."""
    return decode_image(data, max_pixels, name)[0]


def list_images(source: Path) -> list[Path]:
    """The file itself, or every file in the folder (sorted; hidden files skipped; the scan reports
    non-images as errors when they fail to decode, so a .jpg that is not one is still reported)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise UsageError(f"images={source}: no such file or folder")
    return sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))


def decode_image(
    data: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "",
    *,
    reduce_to: int | None = None,
    max_decoded_pixels: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """An RGB image (EXIF orientation applied) and the photo's own (width, height); ImageError /
    TooLargeError.

    With `reduce_to`, formats that can decode at a fraction of their size (JPEG: 1/2, 1/4, 1/8) are decoded
    at the smallest fraction whose longer side is still >= reduce_to. `max_decoded_pixels` refuses photos
    that would still decode to more pixels (every other format decodes at full size). Both pixel checks use
    the header, before any pixel is decoded."""
    label = name or (str(data) if not isinstance(data, bytes) else "upload")
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise TooLargeError(f"{label}: {w}x{h} = {w * h} pixels, more than the {max_pixels} allowed")
            if reduce_to:
                scale = _reduction(w, h, reduce_to, max_decoded_pixels)
                if scale > 1:  # PIL picks the largest of 8, 4, 2 that this requested size allows
                    img.draft("RGB", (w // scale, h // scale))
            dw, dh = img.size  # the size it decodes at: reduced by draft() for a JPEG, else unchanged
            if max_decoded_pixels is not None and dw * dh > max_decoded_pixels:
                raise TooLargeError(
                    f"{label}: {w}x{h} = {w * h} pixels, more than the {max_decoded_pixels} allowed for a "
                    f"{img.format or 'photo of this format'} (a JPEG is decoded reduced and may have up to "
                    f"{max_pixels})"
                )
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: a copy would double the peak memory
            if img.size != (dw, dh):  # turned a quarter by its EXIF orientation: the photo's size too
                w, h = h, w
            return (img if img.mode == "RGB" else img.convert("RGB")), (w, h)
    except Image.DecompressionBombError as exc:
        raise TooLargeError(f"{label}: {exc}") from None
    except TooLargeError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{label}: not a readable image ({type(exc).__name__}: {exc})") from None


def _reduction(w: int, h: int, reduce_to: int, max_decoded_pixels: int | None) -> int:
    """The JPEG scale denominator (1, 2, 4 or 8): the largest keeping the longer side >= reduce_to, larger
    still when that is needed to decode within max_decoded_pixels."""
    scale = 1
    for k in (2, 4, 8):
        if math.ceil(max(w, h) / k) >= reduce_to:
            scale = k
    limit = max_decoded_pixels or math.inf
    while scale < 8 and math.ceil(w / scale) * math.ceil(h / scale) > limit:
        scale *= 2
    return scale


# -------------------------------------------------------------------------------------------- detection


@dataclass
class Face:
    """One face: its box (x, y, w, h) in the photo, the square crop fed to the model, how it was found."""

    box: tuple[int, int, int, int]
    crop: Image.Image
    detector: str
    aligned: bool = False
    angle: float = 0.0


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


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0, min(ax2, bx2) - max(a[0], b[0])), max(0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def detect_boxes(gray: np.ndarray, min_face: int = 24) -> list[tuple[tuple[int, int, int, int], str]]:
    """Face boxes (x, y, w, h) and the cascade that found them, largest first: frontal default, else alt2,
    else the profile cascade on the photo and its mirror image."""
    import cv2

    gray = cv2.equalizeHist(gray)
    h, w = gray.shape
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
        if all(_iou(box, k) < 0.3 and not _inside(box, k) for k, _ in kept):
            kept.append((box, name))
    return kept


def _inside(small: Sequence[int], big: Sequence[int]) -> bool:
    cx, cy = small[0] + small[2] / 2, small[1] + small[3] / 2
    return big[0] <= cx <= big[0] + big[2] and big[1] <= cy <= big[1] + big[3]


def eye_angle(gray: np.ndarray, box: Sequence[int]) -> float | None:
    """Degrees the line between the two eyes is tilted (image y down), when haarcascade_eye finds one eye in
    each upper quarter of the face box; None otherwise."""
    x, y, w, h = box
    roi = gray[y : y + h // 2, x : x + w]
    min_eye = max(4, w // 10)
    eyes = _cascade("haarcascade_eye.xml").detectMultiScale(roi, 1.1, 5, minSize=(min_eye, min_eye))
    left = [e for e in eyes if e[0] + e[2] / 2 < w / 2]
    right = [e for e in eyes if e[0] + e[2] / 2 >= w / 2]
    if not left or not right:
        return None
    (lx, ly, lw, lh), (rx, ry, rw, rh) = max(left, key=lambda e: e[2]), max(right, key=lambda e: e[2])
    dx = (rx + rw / 2) - (lx + lw / 2)
    dy = (ry + rh / 2) - (ly + lh / 2)
    angle = math.degrees(math.atan2(dy, dx))
    return angle if abs(angle) <= 30 else None  # larger tilts are more likely a wrong eye


def square_crop(img: Image.Image, box: Sequence[int], margin: float, angle: float = 0.0) -> Image.Image:
    """The square around `box` (side = box side * (1 + 2 * margin), centred on it), rotated by `angle`
    degrees about the face centre first; outside the photo is black."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    side = max(w, h) * (1 + 2 * margin)
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    half = side / 2
    return img.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))


DETECT_MAX_SIDE = 1024  # larger photos are searched at this size (boxes mapped back): same faces, less time


def _detect_scaled(gray: np.ndarray, min_face: int) -> list[tuple[tuple[int, int, int, int], str]]:
    """detect_boxes on a copy at most DETECT_MAX_SIDE pixels on its longer side, boxes in full-size pixels."""
    import cv2

    scale = DETECT_MAX_SIDE / max(gray.shape)
    if scale >= 1:
        return detect_boxes(gray, min_face)
    small = cv2.resize(
        gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)), interpolation=cv2.INTER_AREA
    )
    found = detect_boxes(small, max(12, round(min_face * scale)))
    return [(tuple(round(v / scale) for v in box), name) for box, name in found]


def find_faces(
    img: Image.Image, *, margin: float = 0.3, align: bool = True, min_face: int = 24, max_faces: int = 20
) -> list[Face]:
    """Every face of an RGB photo (largest first, at most max_faces) with its square crop."""
    gray = np.asarray(img.convert("L"))
    faces = []
    for box, detector in _detect_scaled(gray, min_face)[:max_faces]:
        angle = eye_angle(gray, box) if align else None
        crop = square_crop(img, box, margin, angle or 0.0)
        faces.append(Face(box, crop, detector, angle is not None, round(angle or 0.0, 2)))
    log.debug("%d faces found in a %dx%d photo", len(faces), img.width, img.height)
    return faces
