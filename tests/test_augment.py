"""The augment group and the data keys around it: crop margin, centre-cropped eval, normalisation, seeding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from agecls.config import CONFIG_DIR
from agecls.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_augment,
    cache_size,
    scaled_gaussian_blur,
    seed_transform,
)
from agecls.data.datamodule import FaceDataModule

AUGMENTS = sorted(p.stem for p in (CONFIG_DIR / "augment").glob("*.yaml"))
SIZE = 32


def _arrays(n: int = 60, side: int = SIZE, channels: int = 1, seed: int = 0, same: bool = False):
    """Random cached images (or n copies of one), labels 0..2 and a 60/20/20 split in row order."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (1 if same else n, side, side, channels), dtype=np.uint8)
    images = np.repeat(images, n, axis=0) if same else images
    labels = np.arange(n) % 3
    split = np.array(["train"] * (n * 3 // 5) + ["val"] * (n // 5) + ["test"] * (n - n * 3 // 5 - n // 5))
    return images, labels, split


def _module(transforms, images, labels, split, **kwargs) -> FaceDataModule:
    kwargs = {"batch_size": 8, "seed": 42, **kwargs}
    return FaceDataModule(images, labels, split, 3, train_transform=transforms, **kwargs)


def _cfg(compose_cfg, *overrides: str):
    return compose_cfg([f"data.image_size={SIZE}", *overrides])


def _batch(loader, k: int = 0) -> torch.Tensor:
    for i, (x, _) in enumerate(loader):
        if i == k:
            return x
    raise AssertionError("loader too short")


def test_the_group_has_none_seed_and_strong():
    assert {"none", "seed", "strong"} <= set(AUGMENTS)


@pytest.mark.parametrize("grayscale", [True, False])
@pytest.mark.parametrize("margin", [0, 5])
@pytest.mark.parametrize("name", AUGMENTS)
def test_every_augment_file_builds_and_gives_model_sized_float_tensors(compose_cfg, name, margin, grayscale):
    cfg = _cfg(compose_cfg, f"augment={name}", f"data.crop_margin={margin}", f"data.grayscale={grayscale}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated transforms (ShiftScaleRotate), no unknown arguments
        transforms = build_augment(cfg.augment)
    channels = 1 if grayscale else 3
    dm = _module(transforms, *_arrays(side=SIZE + margin, channels=channels))
    for loader in (
        dm.train_dataloader(),
        dm.val_dataloader(),
        dm.test_dataloader(),
        dm.eval_dataloader("train"),
    ):
        x, y = next(iter(loader))
        assert x.shape == (8, channels, SIZE, SIZE) and x.dtype == torch.float32
        assert y.dtype == torch.long and x.min() >= 0.0 and x.max() <= 1.0


def test_default_config_keeps_the_cached_images_unchanged(compose_cfg):
    cfg = _cfg(compose_cfg)
    assert cfg.augment.name == "none" and cfg.data.crop_margin == 0 and cfg.data.normalize == "none"
    transforms = build_augment(cfg.augment)
    assert transforms.train is None and transforms.eval is None
    images, labels, split = _arrays()
    dm = _module(transforms, images, labels, split)
    assert dm.mean is None and dm.std is None
    x = next(iter(dm.eval_dataloader("val")))[0]
    expected = torch.from_numpy(images[dm.indices["val"][:8]]).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(x, expected)


def test_cache_size_adds_the_margin_and_rejects_bad_values():
    assert cache_size({"image_size": 64}) == 64
    assert cache_size({"image_size": 64, "crop_margin": 8}) == 72
    with pytest.raises(ValueError, match=r"data.crop_margin=-2 .*>= 0"):
        cache_size({"image_size": 64, "crop_margin": -2})
    with pytest.raises(ValueError, match=r"data.image_size=0"):
        cache_size({"image_size": 0})


def test_prepare_data_caches_image_size_plus_margin(compose_cfg):
    from agecls.data.prepare import prepare_data

    cfg = compose_cfg(["data.synthetic.n=400", "data.image_size=32", "data.crop_margin=6"])
    assert prepare_data(cfg.data, cfg.paths).images.shape[1:] == (38, 38, 1)


@pytest.mark.parametrize("margin", [4, 5])  # even and odd: the odd pixel goes to the bottom/right
def test_eval_centre_crops_the_cache_deterministically(compose_cfg, margin):
    cfg = _cfg(compose_cfg, "augment=strong", f"data.crop_margin={margin}")
    images, labels, split = _arrays(side=SIZE + margin)
    dm = _module(build_augment(cfg.augment), images, labels, split)
    first = torch.cat([x for x, _ in dm.eval_dataloader("test")])
    again = torch.cat([x for x, _ in dm.eval_dataloader("test")])
    via_test = torch.cat([x for x, _ in dm.test_dataloader()])
    assert torch.equal(first, again) and torch.equal(first, via_test)
    top = margin // 2
    crop = images[dm.indices["test"], top : top + SIZE, top : top + SIZE]
    assert torch.equal(first, torch.from_numpy(crop).permute(0, 3, 1, 2).float() / 255.0)


def test_eval_transform_is_deterministic_call_after_call(compose_cfg):
    cfg = _cfg(compose_cfg, "augment=seed", "data.crop_margin=6")
    transforms = build_augment(cfg.augment)
    image = _arrays(1, side=SIZE + 6)[0][0]
    outs = [transforms.eval(image=image.copy())["image"] for _ in range(5)]
    assert all(np.array_equal(outs[0], o) for o in outs)


def test_train_augments_and_is_reproducible_from_the_seed(compose_cfg):
    cfg = _cfg(compose_cfg, "augment=strong", "data.crop_margin=6")
    images, labels, split = _arrays(side=SIZE + 6)

    def first_batch(seed):
        return _batch(
            _module(build_augment(cfg.augment), images, labels, split, seed=seed).train_dataloader()
        )

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Same rows in both loaders (no shuffling differences): augmentation really changes the pixels.
    dm = _module(build_augment(cfg.augment), images, labels, split, seed=1)
    plain = torch.stack([dm.eval_dataloader("train").dataset[i][0] for i in range(8)])
    augmented = torch.stack([dm.train_dataloader().dataset[i][0] for i in range(8)])
    assert not torch.equal(plain, augmented)


def test_each_dataloader_worker_draws_its_own_reproducible_augmentations(compose_cfg):
    """albumentations 2 ignores global seeds; without a per-worker re-seed both workers repeat each other."""
    cfg = _cfg(compose_cfg, "augment=strong", "data.crop_margin=6")
    images, labels, split = _arrays(side=SIZE + 6, same=True)  # every row the same image

    def two_batches():
        dm = _module(build_augment(cfg.augment), images, labels, split, num_workers=2, batch_size=4)
        loader = dm.train_dataloader()
        batches = [x for x, _ in loader][:2]  # batch 0 from worker 0, batch 1 from worker 1
        return batches

    first, again = two_batches(), two_batches()
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize(
    ("spec", "grayscale"),
    [
        ("imagenet", True),
        ("imagenet", False),
        ("dataset", True),
        ("{mean:[0.5],std:[0.25]}", True),
        ("{mean:[0.4,0.5,0.6],std:[0.2,0.25,0.3]}", False),
    ],
)
def test_normalisation_is_the_same_in_train_and_eval(compose_cfg, spec, grayscale):
    cfg = _cfg(compose_cfg, f"data.normalize={spec}", f"data.grayscale={grayscale}")
    channels = 1 if grayscale else 3
    images, labels, split = _arrays(channels=channels)
    dm = _module(build_augment(cfg.augment), images, labels, split)
    train_ds, eval_ds = dm.train_dataloader().dataset, dm.eval_dataloader("train").dataset
    assert torch.equal(train_ds.mean, eval_ds.mean) and torch.equal(train_ds.std, eval_ds.std)
    for i in range(5):  # augment=none: the same row gives the same tensor on both paths
        assert torch.equal(train_ds[i][0], eval_ds[i][0])
    raw = images[dm.indices["train"][0]].astype(np.float64) / 255.0
    if spec == "imagenet":
        mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
        mean, std = (mean.mean(keepdims=True), std.mean(keepdims=True)) if grayscale else (mean, std)
    elif spec == "dataset":
        pixels = images[dm.indices["train"]].astype(np.float64) / 255.0
        mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    else:
        values = OmegaConf.to_container(cfg.data.normalize)
        mean, std = np.asarray(values["mean"]), np.asarray(values["std"])
    expected = torch.from_numpy((raw - mean) / std).permute(2, 0, 1).float()
    assert torch.allclose(train_ds[0][0], expected, atol=1e-5)
    if spec == "dataset":  # the statistics come from the train split and standardise it
        train = torch.stack([train_ds[i][0] for i in range(len(train_ds))])
        assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1.0) < 1e-3


def test_normalisation_with_augmentation_and_crop_uses_the_same_statistics(compose_cfg):
    cfg = _cfg(compose_cfg, "augment=seed", "data.crop_margin=4", "data.normalize=dataset")
    dm = _module(build_augment(cfg.augment), *_arrays(side=SIZE + 4))
    train_ds, val_ds = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    mean, std = (torch.as_tensor(v).view(-1, 1, 1) for v in (dm.mean, dm.std))
    for ds in (train_ds, val_ds):
        assert torch.equal(ds.mean, mean) and torch.equal(ds.std, std)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.crop_margin=-1"], r"data.crop_margin=-1 must be .*>= 0"),
        (["data.normalize=zscore"], r"data.normalize='zscore'; valid: none, imagenet, dataset"),
        (["data.normalize={mean:[0.5],std:[0]}"], r"data.normalize=.*valid: none, imagenet, dataset"),
    ],
)
def test_bad_data_keys_are_named(compose_cfg, overrides, match):
    cfg = _cfg(compose_cfg, "augment=seed", *overrides)
    with pytest.raises(ValueError, match=match):
        build_augment(cfg.augment)


