"""Synthetic UTKFace-style data: file format, determinism, idempotence, label shape and visual signal."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agecls.data import synthetic
from agecls.data.synthetic import MARKER_NAME, generate_synthetic, render_face, sample_labels

NAME = re.compile(r"^(\d+)_([01])_([0-4])_(\d{17})\.jpg\.chip\.jpg$")


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name != MARKER_NAME)


def _by_index(root: Path) -> list[Path]:
    """Files in generation order: timestamps grow with the image index."""
    return sorted(_images(root), key=lambda p: NAME.match(p.name).group(4))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "faces", 12, seed=3)


def test_names_and_images_follow_utkface_format(small: Path) -> None:
    files = _images(small)
    assert len(files) == 12
    assert (small / MARKER_NAME).is_file()
    for path in files:
        m = NAME.match(path.name)
        assert m, path.name
        age, gender, race = int(m.group(1)), int(m.group(2)), int(m.group(3))
        assert 0 <= age <= 116 and gender in (0, 1) and 0 <= race <= 4
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (200, 200)
    assert len({NAME.match(p.name).group(4) for p in files}) == 12  # timestamps alone are unique


def test_names_carry_the_sampled_labels(small: Path) -> None:
    labels = sample_labels(12, np.random.default_rng(3))
    parsed = [[int(g) for g in NAME.match(p.name).groups()[:3]] for p in _by_index(small)]
    assert parsed == labels.tolist()


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a, b = generate_synthetic(tmp_path / "a", 6, seed=7), generate_synthetic(tmp_path / "b", 6, seed=7)
    c = generate_synthetic(tmp_path / "c", 6, seed=8)
    fa, fb, fc = _by_index(a), _by_index(b), _by_index(c)
    assert [p.name for p in fa] == [p.name for p in fb]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(fa, fb, strict=True))
    assert [p.name for p in fa] != [p.name for p in fc]
    assert all(p.read_bytes() != q.read_bytes() for p, q in zip(fa, fc, strict=True))


def test_image_i_does_not_depend_on_n(tmp_path: Path) -> None:
    five, ten = (
        _by_index(generate_synthetic(tmp_path / "5", 5, 1)),
        _by_index(generate_synthetic(tmp_path / "10", 10, 1)),
    )
    assert [p.name for p in five] == [p.name for p in ten[:5]]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(five, ten[:5], strict=True))


def test_process_pool_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = _by_index(generate_synthetic(tmp_path / "serial", 8, seed=4))
    monkeypatch.setattr(synthetic, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 2)
    pooled = _by_index(generate_synthetic(tmp_path / "pooled", 8, seed=4))
    assert [(p.name, p.read_bytes()) for p in pooled] == [(p.name, p.read_bytes()) for p in serial]


def test_second_call_is_a_no_op(small: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in small.iterdir()}
    assert generate_synthetic(small, 12, seed=3) == small
    assert {p.name: p.stat().st_mtime_ns for p in small.iterdir()} == before


def test_interrupted_generation_is_completed(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "r", 4, seed=2)
    reference = {p.name: p.read_bytes() for p in _images(root)}
    (root / MARKER_NAME).unlink()
    _by_index(root)[-1].unlink()
    generate_synthetic(root, 4, seed=2)
    assert {p.name: p.read_bytes() for p in _images(root)} == reference
    assert (root / MARKER_NAME).is_file()


def test_foreign_files_raise_and_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match=str(root)):
        generate_synthetic(root, 3, seed=0)
    assert (root / "holiday.jpg").read_bytes() == b"not ours"
    other = generate_synthetic(tmp_path / "other", 3, seed=0)
    with pytest.raises(ValueError, match="not from this synthetic generation"):
        generate_synthetic(other, 3, seed=1)  # a different generation counts as foreign too
    assert len(_images(other)) == 3


def test_label_distribution_looks_like_utkface() -> None:
    labels = sample_labels(5000, np.random.default_rng(0))
    age, gender, race = labels.T
    assert age.min() >= 0 and age.max() <= 116 and (age > 90).sum() >= 5
    assert np.mean((age >= 20) & (age <= 40)) > 0.35
    assert 0.05 < np.mean(age <= 5) < 0.20
    assert np.mean((age >= 7) & (age <= 14)) < np.mean(age <= 5)  # fewer children than babies
    assert 0.45 < gender.mean() < 0.55
    shares = np.bincount(race, minlength=5) / len(race)
    assert shares.argmax() == 0 and 0.37 < shares[0] < 0.47 and shares[4] < 0.1
    assert (sample_labels(50, np.random.default_rng(0)) == labels[:50]).all()


def _faces(age: int, race: int, gender: int | None = None, n: int = 40) -> np.ndarray:
    """Grey images of n faces with fixed labels (gender alternating when None), from fixed seeds."""
    genders = [i % 2 if gender is None else gender for i in range(n)]
    gen = [render_face(age, g, race, np.random.default_rng([5, age, race, i])) for i, g in enumerate(genders)]
    return np.stack(gen).astype(np.float32).mean(axis=3)


def _box(x: np.ndarray, r: int) -> np.ndarray:
    c = np.cumsum(np.cumsum(np.pad(x, ((0, 0), (r + 1, r), (r + 1, r))), 1), 2)
    k = 2 * r + 1
    return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / k**2


def _forehead_energy(grey: np.ndarray) -> np.ndarray:
    """Band-pass energy (3x3 minus 7x7 box mean) between brows and hairline; pixel noise averages out."""
    patch = grey[:, 56:69, 70:130]
    return ((_box(patch, 1) - _box(patch, 3))[:, 3:-3, 3:-3] ** 2).mean(axis=(1, 2))


def test_age_shows_in_hair_and_wrinkles() -> None:
    young, old = _faces(25, 0), _faces(70, 0)
    assert old[:, 4:30, 70:130].mean() > young[:, 4:30, 70:130].mean() + 40  # grey and white hair
    young_men, old_men = _faces(25, 0, gender=0), _faces(70, 0, gender=0)  # no fringe over the forehead
    assert np.median(_forehead_energy(old_men)) > 2.5 * np.median(_forehead_energy(young_men))


def test_babies_have_rounder_larger_heads() -> None:
    """The chin of a baby sits higher: the rows below the face are darker/other than skin more often."""
    babies, adults = _faces(1, 0, n=30), _faces(30, 0, n=30)
    skin = np.s_[:, 110:120, 90:110]  # under the nose: skin for everyone
    low = np.s_[:, 165:175, 90:110]  # at adult chin level: neck or clothes for babies, chin for adults
    gap_b = np.abs(babies[low].mean(axis=(1, 2)) - babies[skin].mean(axis=(1, 2)))
    gap_a = np.abs(adults[low].mean(axis=(1, 2)) - adults[skin].mean(axis=(1, 2)))
    assert np.median(gap_b) > 1.5 * np.median(gap_a)


def test_ethnicity_shows_in_skin_tone() -> None:
    white, black = _faces(30, 0, n=30), _faces(30, 1, n=30)
    cheeks = np.s_[:, 105:125, 60:85], np.s_[:, 105:125, 115:140]
    assert sum(white[c].mean() for c in cheeks) > sum(black[c].mean() for c in cheeks) + 100
