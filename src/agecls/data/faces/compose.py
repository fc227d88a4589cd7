"""Photos made of face crops: each crop resized, slightly rotated and pasted with feathered edges onto a
blurred background of random shapes, its square recorded. The photo path (find, frame, crop) can then be
scored against the same faces given as crops (bench/photos.py, tests/test_photo_path.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from agecls.data.faces.framing import square_iou

SIZE = (960, 720)


@dataclass(frozen=True)
class Pasted:
    """Where face `index` of the list given to `compose` went: its square (x, y, side) and its rotation."""

    index: int
    x: int
    y: int
    side: int
    angle: float


def background(rng: random.Random, size: tuple[int, int] = SIZE) -> Image.Image:
    """Smooth colour gradients and a few rectangles, blurred: a scene with edges but no faces."""
    w, h = size
    cols, rows = rng.randrange(4, 12), rng.randrange(3, 9)
    cells = np.array([rng.randrange(256) for _ in range(cols * rows * 3)], dtype=np.uint8)
    img = Image.fromarray(cells.reshape(rows, cols, 3)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(3, 10)):
        x, y = rng.randrange(w), rng.randrange(h)
        fill = tuple(rng.randrange(256) for _ in range(3))
        draw.rectangle((x, y, x + rng.randrange(30, 300), y + rng.randrange(30, 300)), fill=fill)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(2, 8)))


def _feather(side: int, share: float = 0.03) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    k = max(2, int(side * share))
    ImageDraw.Draw(mask).rectangle((k, k, side - k, side - k), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(k / 2))


def _place(rng: random.Random, side: int, taken: list[Pasted], size: tuple[int, int]) -> tuple[int, int]:
    """A top-left corner where a square of `side` overlaps no square already placed (else the last tried)."""
    x = y = 0
    for _ in range(100):
        x, y = rng.randrange(0, size[0] - side), rng.randrange(0, size[1] - side)
        if all(
            abs(x - t.x) >= (side + t.side) // 2 + 8 or abs(y - t.y) >= (side + t.side) // 2 + 8
            for t in taken
        ):
            break
    return x, y


def compose(
    faces: list[Image.Image],
    rng: random.Random,
    *,
    sides: tuple[int, int] = (220, 420),
    max_angle: float = 10.0,
    size: tuple[int, int] = SIZE,
) -> tuple[Image.Image, list[Pasted]]:
    """One photo holding every face of `faces` (sides drawn from `sides`, rotated up to max_angle degrees)."""
    photo = background(rng, size)
    pasted: list[Pasted] = []
    for i, face in enumerate(faces):
        side = rng.randrange(*sides)
        x, y = _place(rng, side, pasted, size)
        angle = rng.uniform(-max_angle, max_angle)
        tile = face.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        mask = _feather(side)
        if angle:
            tile = tile.rotate(angle, Image.Resampling.BILINEAR)
            mask = mask.rotate(angle, Image.Resampling.BILINEAR)
        photo.paste(tile, (x, y), mask)
        pasted.append(Pasted(i, x, y, side, round(angle, 2)))
    return photo, pasted


def match(
    squares: list[tuple[float, float, float]], pasted: list[Pasted], min_iou: float = 0.4
) -> tuple[dict[int, int], list[float]]:
    """{found square -> pasted face} pairing each pasted face with the found square overlapping it most
    (IoU >= min_iou, each used once), and the IoUs of the pairs; unpaired squares are extra boxes."""
    truth = [(p.x + p.side / 2, p.y + p.side / 2, float(p.side)) for p in pasted]
    pairs = sorted(
        ((square_iou(s, t), i, j) for i, s in enumerate(squares) for j, t in enumerate(truth)), reverse=True
    )
    found: dict[int, int] = {}
    used: set[int] = set()
    ious = []
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i not in found and j not in used:
            found[i] = pasted[j].index
            used.add(j)
            ious.append(iou)
    return found, ious
