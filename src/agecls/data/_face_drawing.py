"""Drawing of one synthetic face: polygons with PIL at 2x, then pose, light and noise (for `synthetic`).

Face units: 1.0 = image width, origin between the eyes, y grows downwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def smoothstep(x: float, lo: float, hi: float) -> float:
    """0 below lo, 1 above hi, smooth in between."""
    t = min(max((x - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class Face:
    """Appearance of one face: colours (RGB float arrays), shape and age cues in face units."""

    male: bool
    skin: np.ndarray
    hair: np.ndarray
    brow_color: np.ndarray
    eye_color: np.ndarray
    lips: np.ndarray
    clothes: np.ndarray
    hair_alpha: float  # babies have thin, see-through hair
    hair_thick: float
    hair_end: float  # y where hair at the sides/back stops (long hair reaches the shoulders)
    hairline: float
    recede: float  # 0 full hairline .. >1 bald crown
    fringe: bool
    curly: bool
    beard: str  # "", "stubble" or "full"
    hw: float  # half face width
    top: float  # skull top
    chin: float
    jaw_p: float  # superellipse exponent of the lower face: 2 round, larger square
    taper: float
    eye_dx: float
    ew: float
    eh: float
    brow_y: float
    brow_th: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_th: float
    smile: float
    wrinkle: float  # forehead lines, crow's feet, eye bags
    fold: float  # nasolabial folds
    spots: int
    glasses: bool


def _col(c: np.ndarray, scale: float = 1.0, alpha: int = 255) -> tuple[int, int, int, int]:
    r, g, b = (min(255, max(0, int(v * scale))) for v in c)
    return r, g, b, alpha


def ellipse(
    cx: float, cy: float, rx: float, ry: float, n: int = 28, t0: float = 0.0, t1: float = 2 * math.pi
):
    """Points of an elliptical arc (or a whole ellipse) as an (n, 2) array."""
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


class Canvas:
    """Draws shapes given in face units through one pose: yaw, scale, in-plane rotation and shift."""

    def __init__(self, img: Image.Image, cx: float, cy: float, scale: float, angle: float, yaw: float):
        self.draw, self.px = ImageDraw.Draw(img, "RGBA"), img.size[0]
        self.c, self.s, self.yaw = np.array([cx, cy]), scale, yaw
        self.rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def xy(self, pts: np.ndarray, depth: float = 0.0) -> list[float]:
        p = np.array(pts, float).reshape(-1, 2)
        p[:, 0] += self.yaw * (np.sqrt(np.maximum(1 - (p[:, 0] / 0.36) ** 2, 0)) * 0.3 + depth)
        return ((self.c + self.s * p @ self.rot.T) * self.px).ravel().tolist()

    def poly(self, pts: np.ndarray, fill: tuple, depth: float = 0.0) -> None:
        self.draw.polygon(self.xy(pts, depth), fill=fill)

    def points(self, pts: np.ndarray, fill: tuple) -> None:
        self.draw.point(self.xy(pts), fill=fill)

    def line(self, pts: np.ndarray, fill: tuple, width: float, depth: float = 0.0) -> None:
        w = max(1, round(width * self.s * self.px))
        self.draw.line(self.xy(pts, depth), fill=fill, width=w, joint="curve")


def _face_outline(f: Face, y0: float = 0.05, n: int = 40) -> np.ndarray:
    up = ellipse(0, y0, f.hw, y0 - f.top, n, math.pi, 2 * math.pi)
    t = np.linspace(0, math.pi, n)
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / f.jaw_p
    x = f.hw * np.sign(c) * np.abs(c) ** e * (1 - f.taper * s**2)
    y = y0 + (f.chin - y0) * s**e
    return np.concatenate([up, np.stack([x, y], 1)])


def _hair_cap(f: Face, n: int = 41) -> np.ndarray:
    """Hair over the skull: the skull contour down to a hairline that dips to the sides at the temples."""
    x = np.linspace(-f.hw - 0.004, f.hw + 0.004, n)
    y_top = 0.05 - (0.05 - f.top + f.hair_thick) * np.sqrt(np.clip(1 - (x / (f.hw + 0.004)) ** 2, 0, 1))
    rel = np.abs(x) / f.hw
    line = f.hairline - f.recede * (0.14 - 0.06 * np.exp(-((rel / 0.25) ** 2)))  # M-shaped recession
    if f.fringe:
        line = np.maximum(line, f.brow_y - 0.035 - 0.03 * rel**2)
    side_end = min(f.hair_end, 0.25)
    line = line + (side_end - line) * np.clip(rel, 0, 1) ** 6
    line = np.maximum(line, y_top)
    return np.concatenate([np.stack([x, y_top], 1), np.stack([x, line], 1)[::-1]])


def _eye(cv: Canvas, f: Face, side: int, rng: np.random.Generator, size_k: float) -> None:
    cx, ew, eh = side * f.eye_dx, f.ew * size_k, f.ew * f.eh * size_k
    x = np.linspace(-ew, ew, 15)
    upper = -eh * (1 - (x / ew) ** 2) ** 0.7 - 0.1 * eh * side * x / ew
    lower = 0.75 * eh * (1 - (x / ew) ** 2) ** 0.9
    almond = np.concatenate([np.stack([cx + x, upper], 1), np.stack([cx + x, lower], 1)[::-1]])
    skin = _col(f.skin)
    cv.poly(almond, (236, 232, 226, 255))
    r = min(ew * 0.48, eh * 1.25)
    gx = cx + rng.normal(0, 0.15) * ew
    cv.poly(ellipse(gx, 0.05 * eh, r, r, 20), _col(f.eye_color))
    cv.poly(ellipse(gx, 0.05 * eh, r * 0.45, r * 0.45, 14), (15, 12, 12, 255))
    cv.poly(ellipse(gx + 0.3 * r, -0.3 * r, 0.18 * r, 0.18 * r, 10), (250, 250, 250, 220))
    cap = -max(r, eh) - 0.01
    cv.poly(np.concatenate([np.stack([cx + x, upper], 1), [[cx + ew, cap], [cx - ew, cap]]]), skin)
    cv.poly(np.concatenate([np.stack([cx + x, lower], 1), [[cx + ew, r + 0.01], [cx - ew, r + 0.01]]]), skin)
    lid_w = 0.006 if f.male else 0.009
    cv.line(np.stack([cx + x * 1.05, upper - 0.002], 1), (30, 22, 20, 230), lid_w)
    cv.line(np.stack([cx + x * 0.9, lower], 1), _col(f.skin, 0.75, 160), 0.003)
    if f.eh > 0.36:  # lid crease
        cv.line(np.stack([cx + x * 0.9, upper * 1.1 - 0.014], 1), _col(f.skin, 0.78, 180), 0.004)
    if f.wrinkle > 0.25:  # hooded lid, bags and crow's feet
        k = min(1.0, f.wrinkle)
        hood = np.stack([cx + x, upper - 0.004 + k * 0.35 * eh * (side * x / ew + 1) / 2], 1)
        cv.poly(np.concatenate([hood, [[cx + ew, cap], [cx - ew, cap]]]), skin)
        for j in range(1 + int(2 * k)):
            yb = lower + 0.012 + 0.01 * j
            cv.line(np.stack([cx + x * 0.8, yb], 1), _col(f.skin, 1 - 0.35 * k, 200), 0.004)
        for t in np.linspace(-0.5, 0.6, 2 + int(2 * k)):
            p0 = np.array([cx + side * (ew + 0.008), 0.0])
            d = np.array([side * math.cos(t), math.sin(t)]) * (0.02 + 0.03 * k)
            cv.line(np.stack([p0, p0 + d]), _col(f.skin, 1 - 0.4 * k, 220), 0.004)


def _brow(cv: Canvas, f: Face, side: int, alpha: int) -> None:
    x = np.linspace(-0.07, 0.075, 12)
    arch = f.brow_y - 0.016 * (1 - ((x - 0.01) / 0.075) ** 2)
    th = f.brow_th * (1.1 - 0.5 * (x + 0.07) / 0.145)
    top = np.stack([side * (f.eye_dx + x), arch - th / 2], 1)
    bot = np.stack([side * (f.eye_dx + x), arch + th / 2], 1)
    cv.poly(np.concatenate([top, bot[::-1]]), _col(f.brow_color, 1.0, alpha))


def _mouth(cv: Canvas, f: Face) -> None:
    y, w = f.nose_len + f.mouth_y, f.mouth_w
    x = np.linspace(-w, w, 17)
    mid = y - f.smile * (1 - (x / w) ** 2) + f.smile
    up = mid - f.lip_th * (1 - (x / w) ** 2) ** 0.5 * (1 + 0.25 * np.cos(x / w * 9) * (np.abs(x) < w / 3))
    lo = mid + 1.35 * f.lip_th * (1 - (x / w) ** 2) ** 0.6
    cv.poly(np.concatenate([np.stack([x, up], 1), np.stack([x, mid], 1)[::-1]]), _col(f.lips, 0.9))
    cv.poly(np.concatenate([np.stack([x, mid], 1), np.stack([x, lo], 1)[::-1]]), _col(f.lips))
    cv.line(np.stack([x, mid], 1), _col(f.lips, 0.45, 230), 0.004)


def _wrinkles(cv: Canvas, f: Face, rng: np.random.Generator) -> None:
    k = min(1.2, f.wrinkle)
    for j in range(min(5, int(k * 5 + rng.random()))):  # forehead lines
        y = f.brow_y - 0.042 - 0.022 * j + rng.normal(0, 0.004)
        x = np.linspace(-0.16 + rng.normal(0, 0.02), 0.16 + rng.normal(0, 0.02), 9)
        wav = y + 0.012 * (x / 0.16) ** 2 + rng.normal(0, 0.002, 9)
        cv.line(np.stack([x, wav], 1), _col(f.skin, 0.85 - 0.3 * k, 230), 0.006)
        cv.line(np.stack([x, wav + 0.007], 1), _col(f.skin, 1.15, 130), 0.004)
    if f.fold > 0.15:  # nasolabial folds and, later, marionette lines
        for side in (-1, 1):
            p = np.array([[f.nose_w + 0.014, f.nose_len - 0.01], [f.nose_w + 0.04, f.nose_len + 0.04]])
            p = np.concatenate([p, [[f.mouth_w + 0.02, f.nose_len + f.mouth_y + 0.035]]])
            p[:, 0] *= side
            cv.line(p, _col(f.skin, 1 - 0.3 * min(1.0, f.fold), 220), 0.006)
            if f.wrinkle > 0.6:
                y = f.nose_len + f.mouth_y
                q = np.array([[side * (f.mouth_w + 0.005), y + 0.01], [side * (f.mouth_w + 0.015), y + 0.08]])
                cv.line(q, _col(f.skin, 1 - 0.25 * k, 200), 0.005)
    for _ in range(f.spots):
        x, y = rng.uniform(-0.22, 0.22), rng.uniform(-0.3, 0.25)
        r = rng.uniform(0.004, 0.01)
        cv.poly(ellipse(x, y, r, r * rng.uniform(0.7, 1.3), 10), _col(f.skin * [0.8, 0.68, 0.55], 1.0, 150))


def draw_face(f: Face, rng: np.random.Generator, size: int, supersample: int = 2) -> np.ndarray:
    """Render the face with pose, background, lighting, noise and blur; returns HxWx3 uint8."""
    big = size * supersample
    bg = rng.uniform(35, 220) + rng.normal(0, 18, 3) + rng.normal(0, 1, (3, 3, 3)) * rng.uniform(5, 35)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).resize((big // 4, big // 4), Image.BILINEAR)
    img = img.resize((big, big), Image.NEAREST)
    yaw = float(np.clip(rng.normal(0, 0.12), -0.3, 0.3))
    cv = Canvas(
        img,
        0.5 + rng.normal(0, 0.015),
        0.45 + rng.normal(0, 0.015),
        rng.uniform(0.92, 1.08),
        rng.normal(0, 0.08),
        yaw,
    )
    skin, hair = _col(f.skin), _col(f.hair, 1.0, int(255 * f.hair_alpha))
    cv.poly(ellipse(0, f.chin + 0.42, 0.62, 0.36), _col(f.clothes))
    if f.hair_end > 0.2:  # long hair falling behind the head and onto the shoulders
        t = ellipse(0, 0.05, f.hw + f.hair_thick, 0.05 - f.top + f.hair_thick, 30, math.pi, 2 * math.pi)
        back = np.concatenate(
            [[[-(f.hw + f.hair_thick) * 1.15, f.hair_end]], t, [[(f.hw + f.hair_thick) * 1.15, f.hair_end]]]
        )
        cv.poly(back, hair)
        for _ in range(10):
            x0 = rng.uniform(f.hw * 0.75, f.hw + f.hair_thick) * rng.choice([-1, 1])
            strand = np.array([[x0, rng.uniform(-0.1, 0.1)], [x0 * 1.08, f.hair_end - 0.03]])
            cv.line(strand, _col(f.hair, rng.uniform(0.6, 1.4), 120), 0.006)
    neck_w = 0.15 + 0.03 * f.male
    cv.poly(
        np.array(
            [[-neck_w, f.chin - 0.15], [neck_w, f.chin - 0.15], [neck_w * 1.1, 0.8], [-neck_w * 1.1, 0.8]]
        ),
        _col(f.skin, 0.8),
    )
    if f.hair_end <= 0.2:
        for side in (-1, 1):
            cv.poly(ellipse(side * (f.hw - 0.005), 0.06, 0.032, 0.07, 16), _col(f.skin, 0.9))
    outline = _face_outline(f, n=40)
    cv.poly(outline, _col(f.skin, 0.86))
    cv.poly(outline * 0.965 + [0, 0.005], _col(f.skin, 0.93))
    cv.poly(outline * 0.93 + [0, 0.01], skin)
    cv.poly(ellipse(0, -0.15, 0.15, 0.07, 16), _col(f.skin, 1.06, 90))
    blush = 70 * (1 - smoothstep(f.chin, 0.33, 0.42)) + 25 * (not f.male)
    for side in (-1, 1):
        cv.poly(ellipse(side * 0.17, 0.12, 0.06, 0.04, 16), (225, 110, 110, int(blush)))
    if f.beard:
        lo = outline[40:]
        lo = lo[lo[:, 1] > 0.06]
        x = np.linspace(lo[-1, 0], lo[0, 0], 15)
        top = 0.06 + (f.nose_len + 0.03 - 0.06) * (1 - (x / f.hw) ** 4)
        shade = f.hair * 0.8 if f.beard == "full" else np.minimum(f.hair * 0.8, f.skin * 0.55)
        cv.poly(
            np.concatenate([lo, np.stack([x, top], 1)]), _col(shade, 1.0, 45 if f.beard == "stubble" else 235)
        )
        if f.beard == "stubble":
            xy = rng.uniform([-f.hw, f.nose_len + 0.02], [f.hw, f.chin], (600, 2)) * [0.85, 1]
            cv.points(
                xy[xy[:, 1] > 0.06 + (f.nose_len - 0.03) * (1 - (xy[:, 0] / f.hw) ** 4)],
                _col(shade, 0.8, 150),
            )
        for _ in range(40 if f.beard == "full" else 0):
            x, y = rng.uniform(-0.8, 0.8) * f.hw, rng.uniform(f.nose_len + 0.05, f.chin - 0.02)
            cv.line(np.array([[x, y], [x + rng.normal(0, 0.006), y + 0.012]]), _col(f.hair, 1.25, 140), 0.004)
    _wrinkles(cv, f, rng)
    size_far = 1.0 - 0.25 * abs(yaw)
    for side in (-1, 1):
        k = size_far if side * yaw < 0 else 1.0
        _eye(cv, f, side, rng, k)
        _brow(cv, f, side, int(255 * (0.35 + 0.65 * f.hair_alpha)))
    nl, nw = f.nose_len, f.nose_w
    for side in (-1, 1):
        cv.line(
            np.array([[side * 0.025, 0.01], [side * 0.03, nl * 0.6], [side * nw, nl - 0.01]]),
            _col(f.skin, 0.85, 160),
            0.006,
            depth=0.02,
        )
        cv.poly(ellipse(side * nw * 0.5, nl, nw * 0.32, nw * 0.18, 12), _col(f.skin, 0.5, 220), depth=0.03)
    cv.poly(ellipse(0, nl - 0.02, nw * 0.45, 0.02, 12), _col(f.skin, 1.08, 140), depth=0.05)
    if f.beard == "full":
        x = np.linspace(-f.mouth_w - 0.01, f.mouth_w + 0.01, 9)
        must = np.stack([x, nl + 0.018 + 0.01 * (x / f.mouth_w) ** 2], 1)
        cv.poly(np.concatenate([must, must[::-1] + [0, f.mouth_y - 0.02]]), _col(f.hair, 0.75))
    _mouth(cv, f)
    cv.poly(_hair_cap(f), hair)
    if f.curly and f.hair_alpha > 0.5:  # small curls along the crown
        for _ in range(30):
            t, d = rng.uniform(math.pi * 1.05, math.pi * 1.95), rng.uniform(0.0, 0.5)
            x = (f.hw + f.hair_thick * d) * math.cos(t)
            y = 0.05 + (0.05 - f.top + f.hair_thick * d) * math.sin(t)
            r = f.hair_thick * rng.uniform(0.15, 0.3)
            cv.line(ellipse(x, y, r, r, 8, 0, 5), _col(f.hair, rng.uniform(0.7, 1.4), 160), 0.004)
    elif f.hair_alpha > 0.5:  # strands
        for _ in range(8):
            t = rng.uniform(math.pi * 1.1, math.pi * 1.9)
            rx, ry = f.hw + f.hair_thick * 0.5, 0.05 - f.top + f.hair_thick * 0.5
            cv.line(ellipse(0, 0.05, rx, ry, 8, t, t + 0.35), _col(f.hair, rng.uniform(0.6, 1.4), 140), 0.005)
    if f.glasses:
        for side in (-1, 1):
            cv.line(ellipse(side * f.eye_dx, 0.0, 0.075, 0.05, 24), (25, 25, 30, 240), 0.008)
        cv.line(np.array([[-f.eye_dx + 0.075, -0.01], [f.eye_dx - 0.075, -0.01]]), (25, 25, 30, 240), 0.008)
    img = img.reduce(supersample) if supersample > 1 else img
    radius = rng.uniform(0.0, 1.0)
    if radius > 0.4:
        img = img.filter(ImageFilter.BoxBlur(radius))
    arr = np.array(img, np.float32)
    phi, k = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.35)
    g = np.linspace(-1, 1, size, dtype=np.float32)
    light = 1 + k * (g[None, :] * math.cos(phi) + g[:, None] * math.sin(phi)) / 2
    gain = (rng.uniform(0.8, 1.12) * (1 + rng.normal(0, 0.04, 3))).astype(np.float32)
    arr *= light[:, :, None] * gain  # lighting gradient, exposure and white balance
    arr += rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(1, 6) + 0.5
    return np.clip(arr, 0, 255, out=arr).astype(np.uint8)
