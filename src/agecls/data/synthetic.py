"""Seeded synthetic faces written exactly like UTKFace 'aligned & cropped' files (the embedded default data).

Image i is drawn from its own child RNG, `SeedSequence(seed).spawn(n)[i]`, and its labels are row i of
`sample_labels(n, default_rng(seed))`, so neither depends on n: a larger generation extends a smaller one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from agecls.data._face_drawing import Face, draw_face, smoothstep

MARKER_NAME = ".agecls_synthetic.json"
UTKFACE_NAME = re.compile(r"^(\d+)_([01])_([0-4])_(\d{17})\.jpg\.chip\.jpg$")
RACE_SHARES = (0.42, 0.19, 0.15, 0.17, 0.07)  # white, black, asian, indian, other
_TMP_PREFIX = ".agecls-tmp-"
_FORMAT_VERSION = 1
_BABY_AGE_P = np.array([0.06, 0.42, 0.2, 0.13, 0.11, 0.08])  # ages 0..5; UTKFace has a spike at 1
_AGE_MIX = np.array([0.11, 0.06, 0.50, 0.255, 0.075])  # babies, children, young adults, middle-aged, elderly
_EPOCH = datetime(2016, 12, 1)
_SLOT_MS = 4000  # image i gets a timestamp inside its own 4 s slot, so names never collide
_PARALLEL_MIN = 400  # below this many images a process pool costs more than it saves
_SKIN_RAMP = np.array([[52, 34, 25], [100, 64, 44], [166, 116, 86], [220, 174, 144], [248, 218, 198]], float)
_RACE_LIGHTNESS = ((0.80, 0.06), (0.30, 0.08), (0.71, 0.06), (0.52, 0.08), (0.61, 0.10))  # mean, sd
_RACE_TINT = ((4, -3, -2), (0, 0, 0), (6, 5, -12), (5, 0, -6), (3, 1, -5))
_HAIR_WHITE = ((205, 170, 115), (140, 100, 62), (92, 62, 38), (45, 34, 26), (150, 72, 38))
_HAIR_WHITE_P = (0.15, 0.25, 0.33, 0.22, 0.05)
_HAIR_OTHER = ((22, 18, 16), (22, 18, 18), (18, 16, 16), (30, 24, 20), (55, 42, 32))  # per race
_EYES_WHITE = ((70, 110, 150), (85, 110, 70), (92, 60, 35))
_EYE_DARK = (48, 31, 22)


def sample_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) int array of (age, gender, race) shaped like UTKFace; row i is the same for every n > i."""
    u = rng.random((n, 5))  # one row of uniforms per image keeps rows stable when n changes
    comp = np.searchsorted(np.cumsum(_AGE_MIX), u[:, 0] * _AGE_MIX.sum(), side="right")
    u1 = np.clip(u[:, 1], 1e-12, 1 - 1e-12)
    normal = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u[:, 2])
    tail = 1 - np.exp(-54 / 11.0)  # exponential tail from 62, truncated at 116
    choices = [
        np.minimum(np.searchsorted(np.cumsum(_BABY_AGE_P), u[:, 1], side="right"), 5),
        6 + np.floor(u[:, 1] * 9),
        np.clip(np.rint(28 + 6.5 * normal), 15, 50),
        38 + np.floor(u[:, 1] * 31),
        62 + np.floor(-11.0 * np.log1p(-u[:, 1] * tail)),
    ]
    age = np.select([comp == k for k in range(5)], choices)
    gender = (u[:, 3] < 0.5).astype(int)
    race = np.minimum(np.searchsorted(np.cumsum(RACE_SHARES), u[:, 4], side="right"), 4)
    return np.stack([np.clip(age, 0, 116).astype(int), gender, race], 1)


