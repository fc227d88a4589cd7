"""Photos decoded and their faces cut out as the model was trained: the first half of agecls-predict and
agecls-serve.

A photo is decoded with its EXIF orientation applied, its pixel count checked from the header first
(`decode_image`; JPEGs may decode reduced). Faces are found by agecls.data.faces.finders (MTCNN by default,
OpenCV's Haar cascades as the fallback) and each is cut out with the framing its model was trained on
(agecls.data.faces.framing: fitted on the training images, kept in the checkpoint), eyes levelled first.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from agecls.data.faces.finders import MAX_SIDE, Found, enlarged, find
from agecls.data.faces.framing import WHOLE_IMAGE_IOU, Framing, crop, square_iou
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

DETECT_MAX_SIDE = MAX_SIDE  # photos are searched at most this large: decoding them larger gains nothing


@dataclass
class Face:
    """One face: its box (x, y, w, h) in the photo, the finder's name, and the eye tilt it was levelled by."""

    box: tuple[int, int, int, int]
    found: Found | None
    detector: str
    aligned: bool = False
    angle: float = 0.0


def find_faces(
    img: Image.Image, *, finder: str = "mtcnn", min_face: int = 24, max_faces: int = 20
) -> list[Face]:
    """Every face of an RGB photo (largest first, at most max_faces)."""
    # searched at most MAX_SIDE px: reduced here, so a large photo is never copied whole into an array
    scale = min(1.0, MAX_SIDE / max(img.size))
    small = (
        img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR, reducing_gap=2.0
        )
        if scale < 1
        else img
    )
    faces = []
    for f in (
        enlarged(f, 1 / scale)
        for f in find(np.asarray(small), finder, max(1, round(min_face * scale)))[:max_faces]
    ):
        box = tuple(round(v) for v in f.box)
        tilt = f.angle
        faces.append(Face(box, f, f.finder, tilt is not None, round(tilt or 0.0, 2)))
    return faces


def whole_image(img: Image.Image) -> Face:
    """The image as one face (detect=false: it is a crop already)."""
    return Face((0, 0, img.width, img.height), None, "none")


def cut_out(img: Image.Image, face: Face, framing: Framing | None, align: bool) -> Image.Image:
    """The crop a model with `framing` sees of `face`: the image itself for a whole-image face, and for a
    photo that is such a crop already (its face's square covers it: WHOLE_IMAGE_IOU), as detect=false does."""
    if face.found is None or framing is None:
        return img
    cx, cy, side, _ = framing.square(face.found, align)
    if square_iou((cx, cy, side), (img.width / 2, img.height / 2, min(img.size))) >= WHOLE_IMAGE_IOU:
        return img
    # only the region the (rotated) square can reach is copied into an array, not the whole photo
    reach = side * 0.75
    left, top = math.floor(cx - reach), math.floor(cy - reach)
    region = np.asarray(img.crop((left, top, math.ceil(cx + reach), math.ceil(cy + reach))))
    return Image.fromarray(crop(region, face.found, framing, align, origin=(left, top)))