def test_bad_augment_steps_are_named_with_valid_values(compose_cfg):
    cfg = _cfg(compose_cfg, "augment=seed", "data.crop_margin=4")
    step = cfg.augment.train[1]
    step._target_ = "albumentations.RandomCorp"
    with pytest.raises(
        ValueError,
        match=r"augment.train\[1\]._target_='albumentations.RandomCorp'.*valid: .*"
        r"did you mean albumentations.RandomCrop",
    ):
        build_augment(cfg.augment)
    step._target_ = "albumentations.RandomCrop"
    step.height = SIZE + 5
    with pytest.raises(
        ValueError,
        match=r"augment.train\[1\] \(RandomCrop\) crops 37x32 .* 36x36 .*"
        r"data.crop_margin=4.*valid: height and width <= 36",
    ):
        build_augment(cfg.augment)
    step.height = SIZE
    with open_dict(cfg):
        step.hieght = SIZE
    with pytest.raises(ValueError, match=r"augment.train\[1\] \(albumentations.RandomCrop\).*'hieght'"):
        build_augment(cfg.augment)


def test_none_with_a_margin_centre_crops_in_training_too(compose_cfg):
    transforms = build_augment(_cfg(compose_cfg, "augment=none", "data.crop_margin=4").augment)
    assert [type(t).__name__ for t in transforms.train.transforms] == ["CenterCrop"]
    image = _arrays(1, side=SIZE + 4)[0][0]
    assert np.array_equal(transforms.train(image=image)["image"], transforms.eval(image=image)["image"])


