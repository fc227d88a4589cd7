"""The crop a model was trained on, as a function of what the face finder reports: fitted on its training
images.

A training image is a face crop, and the square the model sees of it (`fit_square`: the centred square of
its shorter side) is the answer. Each sampled training image is placed on a grey canvas (PAD of its side on
every side, so the finder sees a face with surroundings, as in a photo, not one cut at the frame) and what
the finder reports is compared with that square. With five landmarks (MTCNN) the reference point is their
centroid and the reference length the hypotenuse of the eye distance and the eye-to-mouth distance; with a
box only (Haar), the box centre and its longer side. The landmarks place the crop several times more
precisely: on UTKFace the spread (IQR) of the centre offset was 3 px against 20 px from the box. The medians
of side / reference length and of the centre offset (in reference lengths) are the framing; a face found in a
photo is then cut out as the same square about its own reference, after levelling its eyes (align) by as
much as they are tilted beyond the training images' own median tilt. A model keeps one framing per finder in
its checkpoint (`data_framing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agecls.data.faces.finders import FINDERS, Found, find
from agecls.files import write_atomic

log = logging.getLogger(__name__)

FRAMINGS = ("fit", "utkface", "none")  # data.framing
VERSION = 2  # of the fitting procedure: a cached fit of another version is fitted again
PAD = 0.5  # grey border around a training image while it is searched, in image sides
GREY = (127, 127, 127)
MIN_FACE = 0.25  # smallest face searched for in a training image, as a share of its side
MIN_FOUND = 0.5  # a fit needs a face in at least this share of the images tried
REFS = {"mtcnn": "landmarks", "haar": "box"}  # what each finder's framing is measured from
# Eyes tilted less than this beyond the training images' median are left as they are: on UTKFace's own crops,
# levelling every face lowered agreement with detect=false (resampling costs more than a small tilt)
MIN_TURN = 3.0
# A photo whose face square covers it this much is a crop in the model's framing already: taken as it is
WHOLE_IMAGE_IOU = 0.85


class FramingError(ValueError):
    """No framing: the finder found too few faces in the training images, or a stored framing is malformed."""


def square_iou(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Intersection over union of two squares given as (centre x, centre y, side)."""
    (ax, ay, a_s), (bx, by, b_s) = a, b
    iw = max(0.0, min(ax + a_s / 2, bx + b_s / 2) - max(ax - a_s / 2, bx - b_s / 2))
    ih = max(0.0, min(ay + a_s / 2, by + b_s / 2) - max(ay - a_s / 2, by - b_s / 2))
    inter = iw * ih
    return inter / (a_s * a_s + b_s * b_s - inter) if inter else 0.0


def reference(face: Found, ref: str) -> tuple[float, float, float]:
    """(x, y, length) a framing is measured from: the landmarks' centroid and hypot(eye distance,
    eye-to-mouth distance) for ref=landmarks, the box centre and its longer side for ref=box."""
    if ref == "landmarks" and face.landmarks is not None:
        marks = face.landmarks
        eyes = float(np.linalg.norm(marks[1] - marks[0]))
        mouth = float(np.linalg.norm((marks[0] + marks[1]) / 2 - (marks[3] + marks[4]) / 2))
        cx, cy = marks.mean(axis=0)
        return float(cx), float(cy), float(np.hypot(eyes, mouth))
    x, y, w, h = face.box
    return x + w / 2, y + h / 2, max(w, h)


@dataclass(frozen=True)
class Framing:
    """Square crop side = scale * reference length, centred at the reference point + (dx, dy) reference
    lengths, eyes levelled to `angle` degrees (`reference`: ref=landmarks or box); fitted with `finder` on
    `found` of `tried` training images, `scale_iqr` the spread of their scales."""

    finder: str
    ref: str
    scale: float
    dx: float
    dy: float
    angle: float
    found: int
    tried: int
    scale_iqr: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "version": VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "framing") -> Framing:
        """The framing a checkpoint or cache stored; FramingError naming `where` when it is not one."""
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise FramingError(f"{where}: not a face framing ({exc})") from None

    def square(self, face: Found, align: bool = True) -> tuple[float, float, float, float]:
        """(centre x, centre y, side, degrees to rotate about the reference point first) of the crop of
        `face`; the centre is in the photo levelled by that rotation."""
        ax, ay, length = reference(face, self.ref)
        tilt = face.angle
        turn = tilt - self.angle if align and tilt is not None else 0.0
        turn = turn if abs(turn) >= MIN_TURN else 0.0
        return ax + self.dx * length, ay + self.dy * length, self.scale * length, turn