def sample_face(age: int, gender: int, race: int, rng: np.random.Generator) -> Face:
    """Draw the traits of one face; visual age cues follow a noisy 'apparent age'."""
    a = max(0.0, age + rng.normal(0.0, 0.5 + 0.12 * age))
    male, m = gender == 0, smoothstep(a, 0.0, 16.0)  # m: maturity of the head proportions
    adult = smoothstep(a, 13.0, 19.0)
    mu, sd = _RACE_LIGHTNESS[race]
    light = float(np.clip(rng.normal(mu, sd) + 0.04 * (1 - m), 0.02, 0.99))
    skin = np.array([np.interp(light * 4, np.arange(5), _SKIN_RAMP[:, c]) for c in range(3)])
    skin += np.array(_RACE_TINT[race]) + rng.normal(0, 4, 3) + (1 - m) * np.array([8.0, -2, 0])
    if race == 0:
        base = np.array(_HAIR_WHITE[rng.choice(5, p=_HAIR_WHITE_P)], float)
    else:
        base = np.array(_HAIR_OTHER[race], float) * rng.uniform(0.8, 1.5)
    base = base + (1 - m) * 0.3 * (np.array([150.0, 115, 80]) - base) * (race == 0)  # lighter baby hair
    grey = float(np.clip((a - rng.normal(42, 7)) / 30, 0, 1))
    grey_to = np.array([150.0, 150, 152]) + grey * np.array([85.0, 85, 85])
    hair = base + min(1.0, grey * 1.2) * (grey_to - base)
    recede = 0.0
    if male and rng.random() < 0.75 * smoothstep(a, 28, 75):
        recede = rng.uniform(0.2, 1.6) * smoothstep(a, 25, 70)
    long_hair = rng.random() < (0.85 if not male else 0.06) * smoothstep(a, 2, 10)
    curly = rng.random() < (0.85 if race == 1 else 0.1)
    thick = (0.055 if long_hair else 0.03) + 0.035 * curly
    hair_end = rng.uniform(0.35, 0.75) if long_hair else rng.uniform(-0.02, 0.06)
    hairline = -0.20 - 0.05 * (1 - m) + rng.normal(0, 0.012)
    fringe = (not male or a < 12) and rng.random() < 0.3 * m
    beard = ""
    if male and rng.random() < 0.45 * adult:
        beard = "full" if rng.random() < 0.35 else "stubble"
    lip_tint = 0.45 if not male and adult and rng.random() < 0.4 else 0.22
    lip_red = np.array([175.0, 60, 70]) if lip_tint > 0.3 else np.array([190.0, 90, 90])
    clothes = rng.uniform(20, 230, 3)
    w = smoothstep(a, 28, 80)
    return Face(
        male=male,
        skin=skin,
        hair=hair,
        brow_color=(base + 0.6 * grey * (grey_to - base)) * 0.85,
        eye_color=np.array(
            _EYES_WHITE[rng.choice(3, p=(0.3, 0.15, 0.55))] if race == 0 else _EYE_DARK, float
        ),
        lips=skin + lip_tint * (lip_red - skin) * (1 - 0.4 * w),
        clothes=clothes,
        hair_alpha=0.15 + 0.85 * smoothstep(a, 0.0, 3.5) * rng.uniform(0.7, 1.0),
        hair_thick=thick * (0.35 + 0.65 * smoothstep(a, 0, 5)),
        hair_end=hair_end,
        hairline=hairline,
        recede=recede,
        fringe=fringe,
        curly=curly,
        beard=beard,
        hw=0.335 - 0.01 * (not male) + 0.035 * (1 - m) + rng.normal(0, 0.01),
        top=-(0.40 + 0.10 * (1 - m)) + rng.normal(0, 0.012),
        chin=0.29 + 0.14 * m + 0.015 * male * m + 0.012 * w + rng.normal(0, 0.012),
        jaw_p=2.0 + m * (0.8 if male else 0.3) + rng.normal(0, 0.1),
        taper=m * (0.16 if not male else 0.06) + rng.normal(0, 0.02),
        eye_dx=0.15 + 0.012 * (1 - m) + rng.normal(0, 0.005),
        ew=0.05 + 0.016 * (1 - m) + rng.normal(0, 0.003),
        eh=(0.30 if race == 2 else 0.42) + 0.15 * (1 - m) + rng.normal(0, 0.03),
        brow_y=-0.075 - 0.012 * (not male) - 0.01 * (1 - m) + rng.normal(0, 0.005),
        brow_th=(0.022 if male else 0.012) * (0.4 + 0.6 * adult) * (1 + 0.3 * w * male)
        + rng.normal(0, 0.002),
        nose_len=0.09 + 0.085 * m + 0.01 * w + rng.normal(0, 0.007),
        nose_w=0.032 + 0.012 * m + 0.012 * (race == 1) + rng.normal(0, 0.003),
        mouth_y=0.06 + 0.03 * m + rng.normal(0, 0.006),  # below the nose
        mouth_w=0.045 + 0.035 * m + 0.008 * male + rng.normal(0, 0.004),
        lip_th=(0.011 + 0.005 * m) * (1 - 0.35 * w) * (0.85 if male else 1.1),
        smile=rng.uniform(-0.004, 0.02),
        wrinkle=w * rng.uniform(0.6, 1.3),
        fold=smoothstep(a, 20, 70) * rng.uniform(0.5, 1.3),
        spots=int(rng.poisson(6 * smoothstep(a, 50, 95))),
        glasses=rng.random() < 0.06 * smoothstep(a, 5, 12) + 0.2 * smoothstep(a, 40, 80),
    )


