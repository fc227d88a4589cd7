"""Sampler / loss weighting: the dissertation's weighted sampler (1/count) and loss weights (1 - count/total,
or inverse frequency), and the datamodule drawing balanced batches with the sampler on."""

from __future__ import annotations

import numpy as np
import pytest

from agecls.data.datamodule import FaceDataModule, sample_weights
from agecls.tasks.classification import class_weights

LABELS = np.array([0] * 60 + [1] * 30 + [2] * 10)


def test_loss_weights_follow_the_configured_scheme():
    assert class_weights(LABELS, 3, "none") is None
    assert class_weights(LABELS, 3, "one_minus_freq") == pytest.approx([0.4, 0.7, 0.9])
    inverse = class_weights(LABELS, 3, "inverse_freq")
    assert inverse == pytest.approx([100 / 180, 100 / 90, 100 / 30])
    # A class absent from training gets a finite weight instead of a division by zero.
    assert np.isfinite(class_weights(LABELS, 4, "inverse_freq")).all()
    with pytest.raises(ValueError, match="sampler.class_weights='bogus'; valid: "):
        class_weights(LABELS, 3, "bogus")


def test_sample_weights_give_every_class_the_same_total():
    weights = sample_weights(LABELS, 3)
    totals = [weights[np.equal(LABELS, c)].sum() for c in range(3)]
    assert totals == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_sampler_balances_training_batches(weighted):
    n = len(LABELS)
    images = np.zeros((n, 8, 8, 1), dtype=np.uint8)
    split = np.array(["train"] * n, dtype=object)
    split[[0, 60, 90]] = "val"
    split[[1, 61, 91]] = "test"
    dm = FaceDataModule(images, LABELS, split, 3, batch_size=1000, weighted_sampler=weighted, seed=0)
    loader = dm.train_dataloader()  # one loader, 30 epochs: its seeded generator moves on every epoch
    drawn = np.concatenate([y.numpy() for _ in range(30) for _, y in loader])
    share = np.bincount(drawn, minlength=3) / len(drawn)
    if weighted:
        assert share == pytest.approx([1 / 3] * 3, abs=0.04)
    else:
        assert share == pytest.approx([58 / 94, 28 / 94, 8 / 94], abs=1e-9)


@pytest.mark.parametrize(
    ("name", "sampler", "weights"),
    [
        ("none", False, "none"),
        ("weighted", True, "none"),
        ("weighted_loss", False, "one_minus_freq"),
        ("inverse_loss", False, "inverse_freq"),
    ],
)
def test_sampler_group_files(compose_cfg, name, sampler, weights):
    cfg = compose_cfg([f"sampler={name}"])
    assert (cfg.sampler.weighted_sampler, cfg.sampler.class_weights) == (sampler, weights)
