"""The decoded uint8 cache: shape, content, reuse without decoding, rebuild when stale."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

import agecls.data.cache as cache_mod
from agecls.data.cache import build_cache, cache_path, decode_image
from agecls.data.records import DataError
from data_helpers import REAL_SKIP_REASON, jpeg_bytes, real_utkface_root


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(6):
        path = folder / f"{i}.jpg"
        path.write_bytes(jpeg_bytes(i, size=(30 + 4 * i, 24)))  # landscape, sizes vary
        paths.append(path)
    cmyk = folder / "cmyk.jpg"
    cmyk.write_bytes(jpeg_bytes(99, mode="CMYK"))
    grey = folder / "grey.jpg"
    grey.write_bytes(jpeg_bytes(98, mode="L"))
    return [*paths, cmyk, grey]


def test_decode_resizes_shorter_side_and_centre_crops(tmp_path):
    arr = np.zeros((40, 80), dtype=np.uint8)  # landscape: 80 wide, 40 high
    arr[:, 20:60] = 255  # a white centre band exactly as wide as the crop
    Image.fromarray(arr, "L").save(tmp_path / "band.png")
    out = decode_image(tmp_path / "band.png", 20, grayscale=True)
    assert out.shape == (20, 20, 1) and out.dtype == np.uint8
    assert out[:, 1:-1].min() == 255  # the crop keeps the centre band only
    rgb = decode_image(tmp_path / "band.png", 20, grayscale=False)
    assert rgb.shape == (20, 20, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("grayscale", [True, False])
def test_cache_shape_dtype_and_content(images, tmp_path, grayscale):
    arr = build_cache(images, tmp_path / "cache", key="abc123", size=16, grayscale=grayscale)
    channels = 1 if grayscale else 3
    assert arr.shape == (len(images), 16, 16, channels) and arr.dtype == np.uint8
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    for i, path in enumerate(images):
        assert np.array_equal(arr[i], decode_image(path, 16, grayscale))
    assert cache_path(tmp_path / "cache", key="abc123", size=16, grayscale=grayscale).is_file()


def test_second_call_reuses_without_decoding(images, tmp_path, monkeypatch):
    first = np.array(build_cache(images, tmp_path / "cache", key="k", size=16, grayscale=True))
    file = cache_path(tmp_path / "cache", key="k", size=16, grayscale=True)
    mtime = file.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "decode_image", fail)
    second = build_cache(images, tmp_path / "cache", key="k", size=16, grayscale=True)
    assert np.array_equal(first, second) and file.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="decoded again"):  # another size or mode is another file
        build_cache(images, tmp_path / "cache", key="k", size=8, grayscale=True)


def test_wrong_shape_or_other_paths_rebuild(images, tmp_path):
    build_cache(images, tmp_path / "cache", key="k", size=16, grayscale=True)
    file = cache_path(tmp_path / "cache", key="k", size=16, grayscale=True)
    np.save(file, np.zeros((2, 16, 16, 1), dtype=np.uint8))  # a corrupt/stale cache
    rebuilt = build_cache(images, tmp_path / "cache", key="k", size=16, grayscale=True)
    assert rebuilt.shape == (len(images), 16, 16, 1) and rebuilt.max() > 0
    file.write_bytes(b"not a npy file")
    assert build_cache(images, tmp_path / "cache", key="k", size=16, grayscale=True).shape[0] == len(images)
    reordered = build_cache(images[::-1], tmp_path / "cache", key="k", size=16, grayscale=True)
    assert np.array_equal(reordered[0], decode_image(images[-1], 16, True))


def test_unreadable_image_names_the_file(images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"text")
    with pytest.raises(DataError, match="cannot decode image .*bad.jpg"):
        build_cache([*images, bad], tmp_path / "cache", key="k", size=16, grayscale=True)
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob(".*tmp*"))


def test_key_is_made_safe_for_a_file_name(tmp_path):
    path = cache_path(tmp_path, key="../a b/c", size=64, grayscale=False)
    assert path.parent == tmp_path and path.name == "a-b-c_64px_RGB.npy"


@pytest.mark.real_data
def test_real_decode_rate(tmp_path):
    root = real_utkface_root()
    if root is None:
        pytest.skip(REAL_SKIP_REASON)
    paths = sorted(root.iterdir())[:1500]
    start = time.perf_counter()
    arr = build_cache(paths, tmp_path, key="real", size=64, grayscale=True, workers=2)
    rate = len(paths) / (time.perf_counter() - start)
    print(f"decoded {len(paths)} real images at {rate:.0f} images/s (64 px, grey, 2 workers)")
    assert arr.shape == (1500, 64, 64, 1) and rate > 100 and 20 < arr.mean() < 235
