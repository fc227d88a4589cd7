"""The GPU path, tested on the CPU: `data.pipeline=device` (the cache staged on the device, per-sample
augmentation translated from albumentations), `trainer.channels_last` and `trainer.compile`."""

from __future__ import annotations

import gc
import math

import albumentations as A
import numpy as np
import pytest
import torch
from tests.conftest import FAST_OVERRIDES

from agecls.data.augment import build_augment
from agecls.data.datamodule import DeviceBatches, FaceDataModule
from agecls.data.device_augment import translate_pipeline
from agecls.data.staged import _STAGED, StagedCache, staged_copies
from agecls.tasks.module import FaceClassifier
from agecls.training.train import train

SIZE = 48


def _image(side: int = SIZE, channels: int = 1) -> np.ndarray:
    """A smooth image with edges (so geometric steps are visible and interpolation is well defined)."""
    yy, xx = np.mgrid[0:side, 0:side]
    base = (
        127 + 60 * np.sin(xx / 5.0) + 50 * np.cos(yy / 7.0) + (xx > side * 0.6) * 30 + (yy > side * 0.7) * 20
    )
    img = base.clip(0, 255).astype(np.uint8)[..., None]
    return np.repeat(img, channels, axis=2)


def _batch(img: np.ndarray, n: int = 1) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).repeat(n, 1, 1, 1)


def _run(transform, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return translate_pipeline(A.Compose([transform]))(x, torch.Generator().manual_seed(seed))


FIXED = [
    A.Affine(rotate=(20, 20), border_mode=4, p=1),
    A.Affine(rotate=(-12, -12), scale=(0.8, 0.8), border_mode=1, p=1),
    A.Affine(scale=(1.2, 1.2), translate_percent=(0.1, 0.1), border_mode=4, p=1),
    A.Affine(translate_px=(3, 3), shear=(10, 10), border_mode=4, p=1),
    A.Affine(rotate=(10, 10), scale=(0.8, 0.8), border_mode=0, fill=100, p=1),
    A.GaussianBlur(blur_limit=(5, 5), sigma_limit=(2, 2), p=1),
    A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.8, 0.8), p=1),
    A.HorizontalFlip(p=1),
    A.CenterCrop(32, 32),
    A.RandomBrightnessContrast(brightness_limit=(0.1, 0.1), contrast_limit=(0.2, 0.2), p=1),
    A.RandomBrightnessContrast(
        brightness_limit=(-0.1, -0.1), contrast_limit=(0, 0), brightness_by_max=False, p=1
    ),
    A.RandomGamma(gamma_limit=(130, 130), p=1),
]


@pytest.mark.parametrize("transform", FIXED, ids=lambda t: repr(t)[:60])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_step_matches_albumentations_with_fixed_parameters(transform, channels):
    """Same geometry conventions and formulas: within uint8 rounding (2/255) of albumentations' output."""
    img = _image(channels=channels)
    reference = A.Compose([transform])(image=img)["image"].astype(np.float32) / 255
    got = _run(transform, _batch(img))[0].permute(1, 2, 0).numpy()
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() <= 2.5 / 255


def test_parameters_are_drawn_per_sample_not_per_batch():
    x = _batch(_image(), n=16)
    out = _run(A.Affine(rotate=(-15, 15), p=1, border_mode=4), x)
    diffs = {round(float((out[i] - out[0]).abs().mean()), 5) for i in range(1, 16)}
    assert len(diffs) == 15 and min(diffs) > 0  # sixteen different rotations


@pytest.mark.parametrize(
    "transform",
    [
        A.Affine(rotate=(-15, 15), border_mode=4, p=0.3),
        A.HorizontalFlip(p=0.5),
        A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.5, 2), p=0.2),
        A.RandomBrightnessContrast(p=0.7),
        A.RandomGamma(gamma_limit=(60, 80), p=0.4),
        A.GaussNoise(std_range=(0.05, 0.1), p=0.6),
        A.CoarseDropout(
            num_holes_range=(1, 3), hole_height_range=(0.1, 0.2), hole_width_range=(0.1, 0.2), p=0.5
        ),
    ],
    ids=lambda t: type(t).__name__,
)
def test_each_step_fires_with_its_probability(transform):
    n = 2000
    x = _batch(_image(side=24), n=n)
    changed = (_run(transform, x) - x).abs().flatten(1).amax(1) > 1e-6
    assert abs(changed.float().mean().item() - transform.p) < 4 * math.sqrt(
        transform.p * (1 - transform.p) / n
    )