def test_a_pipeline_that_ends_off_size_is_rejected(compose_cfg):
    cfg = _cfg(compose_cfg, "augment=none", "data.crop_margin=4")
    with open_dict(cfg):
        cfg.augment.train = [{"_target_": "albumentations.Resize", "height": 16, "width": 16}]
    with pytest.raises(ValueError, match=r"16x16; the model expects data.image_size=32"):
        build_augment(cfg.augment)


def test_transforms_and_separate_eval_arguments_do_not_mix(compose_cfg):
    transforms = build_augment(_cfg(compose_cfg).augment)
    with pytest.raises(ValueError, match="inside the Transforms"):
        _module(transforms, *_arrays(), normalize="imagenet")


def test_blur_scales_with_image_size():
    at_224 = scaled_gaussian_blur(9, image_size=224)
    assert tuple(at_224.blur_limit) == (3, 7) and tuple(at_224.sigma_limit) == pytest.approx((0.0, 9.0))
    at_64 = scaled_gaussian_blur(9, image_size=64)
    assert tuple(at_64.blur_limit) == (3, 3) and tuple(at_64.sigma_limit) == pytest.approx(
        (0.0, 9 * 64 / 224)
    )


def test_seed_pipeline_is_the_dissertations(compose_cfg):
    import albumentations as A

    transforms = build_augment(_cfg(compose_cfg, "augment=seed", "data.crop_margin=4").augment)
    steps = transforms.train.transforms
    assert [type(t).__name__ for t in steps] == [
        "Affine",
        "RandomCrop",
        "GaussianBlur",
        "RandomBrightnessContrast",
    ]  # the pipeline's own RandomCrop reaches data.image_size: no centre crop appended
    affine = steps[0]
    assert isinstance(affine, A.Affine) and affine.p == 0.5
    assert tuple(affine.rotate) == (-15, 15)
    assert tuple(affine.scale["x"]) == pytest.approx((0.95, 1.05))
    assert tuple(affine.translate_percent["x"]) == pytest.approx((-0.05, 0.05))
    assert steps[2].p == 0.5 and steps[3].p == 0.5


def test_a_run_trains_with_seed_augment_margin_and_dataset_normalisation(compose_cfg):
    from tests.conftest import FAST_OVERRIDES

    from agecls.training.train import train

    overrides = [*FAST_OVERRIDES, "trainer.max_epochs=2", "tracking.experiment=augment"]
    results = train(compose_cfg([*overrides, "augment=seed", "data.crop_margin=4", "data.normalize=dataset"]))
    assert results["epochs_trained"] == 2 and 0.0 <= results["test/macro_f1"] <= 1.0


def test_seeded_steps_draw_independently():
    """albumentations 2.0.8 Compose(seed=...) makes every step repeat the same draws; seed_transform not."""
    import albumentations as A

    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], save_applied_params=True)
    seed_transform(pipeline, 3)
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    applied = [len(pipeline(image=image)["applied_transforms"]) for _ in range(200)]
    assert 20 < applied.count(1) < 180  # one flip without the other happens about half the time
    seed_transform(pipeline, 3)
    assert applied == [len(pipeline(image=image)["applied_transforms"]) for _ in range(200)]
