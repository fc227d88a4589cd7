"""Tiny UTKFace-like folders with every defect of the real set, for the data-layer tests."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# File name -> reason the scan must give (None: a valid record).
DEFECTS: dict[str, str | None] = {
    "39_1_20170116174525125.jpg.chip.jpg": None,  # race field missing -> ethnicity NA
    "24_0_1_20170116220224657 .jpg.chip.jpg": None,  # space before .jpg
    "55_0_0_20170116232725357jpg.chip.jpg": None,  # dot missing before jpg
    "30_1_3_20170116000000001.jpg": None,  # plain .jpg suffix
    "31_0_2_20170116000000002.png": None,  # plain .png suffix (P-mode PNG)
    "40_0_0_20170116000000003.jpg.chip.jpg": None,  # greyscale JPEG
    "41_1_1_20170116000000004.jpg.chip.jpg": None,  # CMYK JPEG
    "face.jpg": "unparseable name",
    "130_0_0_20170116000000005.jpg.chip.jpg": "age 130 out of range 0..116",
    "20_2_0_20170116000000006.jpg.chip.jpg": "gender 2 out of range 0..1",
    "20_0_7_20170116000000007.jpg.chip.jpg": "race 7 out of range 0..4",
    "25_0_0_20170116000000008.jpg.chip.jpg": "not an image: cannot identify image file",  # a .txt renamed
    "26_1_0_20170116000000009.jpg.chip.jpg": "truncated image",
    "27_0_4_20170116000000010.jpg.chip.jpg": "empty file",
    "notes.txt": "unsupported suffix '.txt' (expected one of .jpg, .jpeg, .png)",
}
# Byte-identical groups: labels agree (first two), labels conflict (next two).
AGREE = ("50_0_0_20170116000000020.jpg.chip.jpg", "50_0_0_20170116000000021.jpg.chip.jpg")
CONFLICT = ("60_0_0_20170116000000030.jpg.chip.jpg", "62_1_0_20170116000000031.jpg.chip.jpg")


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 24), mode: str = "RGB") -> bytes:
    """A small random JPEG (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def utk_name(age: int, gender: int, race: int | None, stamp: int) -> str:
    race_part = "" if race is None else f"_{race}"
    return f"{age}_{gender}{race_part}_{20170101000000000 + stamp}.jpg.chip.jpg"


def write_defect_folder(root: Path, n_valid: int = 12, seed: int = 0) -> Path:
    """`n_valid` valid faces + every entry of DEFECTS + the AGREE and CONFLICT copies + a hidden marker."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_valid):
        name = utk_name(int(rng.integers(1, 90)), i % 2, i % 5, 1000 + i)
        (root / name).write_bytes(jpeg_bytes(seed * 10_000 + i))
    for k, name in enumerate(DEFECTS):
        path = root / name
        if name.startswith("40_"):
            path.write_bytes(jpeg_bytes(500 + k, mode="L"))
        elif name.startswith("41_"):
            path.write_bytes(jpeg_bytes(500 + k, mode="CMYK"))
        elif name.endswith(".png"):
            Image.fromarray(np.arange(24 * 24, dtype=np.uint8).reshape(24, 24) % 7, "L").convert("P").save(
                path
            )
        elif name.startswith("25_"):
            path.write_bytes(b"this is a text file, not a JPEG\n")
        elif name.startswith("26_"):
            data = jpeg_bytes(500 + k, size=(64, 64))
            path.write_bytes(data[: len(data) // 2])
        elif name.startswith("27_"):
            path.write_bytes(b"")
        elif name == "notes.txt":
            path.write_text("not data\n")
        else:
            path.write_bytes(jpeg_bytes(500 + k))
    for name in AGREE:
        (root / name).write_bytes(jpeg_bytes(900))
    for name in CONFLICT:
        (root / name).write_bytes(jpeg_bytes(901))
    (root / ".agecls_synthetic.json").write_text("{}\n")
    return root


def valid_names(root: Path) -> list[str]:
    """Names in a defect folder that the scan must accept."""
    bad = {n for n, reason in DEFECTS.items() if reason is not None}
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in bad)


def fake_records(n: int = 3000, seed: int = 0, dup_every: int = 0) -> pd.DataFrame:
    """A records frame without files: skewed ages, genders, ethnicity with some NA; optional sha1 groups."""
    rng = np.random.default_rng(seed)
    ages = np.clip(np.round(rng.gamma(2.0, 16.0, n)), 0, 116).astype(int)
    eth = pd.array(rng.integers(0, 5, n), dtype="Int64")
    eth[rng.random(n) < 0.02] = pd.NA
    df = pd.DataFrame(
        {
            "path": [f"img_{i:05d}.jpg" for i in range(n)],
            "age": pd.array(ages, dtype="Int64"),
            "gender": pd.array(rng.integers(0, 2, n), dtype="Int64"),
            "ethnicity": eth,
            "sha1": [f"{i:040x}" for i in range(n)],
        }
    )
    if dup_every:  # every dup_every-th row is a copy (same bytes, same labels) of the row before it
        copies = np.arange(dup_every, n, dup_every)
        df.iloc[copies, 1:] = df.iloc[copies - 1, 1:].to_numpy()
    return df


def real_utkface_root() -> Path | None:
    """The real UTKFace folder (env AGECLS_UTKFACE, else ../shared/data/utkface by the repo) if present."""
    env = os.environ.get("AGECLS_UTKFACE")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/utkface"
    return root if root.is_dir() and any(root.iterdir()) else None


# `make utkface` cut to one epoch of a narrow trunk at 16 px, its face framing fitted on 24 training images:
# a real multitask model in seconds for the tests that need one
TINY_REAL = [
    "data.image_size=16",
    "model.base_channels=8",
    "model.hidden=32",
    "trainer.max_epochs=1",
    "data.framing_images=24",
]

REAL_SKIP_REASON = (
    "real UTKFace folder not found: set AGECLS_UTKFACE or place it at ../shared/data/utkface beside the repo"
)


def write_nested_folder(root: Path) -> Path:
    """2 faces at the top, 2 in part1/, 1 in part2/deep/, a name shared by part1/ and part2/ (other bytes), a
    byte-identical copy in part2/ of a part1/ face, and a hidden folder that is never read."""
    for rel, seed in [
        (utk_name(20, 0, 1, 1), 1),
        (utk_name(21, 1, 2, 2), 2),
        (f"part1/{utk_name(30, 0, 0, 3)}", 3),
        (f"part1/{utk_name(31, 1, 3, 4)}", 4),
        (f"part2/deep/{utk_name(40, 0, 4, 5)}", 5),
        (f"part2/{utk_name(30, 0, 0, 3)}", 6),  # same name as in part1/, other face
        (f"part2/{utk_name(31, 1, 3, 7)}", 4),  # same bytes as part1/'s 31_1_3 face
        (f".thumbs/{utk_name(50, 0, 0, 8)}", 8),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg_bytes(seed))
    return root