def crop(
    rgb: np.ndarray, face: Found, framing: Framing, align: bool = True, origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """The (side, side, 3) square the model sees of `face`: rotated about its reference point to level the
    eyes (align), then cut out with the framing; outside the photo is black. `rgb` may be a region of the
    photo whose top-left corner is at `origin` in the photo's pixels."""
    import cv2

    cx, cy, side, turn = framing.square(face, align)
    ax, ay, _ = reference(face, framing.ref)
    ax, ay, cx, cy = ax - origin[0], ay - origin[1], cx - origin[0], cy - origin[1]
    out = max(1, round(side))
    # rotation about the reference point, then the square's top-left corner moved to the origin: one warp
    m = cv2.getRotationMatrix2D((ax, ay), turn, 1.0)
    m[:, 2] -= (cx - side / 2, cy - side / 2)
    return cv2.warpAffine(rgb, m, (out, out), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def _measure(rgb: np.ndarray, finder: str, ref: str) -> tuple[float, float, float, float] | None:
    """(crop side / reference length, dx, dy, eye tilt or nan) of one training image, None when no face
    is found."""
    import cv2

    h, w = rgb.shape[:2]
    side = min(h, w)
    pad = round(PAD * max(h, w))
    canvas = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=GREY)
    cx, cy = pad + w / 2, pad + h / 2
    inside = [
        f
        for f in find(canvas, finder, max(12, round(MIN_FACE * side)))
        if pad <= f.box[0] + f.box[2] / 2 <= pad + w and pad <= f.box[1] + f.box[3] / 2 <= pad + h
    ]
    if not inside:
        return None
    face = inside[0]  # the largest
    ax, ay, length = reference(face, ref)
    tilt = face.angle
    return side / length, (cx - ax) / length, (cy - ay) / length, np.nan if tilt is None else tilt


def fit_framing(images: Iterable[np.ndarray], finder: str = "mtcnn") -> Framing:
    """The framing of these training images (RGB uint8 arrays); FramingError when the finder finds a face
    in fewer than half of them."""
    rows, tried = [], 0
    ref = REFS[finder]
    for rgb in images:
        tried += 1
        got = _measure(rgb, finder, ref)
        if got is not None:
            rows.append(got)
    if not tried or len(rows) < max(3, MIN_FOUND * tried):
        raise FramingError(
            f"{finder} found a face in {len(rows)} of {tried} training images (a fit needs half): the images "
            "are not face crops this finder recognises"
        )
    a = np.array(rows)
    tilts = a[:, 3][~np.isnan(a[:, 3])]
    q1, q3 = np.percentile(a[:, 0], [25, 75])
    return Framing(
        finder,
        ref,
        round(float(np.median(a[:, 0])), 4),
        round(float(np.median(a[:, 1])), 4),
        round(float(np.median(a[:, 2])), 4),
        round(float(np.median(tilts)), 2) if len(tilts) else 0.0,
        len(rows),
        tried,
        round(float(q3 - q1), 4),
    )


def sample_paths(paths: Sequence[Path], n: int, seed: str) -> list[Path]:
    """Up to n of `paths`, drawn reproducibly from `seed` (a manifest hash: the same split, the same draw)."""
    chosen = list(paths)
    random.Random(seed).shuffle(chosen)
    return chosen[:n]


def folder_key(files: Sequence[Path]) -> str:
    """A key that changes when any of these files is added, removed, replaced or edited (names, sizes and
    modification times; nothing is read): a folder's fit is cached under it."""
    digest = hashlib.sha1()
    for path in sorted(files):
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "folder-" + digest.hexdigest()[:16]


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def data_framing(
    paths: Sequence[Path], key: str, cache_dir: Path, n: int, finders: Sequence[str] = FINDERS
) -> dict[str, dict[str, Any]]:
    """{finder: framing dict, or {"error": why}} for each of `finders`, fitted on up to n of the training
    images `paths`; cached in cache_dir by `key` (the manifest hash), so a sweep's trials fit once."""
    cache = Path(cache_dir) / f"{key}_framing.json"
    out = _cached_framings(cache, n)
    missing = [finder for finder in finders if finder not in out]
    chosen = sample_paths(paths, n, key) if missing else []
    for finder in missing:
        try:
            out[finder] = fit_framing((read_rgb(p) for p in chosen), finder).to_dict()
        except FramingError as exc:
            out[finder] = {"error": str(exc)}
        log.info("face framing (%s) of the training images: %s", finder, out[finder])
    if missing:
        stored = {"version": VERSION, "n": n, "framing": out}
        write_atomic(cache, (json.dumps(stored, indent=1) + "\n").encode())
    return {finder: out[finder] for finder in finders}


def _cached_framings(cache: Path, n: int) -> dict[str, dict[str, Any]]:
    """The framings kept in `cache` by this fitting procedure on n images ({} when none are)."""
    try:
        stored = json.loads(cache.read_text())
        if stored.get("version") == VERSION and stored.get("n") == n and isinstance(stored["framing"], dict):
            return dict(stored["framing"])
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    return {}


# UTKFace's aligned & cropped faces as fit_framing measured them (200 training-split images of
# ../shared/data/utkface); `data.framing=utkface` declares them for data made in that format (the generated
# set).
UTKFACE: dict[str, dict[str, Any]] = {
    "mtcnn": {
        "finder": "mtcnn",
        "ref": "landmarks",
        "scale": 1.7764,
        "dx": 0.0179,
        "dy": 0.0111,
        "angle": 0.17,
        "found": 200,
        "tried": 200,
        "scale_iqr": 0.105,
        "version": 2,
    },
    "haar": {
        "finder": "haar",
        "ref": "box",
        "scale": 0.9569,
        "dx": 0.0048,
        "dy": 0.0778,
        "angle": 0.0,
        "found": 178,
        "tried": 200,
        "scale_iqr": 0.0897,
        "version": 2,
    },
}


def manifest_framing(data: Any, cache_dir: str | Path, manifest: Any) -> dict[str, dict[str, Any]] | None:
    """The framing a run's checkpoint keeps, as `data.framing` says: fitted on the manifest's training
    images (fit), UTKFace's (utkface) or none."""
    how = str(data.get("framing", "none"))
    if how == "utkface":
        return UTKFACE
    if how == "none":
        return None
    if how != "fit":
        raise ValueError(f"data.framing={how!r}: valid: {' | '.join(FRAMINGS)}")
    train = manifest.subset("train")
    paths = [Path(manifest.root) / p for p in train["path"]]
    return data_framing(paths, manifest.hash, Path(cache_dir), int(data.get("framing_images", 200)))