def test_the_gpu_branch_without_host_reads_gives_the_same_kind_of_batches(monkeypatch):
    """On CUDA the steps compute every sample and blend by the mask (no `.any()`/`nonzero()` read-back);
    forced here on the CPU: same fixed-parameter output, same firing rates."""
    import agecls.data.device_augment as device_augment

    monkeypatch.setattr(device_augment, "_no_sync", lambda x: True)
    img = _image()
    affine = A.Affine(rotate=(20, 20), border_mode=4, p=1)
    reference = A.Compose([affine])(image=img)["image"].astype(np.float32) / 255
    got = _run(affine, _batch(img))[0].permute(1, 2, 0).numpy()
    assert np.abs(got - reference).max() <= 2.5 / 255
    n, x = 2000, _batch(_image(side=16), n=2000)
    for transform in (
        A.Affine(rotate=(-15, 15), p=0.3),
        A.OneOf([A.HorizontalFlip(), A.RandomGamma()], p=0.6),
    ):
        changed = (_run(transform, x) - x).abs().flatten(1).amax(1) > 1e-6
        assert abs(changed.float().mean().item() - transform.p) < 4 * math.sqrt(
            transform.p * (1 - transform.p) / n
        )


def test_p_zero_never_changes_anything_and_a_seed_reproduces_the_batch():
    x = _batch(_image(), n=8)
    assert torch.equal(_run(A.Affine(rotate=(-15, 15), p=0.0), x), x)
    pipeline = A.Compose([A.Affine(rotate=(-15, 15), p=0.5), A.RandomBrightnessContrast(p=0.5)])
    device = translate_pipeline(pipeline)
    a = device(x, torch.Generator().manual_seed(3))
    b = device(x, torch.Generator().manual_seed(3))
    c = device(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_of_picks_one_child_per_sample_with_weights_from_their_p():
    n = 4000
    x = _batch(_image(side=16), n=n)
    one_of = A.OneOf([A.HorizontalFlip(p=0.9), A.RandomGamma(gamma_limit=(50, 50), p=0.3)], p=0.8)
    out = _run(one_of, x)
    flipped = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-6
    gamma = (out - x.pow(0.5)).abs().flatten(1).amax(1) < 1e-5
    untouched = (out - x).abs().flatten(1).amax(1) < 1e-6
    assert not bool((flipped & gamma).any())
    assert abs(untouched.float().mean().item() - 0.2) < 0.03
    assert abs(flipped.float().mean().item() - 0.8 * 0.75) < 0.03  # weights 0.9 : 0.3
    assert abs(gamma.float().mean().item() - 0.8 * 0.25) < 0.03


def test_random_crop_moves_per_sample_and_coarse_dropout_fills_holes():
    side, crop = 40, 32
    x = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side).repeat(64, 1, 1, 1) / side**2
    out = _run(A.RandomCrop(crop, crop), x)
    assert out.shape == (64, 1, crop, crop)
    corners = out[:, 0, 0, 0] * side**2
    tops, lefts = (corners // side).long(), (corners % side).round().long()
    assert tops.max() <= side - crop and lefts.max() <= side - crop and len(set(corners.tolist())) > 20
    for i in range(64):  # each crop is an exact window of the input
        t, left = int(tops[i]), int(lefts[i])
        assert torch.equal(out[i], x[i, :, t : t + crop, left : left + crop])
    holes = _run(
        A.CoarseDropout(
            num_holes_range=(2, 2), hole_height_range=(8, 8), hole_width_range=(8, 8), fill=255, p=1
        ),
        x,
    )
    filled = (holes == 1.0).flatten(1).sum(1)
    assert bool((filled >= 64).all()) and bool((filled <= 128).all())  # two 8x8 holes, maybe overlapping


def test_the_seed_pipeline_translates_and_unsupported_steps_name_their_key(compose_cfg):
    cfg = compose_cfg(["augment=seed", "data.image_size=32", "data.crop_margin=4"])
    device = translate_pipeline(build_augment(cfg.augment).train)
    assert [type(s).__name__ for s in device.steps] == [
        "Affine",
        "Crop",
        "GaussianBlur",
        "BrightnessContrast",
    ]
    strong = compose_cfg(["augment=strong", "data.image_size=32", "data.crop_margin=4"])
    with pytest.raises(
        ValueError,
        match=r"augment\.train\[4\]\.transforms\[0\]: albumentations\.CLAHE.*data\.pipeline=loader",
    ):
        translate_pipeline(build_augment(strong.augment).train)
    with pytest.raises(ValueError, match=r"border_mode 0, 1 or 4"):
        translate_pipeline(A.Compose([A.Affine(rotate=(-5, 5), border_mode=2)]))


@pytest.mark.parametrize("name", ["none", "seed", "strong_device"])
def test_every_augment_file_but_strong_runs_on_the_device_pipeline(compose_cfg, name):
    cfg = compose_cfg([f"augment={name}", "data.image_size=32", "data.crop_margin=4", "data.grayscale=false"])
    device = translate_pipeline(build_augment(cfg.augment).train)
    if device is None:
        assert name == "none"
        return
    out = device(torch.rand(16, 3, 36, 36), torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1


def _arrays(n: int = 60, side: int = 36, channels: int = 1):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)
    labels = np.arange(n) % 3
    split = np.array(["train"] * 36 + ["val"] * 12 + ["test"] * 12)
    return images, labels, split


def test_device_eval_batches_equal_the_loader_reference(compose_cfg):
    cfg = compose_cfg(["augment=seed", "data.image_size=32", "data.crop_margin=4", "data.normalize=imagenet"])
    images, labels, split = _arrays()
    common = {"batch_size": 8, "seed": 1, "image_size": 32}
    loader = FaceDataModule(images, labels, split, 3, train_transform=build_augment(cfg.augment), **common)
    device = FaceDataModule(
        images, labels, split, 3, train_transform=build_augment(cfg.augment), pipeline="device", **common
    )
    for make in ("val_dataloader", "test_dataloader"):
        got, want = list(getattr(device, make)()), list(getattr(loader, make)())
        assert isinstance(getattr(device, make)(), DeviceBatches) and len(got) == len(want)
        for (xd, yd), (xl, yl) in zip(got, want, strict=True):
            assert torch.equal(yd, yl) and torch.allclose(xd, xl, atol=1e-6)
    train = device.train_dataloader()
    first, second = [torch.cat([y for _, y in train]) for _ in range(2)]
    assert len(train) == math.ceil(36 / 8) and sorted(first.tolist()) == sorted(labels[:36].tolist())
    assert not torch.equal(first, second)  # reshuffled each epoch
    x, _ = next(iter(train))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32


def test_device_weighted_sampler_balances_classes():
    images, labels, split = _arrays(n=300)
    labels = np.where(np.arange(300) % 10 == 0, 1, 0)  # 1 in 10 is class 1
    split = np.array(["train"] * 200 + ["val"] * 50 + ["test"] * 50)
    dm = FaceDataModule(images, labels, split, 2, batch_size=50, weighted_sampler=True, pipeline="device")
    drawn = torch.cat([y for _ in range(10) for _, y in dm.train_dataloader()])
    assert 0.4 < drawn.float().mean().item() < 0.6


def test_bad_pipeline_and_several_devices_are_rejected(compose_cfg):
    images, labels, split = _arrays()
    with pytest.raises(ValueError, match=r"data\.pipeline='gpu'; valid: loader, device"):
        FaceDataModule(images, labels, split, 3, pipeline="gpu")
    with pytest.raises(ValueError, match=r"trainer\.devices=2"):
        train(compose_cfg([*FAST_OVERRIDES, "data.pipeline=device", "trainer.devices=2", "tracking=none"]))
    with pytest.raises(ValueError, match=r"trainer\.compile\.backend='nope'; valid: .*eager"):
        train(
            compose_cfg(
                [
                    *FAST_OVERRIDES,
                    "trainer.compile.enabled=true",
                    "trainer.compile.backend=nope",
                    "tracking=none",
                ]
            )
        )


@pytest.mark.slow
def test_a_run_on_the_device_pipeline_with_channels_last_and_compile_trains_and_reloads(compose_cfg):
    results = train(
        compose_cfg(
            [
                *FAST_OVERRIDES,
                "data.synthetic.n=300",
                "augment=seed",
                "data.crop_margin=4",
                "data.pipeline=device",
                "trainer.channels_last=true",
                "trainer.compile.enabled=true",
                "trainer.compile.backend=eager",
                "trainer.max_epochs=2",
                "callbacks.early_stopping.enabled=false",
                "tracking=none",
            ]
        )
    )
    assert results["epochs_trained"] == 2 and math.isfinite(results["objective"])
    assert sum(map(sum, results["confusion_test"])) == results["data_sizes"]["test"]
    module = FaceClassifier.load_from_checkpoint(results["checkpoint"], map_location="cpu")
    assert not any("_orig_mod" in k for k in module.state_dict())  # compile left the checkpoint plain


def test_early_stopping_auto_stays_off_under_a_whole_run_schedule(compose_cfg, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from agecls.tracking import Recorder
    from agecls.training.settings import resolve_auto
    from agecls.training.trainer import build_trainer

    for scheduler, enabled in (("none", True), ("plateau", True), ("onecycle", False), ("cosine", False)):
        cfg = compose_cfg([f"scheduler={scheduler}"])
        assert cfg.callbacks.early_stopping.enabled == "auto"
        why = resolve_auto(cfg)
        assert cfg.callbacks.early_stopping.enabled is enabled, scheduler
        assert why["callbacks.early_stopping.enabled"].startswith(str(enabled).lower()), why
    why = resolve_auto(compose_cfg(["scheduler=onecycle"]))
    assert "total_steps" in why["callbacks.early_stopping.enabled"]
    forced = compose_cfg(["scheduler=onecycle", "callbacks.early_stopping.enabled=true"])
    assert "callbacks.early_stopping.enabled" not in resolve_auto(forced)
    assert forced.callbacks.early_stopping.enabled is True  # an explicit setting is kept
    bad = compose_cfg(["callbacks.early_stopping.enabled=sometimes"])
    with pytest.raises(ValueError, match=r"enabled='sometimes'; valid: true, false, auto"):
        resolve_auto(bad)
    for scheduler, stops in (("onecycle", False), ("plateau", True)):
        cfg = compose_cfg([f"scheduler={scheduler}"])
        resolve_auto(cfg)
        trainer, _ = build_trainer(cfg, tmp_path, Recorder(enabled=False))
        assert any(isinstance(c, EarlyStopping) for c in trainer.callbacks) is stops, scheduler


def test_auto_settings_follow_the_machine(compose_cfg, monkeypatch):
    from agecls.training import settings
    from agecls.training.settings import resolve_auto

    cfg = compose_cfg(["augment=seed"])
    assert (cfg.data.pipeline, cfg.trainer.precision, cfg.trainer.channels_last) == ("auto", "auto", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(settings, "cpu_bf16", lambda: None)
    resolve_auto(cfg)  # no CUDA, a CPU without bf16 instructions: the float32 reference settings
    assert (cfg.data.pipeline, cfg.trainer.precision, cfg.trainer.channels_last) == (
        "loader",
        "32-true",
        False,
    )
    monkeypatch.setattr(settings, "cpu_bf16", lambda: "AVX512-BF16")
    fast_cpu = compose_cfg(["augment=seed"])
    why = resolve_auto(fast_cpu)  # a CPU with bf16 instructions: its fastest path
    assert (fast_cpu.data.pipeline, fast_cpu.trainer.precision, fast_cpu.trainer.channels_last) == (
        "loader",
        "bf16-mixed",
        True,
    )
    assert why["trainer.precision"] == "bf16-mixed (a CPU with AVX512-BF16)"
    assert why["trainer.channels_last"] == "true (a CPU with AVX512-BF16)"
    monkeypatch.setattr(settings, "cpu_bf16", lambda: None)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    gpu = compose_cfg(["augment=seed"])
    why = resolve_auto(gpu)
    assert (gpu.data.pipeline, gpu.trainer.precision, gpu.trainer.channels_last) == (
        "device",
        "bf16-mixed",
        True,
    )
    assert set(why) == {
        "data.pipeline",
        "trainer.precision",
        "trainer.channels_last",
        "callbacks.early_stopping.enabled",
    }
    assert resolve_auto(gpu) == {}  # idempotent: nothing left to resolve
    strong = compose_cfg(["augment=strong", "data.crop_margin=4"])
    assert "augment.train[4]" in resolve_auto(strong)["data.pipeline"] and strong.data.pipeline == "loader"
    several = compose_cfg(["trainer.devices=2"])
    resolve_auto(several)
    assert several.data.pipeline == "loader" and several.trainer.precision == "bf16-mixed"
    on_cpu = compose_cfg(["trainer.accelerator=cpu"])
    resolve_auto(on_cpu)
    assert (on_cpu.data.pipeline, on_cpu.trainer.precision, on_cpu.trainer.channels_last) == (
        "loader",
        "32-true",
        False,
    )
    explicit = compose_cfg(
        [
            "data.pipeline=loader",
            "trainer.precision=32-true",
            "trainer.channels_last=false",
            "callbacks.early_stopping.enabled=true",
        ]
    )
    assert resolve_auto(explicit) == {} and explicit.data.pipeline == "loader"
    with pytest.raises(ValueError, match=r"trainer\.channels_last='yes'; valid: true, false, auto"):
        resolve_auto(compose_cfg(["trainer.channels_last=yes"]))


def test_staged_caches_over_one_cache_file_share_one_copy_until_none_holds_it(tmp_path):
    """A hierarchy's stages each open the cache file (np.load) and build their own datamodule: the device
    copy is made once and freed with its last holder; other data (slices, other files, arrays) never
    shares it."""
    images = np.random.default_rng(0).integers(0, 255, (6, 4, 4, 1), dtype=np.uint8)
    np.save(tmp_path / "cache.npy", images)
    first, second = (np.load(tmp_path / "cache.npy", mmap_mode="r") for _ in range(2))
    assert first is not second
    gc.collect()
    before = staged_copies()  # copies other tests' datamodules may still hold
    cpu = torch.device("cpu")
    a, b = StagedCache(first), StagedCache(second)
    assert a.on(cpu) is b.on(cpu), "two opens of one file: one staged tensor"
    assert torch.equal(a.on(cpu), torch.from_numpy(images).permute(0, 3, 1, 2))
    assert staged_copies() == before + 1

    np.save(tmp_path / "other.npy", images)  # same bytes, another file
    others = [
        StagedCache(first[:3]),
        StagedCache(first[3:]),  # same shape as first[:3], other rows
        StagedCache(first[::2]),
        StagedCache(np.load(tmp_path / "other.npy", mmap_mode="r")),
        StagedCache(images),
        StagedCache(images.copy()),
    ]
    tensors = [cache.on(cpu) for cache in others]
    assert len({id(t) for t in [a.on(cpu), *tensors]}) == 7, "different data never shares"
    assert torch.equal(tensors[1], torch.from_numpy(images[3:]).permute(0, 3, 1, 2))
    assert StagedCache(images).on(cpu) is tensors[4], "a plain array shares with itself only"
    assert staged_copies() == before + 7

    key = (a.key, "cpu")
    del tensors, others
    gc.collect()
    assert staged_copies() == before + 1
    del a
    gc.collect()
    assert key in _STAGED, "still held by the second cache"
    del b
    gc.collect()
    assert key not in _STAGED and staged_copies() == before, "freed with its last holder"


def test_datamodules_of_one_process_stage_the_cache_once(tmp_path):
    images = np.random.default_rng(1).integers(0, 255, (30, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "cache.npy", images)
    labels = np.arange(30) % 3
    split = np.array(["train", "val", "test"] * 10)

    def datamodule() -> FaceDataModule:
        opened = np.load(tmp_path / "cache.npy", mmap_mode="r")
        return FaceDataModule(opened, labels, split, 3, batch_size=4, pipeline="device")

    gc.collect()
    before = staged_copies()
    router, expert = datamodule(), datamodule()
    next(iter(router.train_dataloader()))
    next(iter(expert.val_dataloader()))
    assert router.cache.on(router.device) is expert.cache.on(expert.device)
    assert staged_copies() == before + 1