def render_face(age: int, gender: int, race: int, rng: np.random.Generator, size: int = 200) -> np.ndarray:
    """Draw one face-like HxWx3 uint8 image whose appearance follows the labels (with noise)."""
    return draw_face(sample_face(int(age), int(gender), int(race), rng), rng, size)


def _image_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))


def _file_name(i: int, label: np.ndarray, rng: np.random.Generator) -> str:
    """UTKFace name of image i; draws its timestamp from the image's own RNG (the first draw)."""
    t = _EPOCH + timedelta(milliseconds=i * _SLOT_MS + int(rng.integers(0, _SLOT_MS)))
    stamp = t.strftime("%Y%m%d%H%M%S") + f"{t.microsecond // 1000:03d}"
    return f"{label[0]}_{label[1]}_{label[2]}_{stamp}.jpg.chip.jpg"


def _check_args(n: int, seed: int, image_size: int, quality: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")


def _marker_is_current(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(_TMP_PREFIX + path.name)
    write(tmp)
    os.replace(tmp, path)


def _write_images(
    root: Path, seed: int, image_size: int, quality: int, todo: list[tuple[int, list[int]]]
) -> None:
    """Render and write images (index, label) of one generation; runs in the caller or in a pool worker."""
    for i, label in todo:
        rng = _image_rng(seed, i)
        name = _file_name(i, np.asarray(label), rng)
        img = Image.fromarray(render_face(*label, rng, image_size), "RGB")
        _write_atomic(root / name, lambda p, img=img: img.save(p, "JPEG", quality=quality))


def _run_jobs(
    root: Path, seed: int, image_size: int, quality: int, todo: list[tuple[int, list[int]]]
) -> None:
    workers = min(os.cpu_count() or 1, 8)
    if len(todo) < _PARALLEL_MIN or workers < 2 or multiprocessing.current_process().daemon:
        _write_images(root, seed, image_size, quality, todo)
        return
    step = max(1, min(50, len(todo) // (4 * workers)))
    chunks = [todo[k : k + step] for k in range(0, len(todo), step)]
    with ProcessPoolExecutor(workers) as pool:
        for done in [pool.submit(_write_images, root, seed, image_size, quality, c) for c in chunks]:
            done.result()


def generate_synthetic(
    root: str | Path, n: int, seed: int = 0, image_size: int = 200, quality: int = 90
) -> Path:
    """Write n face-like JPEGs into root (created if missing), return root. Idempotent and cheap on re-run."""
    _check_args(n, seed, image_size, quality)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"synthetic data root {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    labels = sample_labels(n, np.random.default_rng(seed))
    names = [_file_name(i, label, _image_rng(seed, i)) for i, label in enumerate(labels)]
    params = {
        "generator": "agecls.data.synthetic",
        "version": _FORMAT_VERSION,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "quality": quality,
        "files": names,
    }
    marker = root / MARKER_NAME
    current = _marker_is_current(marker, params)
    if current and all((root / name).is_file() for name in names):
        return root
    expected = set(names) | {MARKER_NAME}
    foreign = sorted(
        p.name for p in root.iterdir() if p.name not in expected and not p.name.startswith(_TMP_PREFIX)
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"folder {root} holds files that are not from this synthetic generation (n={n}, seed={seed}, "
            f"image_size={image_size}, quality={quality}): {shown}. "
            "Use an empty or new folder; nothing was deleted."
        )
    if marker.exists():
        marker.unlink()  # from now on the folder is mid-generation until the new marker lands
    todo = [
        (i, labels[i].tolist()) for i, name in enumerate(names) if not (current and (root / name).is_file())
    ]
    _run_jobs(root, seed, image_size, quality, todo)
    for leftover in root.glob(_TMP_PREFIX + "*"):
        leftover.unlink()
    _write_atomic(marker, lambda p: p.write_text(json.dumps(params, indent=1)))
    return root


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m agecls.data.synthetic ROOT N [--seed S]."""
    parser = argparse.ArgumentParser(description="Write synthetic UTKFace-style face images into a folder.")
    parser.add_argument("root", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=200)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)
    root = generate_synthetic(args.root, args.n, args.seed, args.image_size, args.quality)
    print(f"{args.n} synthetic images in {root}")


if __name__ == "__main__":
    main()
