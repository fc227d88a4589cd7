"""The group-balanced sampler (`sampler=group_balanced`): weights 1 / size**power of a face's group, draws
that balance the groups, seeded and resumable; its config checks; and the two Pareto sweep files."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution

from agecls.data.datamodule import FaceDataModule, group_weights
from agecls.sweep.space import format_value, search_space
from agecls.training.settings import resolve_auto
from agecls.training.train import build_datamodule
from agecls.training.validation import ConfigValueError, validate

# (class, ethnicity) per face: groups of 3, 1, 2 and 2 faces; -1 is an unknown ethnicity.
TABLE = np.array([[0, 0], [0, 0], [0, 0], [0, 1], [1, 0], [1, 0], [1, -1], [1, -1]])


def test_weights_are_one_over_group_size_and_unknown_is_a_group():
    assert group_weights(TABLE) == pytest.approx([1 / 3] * 3 + [1.0] + [1 / 2] * 4)
    assert group_weights(TABLE, power=0.5) == pytest.approx([3**-0.5] * 3 + [1.0] + [2**-0.5] * 4)
    assert group_weights(TABLE, power=0.0) == pytest.approx([1.0] * 8)
    # one column: the dissertation's 1 / count of the class
    assert group_weights(TABLE[:, 0]) == pytest.approx([1 / 4] * 8)


def _datamodule(seed: int = 0, pipeline: str = "loader") -> tuple[FaceDataModule, np.ndarray]:
    """200 train faces in 4 groups of 120, 50, 20 and 10 (plus 2 val and 2 test faces)."""
    groups = np.repeat([0, 1, 2, 3], [120, 50, 20, 10])
    n = len(groups) + 4
    labels = np.concatenate([groups, [0, 1, 0, 1]])  # the label is the group: draws count groups
    split = np.array(["train"] * len(groups) + ["val", "val", "test", "test"], dtype=object)
    weights = np.zeros(n)
    weights[: len(groups)] = group_weights(groups)
    images = np.zeros((n, 8, 8, 1), dtype=np.uint8)
    dm = FaceDataModule(
        images, labels, split, 4, batch_size=64, seed=seed, pipeline=pipeline, sampling_weights=weights
    )
    return dm, labels


def _epochs(loader, n: int) -> list[np.ndarray]:
    return [np.concatenate([y.numpy() for _, y in loader]) for _ in range(n)]


@pytest.mark.parametrize("pipeline", ["loader", "device"])
def test_draws_balance_the_groups_over_epochs(pipeline):
    dm, _ = _datamodule(pipeline=pipeline)
    drawn = np.concatenate(_epochs(dm.train_dataloader(), 20))
    assert len(drawn) == 20 * 200  # each epoch draws as many faces as the train split has
    share = np.bincount(drawn, minlength=4) / len(drawn)
    assert share == pytest.approx([0.25] * 4, abs=0.03)  # unweighted: 0.60, 0.25, 0.10, 0.05


def test_draws_are_seeded_and_resume_where_they_stopped():
    first, _ = _datamodule(seed=3)
    same, _ = _datamodule(seed=3)
    other, _ = _datamodule(seed=4)
    a, b, c = (_epochs(dm.train_dataloader(), 2) for dm in (first, same, other))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()
    # a fit resumed after epoch 1 draws epoch 2 as the uninterrupted fit did
    stopped, _ = _datamodule(seed=3)
    _epochs(stopped.train_dataloader(), 1)
    resumed, _ = _datamodule(seed=3)
    resumed.load_state_dict(stopped.state_dict())
    assert (_epochs(resumed.train_dataloader(), 1)[0] == a[1]).all()


def test_bad_sampling_weights_are_refused():
    images, labels = np.zeros((4, 8, 8, 1), dtype=np.uint8), np.array([0, 1, 0, 1])
    split = np.array(["train", "train", "val", "test"], dtype=object)
    with pytest.raises(ValueError, match=r"^sampling_weights: 3 weights for 4 rows; valid: one finite"):
        FaceDataModule(images, labels, split, 2, sampling_weights=np.ones(3))
    with pytest.raises(ValueError, match=r"^sampling_weights: 4 weights for 4 rows"):
        FaceDataModule(images, labels, split, 2, sampling_weights=np.array([0.0, 0.0, 1.0, 1.0]))


def test_build_datamodule_weighs_train_faces_by_age_bin_and_ethnicity(compose_cfg):
    # age bins of seed7: 0-2 (bin 0), 25-32 (bin 4); ethnicity missing (NaN) for two faces
    df = pd.DataFrame(
        {
            "age": [1, 1, 1, 30, 30, 30, 30, 30, 1, 30],
            "gender": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
            "ethnicity": pd.array([0, 0, 1, 0, 0, 0, None, None, 0, 0], dtype="Int64"),
            "split": ["train"] * 8 + ["val", "test"],
        }
    )
    prepared = SimpleNamespace(manifest=SimpleNamespace(df=df), images=np.zeros((10, 8, 8, 1), np.uint8))

    def build(*overrides: str) -> FaceDataModule:
        cfg = compose_cfg(["data.image_size=8", "data.pipeline=loader", *overrides])
        resolve_auto(cfg)
        return build_datamodule(cfg, prepared)[0]

    dm = build("sampler=group_balanced")
    # groups (bin, ethnicity): (0,0) x2, (0,1) x1, (4,0) x3, (4,unknown) x2; val/test rows are not drawn
    expected = [1 / 2, 1 / 2, 1, 1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 0, 0]
    assert dm.sampling_weights == pytest.approx(expected)
    dm = build("sampler=group_balanced", "sampler.groups=[gender]", "sampler.power=0.5")
    assert dm.sampling_weights == pytest.approx([4**-0.5] * 8 + [0, 0])
    # the dissertation's weighted sampler keeps its own path: 1 / count of the class
    dm = build("sampler=weighted")
    assert dm.weighted_sampler and dm.sampling_weights is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sampler.groups=[age,height]",
            "sampler.groups=[age,height]: height is not a group column; valid: a non-empty list of "
            "target, age, gender, ethnicity (e.g. [target,ethnicity])",
        ),
        (
            "sampler.groups=[]",
            "sampler.groups=[]: valid: a non-empty list of target, age, gender, ethnicity (e.g. "
            "[target,ethnicity])",
        ),
        (
            "sampler.groups=[gender,gender]",
            "sampler.groups=[gender,gender]: a column is named twice; valid: a non-empty list of "
            "target, age, gender, ethnicity (e.g. [target,ethnicity])",
        ),
        (
            "sampler.groups=ethnicity",
            "sampler.groups=ethnicity: valid: a non-empty list of target, age, gender, ethnicity (e.g. "
            "[target,ethnicity])",
        ),
        (
            "sampler.power=1.5",
            "sampler.power=1.5: valid: a number in [0, 1] (1: every group drawn equally often)",
        ),
    ],
)
def test_bad_groups_are_refused_with_one_line(compose_cfg, override, message):
    with pytest.raises(ConfigValueError) as caught:
        validate(compose_cfg(["sampler=group_balanced", override]))
    assert str(caught.value) == message


def test_group_balanced_file_and_valid_groups(compose_cfg):
    cfg = compose_cfg(["sampler=group_balanced"])
    assert (cfg.sampler.weighted_sampler, list(cfg.sampler.groups), cfg.sampler.power) == (
        True,
        ["target", "ethnicity"],
        1.0,
    )
    assert validate(cfg) == []
    assert (
        validate(compose_cfg(["sampler=group_balanced", "task=gender", "sampler.groups=[age,gender]"])) == []
    )
    assert validate(compose_cfg(["sampler=none", "sampler.groups=[target,ethnicity]"])) == [
        "sampler.groups=[target,ethnicity] with sampler.weighted_sampler=false: the groups are not balanced, "
        "every face is drawn alike (sampler=group_balanced balances them)"
    ]
    # loss weights per class on top of a sampler that balances classes weigh rare classes twice; on top of
    # one that balances ethnicity alone they do not
    twice = validate(compose_cfg(["sampler=group_balanced", "sampler.class_weights=inverse_freq"]))
    assert [w.split(":")[0] for w in twice] == [
        "sampler.weighted_sampler=true and sampler.class_weights=inverse_freq"
    ]
    once = ["sampler=group_balanced", "sampler.class_weights=inverse_freq", "sampler.groups=[ethnicity]"]
    assert validate(compose_cfg(once)) == []


@pytest.mark.parametrize("name", ["pareto_fairness", "pareto_cost"])
def test_pareto_sweeps_have_spaces_whose_choices_compose(compose_cfg, name):
    cfg = compose_cfg([f"sweep={name}"])
    assert (cfg.optuna.study_name, cfg.tracking.experiment) == (name, name)
    assert len(cfg.objective.metrics) == len(cfg.objective.directions) >= 2
    assert cfg.optuna.pruner._target_ == "optuna.pruners.NopPruner"
    space, _ = search_space(OmegaConf.to_container(cfg.optuna.params), [], OverridesParser.create())
    for key, dist in space.items():
        values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        for value in values:
            validate(compose_cfg([f"sweep={name}", f"{key}={format_value(value)}"]), drawn_later=True)


def test_pareto_cost_models_build_at_its_smallest_image_size(compose_cfg):
    cfg = compose_cfg(["sweep=pareto_cost"])
    models = OverridesParser.create().parse_override(f"model={cfg.optuna.params.model}").value().list
    sizes = OverridesParser.create().parse_override(f"x={cfg.optuna.params['data.image_size']}").value().list
    assert len(models) == 6 and min(sizes) == 32
    for model in models:  # validate dry-builds each model on the meta device: no memory, no download
        validate(compose_cfg(["sweep=pareto_cost", f"model={model}", "data.image_size=32"]))
