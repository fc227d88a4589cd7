"""One call for every face finder: `find(rgb, finder, min_face)` -> faces with box, score and eye centres.

`mtcnn` (the default; mtcnn.py) finds more faces with fewer false boxes than OpenCV's Haar cascades (`haar`,
the fallback) and gives landmarks; BENCHMARKS.md (photos) has the measured comparison. Photos larger than
MAX_SIDE on their longer side are searched at that size and the boxes mapped back: the same faces, in less
time."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

FINDERS = ("mtcnn", "haar")
MAX_SIDE = 1024
BORDER = 0.15  # of the photo's longer side, grey, on every side while searching
# smallest face searched in the (reduced) photo: MTCNN's first net sees 12 px, and every pixel below 20 px
# more than doubles its memory on a large photo for faces it would rarely find
MIN_SIDE = 20
MTCNN_THRESHOLDS = (0.6, 0.7, 0.95)  # P-Net, R-Net, O-Net: the last is the face score a box must reach


@dataclass(frozen=True)
class Found:
    """A face: box (x, y, w, h) in the photo's pixels, score (1.0 for Haar, which gives none), the two eye
    centres ((2, 2), the one on the image's left first; None when not found), the finder's name, and its
    five landmarks ((5, 2): eyes, nose, mouth corners; MTCNN only)."""

    box: tuple[float, float, float, float]
    score: float
    eyes: np.ndarray | None
    finder: str
    landmarks: np.ndarray | None = None

    @property
    def angle(self) -> float | None:
        """Degrees the eye line is tilted (image y down), None without eyes."""
        if self.eyes is None:
            return None
        dx, dy = self.eyes[1] - self.eyes[0]
        return float(np.degrees(np.arctan2(dy, dx)))


def check_finder(finder: str) -> str:
    """The finder's name, or ValueError naming the valid ones."""
    if finder not in FINDERS:
        raise ValueError(f"finder={finder!r}: valid: {' | '.join(FINDERS)}")
    return finder


def find(rgb: np.ndarray, finder: str = "mtcnn", min_face: int = 24) -> list[Found]:
    """Every face of an (H, W, 3) RGB uint8 photo, largest first."""
    import cv2

    check_finder(finder)
    scale = min(1.0, MAX_SIDE / max(rgb.shape[:2]))
    small = rgb
    if scale < 1:
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    min_side = max(MIN_SIDE, round(min_face * scale))
    # a grey border lets the finder see a face cut by the frame whole (a tight crop, a face at the edge)
    pad = round(BORDER * max(small.shape[:2]))
    framed = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(127, 127, 127))
    found = _mtcnn(framed, min_side) if finder == "mtcnn" else _haar(framed, min_side)
    found = [_moved(f, -pad) for f in found]
    if scale < 1:
        found = [enlarged(f, 1 / scale) for f in found]
    found.sort(key=lambda f: -f.box[2] * f.box[3])
    log.debug("%s: %d faces in a %dx%d photo", finder, len(found), rgb.shape[1], rgb.shape[0])
    return found


def enlarged(face: Found, factor: float) -> Found:
    """The face with every coordinate multiplied by `factor` (found on a photo `factor` times smaller)."""
    return Found(
        tuple(v * factor for v in face.box),
        face.score,
        None if face.eyes is None else face.eyes * factor,
        face.finder,
        None if face.landmarks is None else face.landmarks * factor,
    )


def _moved(face: Found, by: float) -> Found:
    """The face with every coordinate moved by `by` pixels on both axes."""
    x, y, w, h = face.box
    eyes = None if face.eyes is None else face.eyes + by
    marks = None if face.landmarks is None else face.landmarks + by
    return Found((x + by, y + by, w, h), face.score, eyes, face.finder, marks)


def _mtcnn(rgb: np.ndarray, min_face: int) -> list[Found]:
    from agecls.data.faces.mtcnn import detect

    return [
        Found(d.box, d.score, d.landmarks[:2].astype(np.float64), "mtcnn", d.landmarks.astype(np.float64))
        for d in detect(rgb, min_face, MTCNN_THRESHOLDS)
    ]


def _haar(rgb: np.ndarray, min_face: int) -> list[Found]:
    import cv2

    from agecls.data.faces.haar import detect_boxes, eye_centres

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return [
        Found(tuple(float(v) for v in box), 1.0, eye_centres(gray, box), f"haar:{name}")
        for box, name in detect_boxes(gray, min_face)
    ]
