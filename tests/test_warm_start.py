"""Warm starts: configurations listed in `optuna.enqueue`, or another study's best trials
(`optuna.enqueue_from`), run first, once, and are marked."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from tests.conftest import FAST_OVERRIDES

from agecls.errors import UsageError
from agecls.sweep.warm_start import enqueue_warm_starts, top_configurations, warm_starts

SPACE = {
    "optimizer": CategoricalDistribution(["adam", "nadam", "sgd"]),
    "optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
    "model.blocks": IntDistribution(2, 5),
}


def _ocfg(**kw):
    base = {"enqueue": [], "enqueue_from": None, "storage": "sqlite:///unused.db"}
    return OmegaConf.create({**base, **kw})


def test_listed_configurations_run_first_once_and_are_marked(tmp_path):
    storage = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    ocfg = _ocfg(enqueue=[{"optimizer": "nadam", "optimizer.lr": 0.001}, {"model.blocks": "4"}])
    entries = warm_starts(ocfg, SPACE)
    assert entries == [
        ("enqueue[0]", {"optimizer": "nadam", "optimizer.lr": 0.001}),
        ("enqueue[1]", {"model.blocks": 4}),
    ]
    assert enqueue_warm_starts(study, entries) == 2
    assert enqueue_warm_starts(study, entries) == 0  # a resume or a second worker adds nothing
    first, second, third = (study.ask(SPACE) for _ in range(3))
    assert (first.params["optimizer"], first.params["optimizer.lr"]) == ("nadam", 0.001)
    assert second.params["model.blocks"] == 4
    assert first.user_attrs["warm_start"] == "enqueue[0]" and "warm_start" not in third.user_attrs
    for trial in (first, second):
        study.tell(trial, 0.5)
    assert enqueue_warm_starts(study, entries) == 0  # already ran


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"optimzer": "adam"},
            "optuna.enqueue[0]: optimzer is not a key of the search space; valid: optimizer,",
        ),
        (
            {"optimizer": "rmsprop"},
            "optimizer='rmsprop' is not a choice of the search space; valid: ['adam', 'nadam', 'sgd']",
        ),
        ({"optimizer.lr": 0.5}, "optimizer.lr=0.5 is outside the search space; valid: 0.0001 to 0.1"),
        ({"model.blocks": "many"}, "model.blocks='many' is not a number; valid: 2 to 5"),
        ("adam", "expected a mapping of search-space keys to values"),
    ],
)
def test_a_warm_start_outside_the_space_is_refused_naming_it(entry, message):
    with pytest.raises(UsageError) as err:
        warm_starts(_ocfg(enqueue=[entry]), SPACE)
    assert message in str(err.value)


def test_another_studys_best_trials_seed_this_one(tmp_path):
    storage = f"sqlite:///{tmp_path}/o.db"
    small = optuna.create_study(study_name="at32", storage=storage, direction="maximize")
    space32 = {**SPACE, "data.image_size": CategoricalDistribution([32])}
    for value, optimizer, lr in [
        (0.4, "adam", 0.01),
        (0.6, "sgd", 0.05),
        (0.5, "nadam", 0.002),
        (0.7, "sgd", 0.5),
    ]:
        params = {"optimizer": optimizer, "optimizer.lr": lr, "model.blocks": 3, "data.image_size": 32}
        dists = {**space32, "optimizer.lr": FloatDistribution(1e-4, 1.0, log=True)}
        small.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    top = top_configurations(storage, "at32", 3, SPACE)
    # ranked by value; lr=0.5 lies outside this study's space, so that key is left to the sampler
    assert top == [
        {"optimizer": "sgd", "model.blocks": 3},
        {"optimizer": "sgd", "optimizer.lr": 0.05, "model.blocks": 3},
        {"optimizer": "nadam", "optimizer.lr": 0.002, "model.blocks": 3},
    ]
    ocfg = _ocfg(enqueue_from={"study": "at32", "storage": storage, "top": 2})
    assert [label for label, _ in warm_starts(ocfg, SPACE)] == ["at32#1", "at32#2"]
    with pytest.raises(UsageError, match="optuna.enqueue_from.study=nope: no such study"):
        warm_starts(_ocfg(enqueue_from={"study": "nope", "storage": storage}), SPACE)


def test_a_warm_start_runs_to_the_end_where_the_pruner_would_cut_it(tmp_path):
    """A real study whose pruner cuts every trial after epoch 1: the enqueued configuration is the study's
    known floor and finishes (marked where it would have been cut); the sampled trial is pruned."""
    out = tmp_path / "out"
    out.mkdir()
    overrides = [*FAST_OVERRIDES, "data.synthetic.n=200", "data.image_size=16", "trainer.max_epochs=2"]
    overrides += ["hydra/sweeper=agecls_optuna", "optimizer=choice(adam,nadam)", "tracking=none"]
    overrides += ["optuna.study_name=floor", "optuna.n_trials=2", "optuna/pruner=threshold"]
    overrides += ["optuna.pruner.lower=1.01", "optuna.pruner.n_warmup_steps=0", "optuna.n_jobs=1"]
    overrides += ["optuna.enqueue=[{optimizer: nadam}]", "optuna.register_best=false"]
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="floor", storage=f"sqlite:///{out}/optuna.db")
    warm, sampled = study.trials
    assert warm.user_attrs["warm_start"] == "enqueue[0]" and warm.params["optimizer"] == "nadam"
    assert warm.state == TrialState.COMPLETE and list(warm.intermediate_values) == [1, 2]
    assert warm.user_attrs["pruner_would_cut_at"] == 1
    assert sampled.state == TrialState.PRUNED and list(sampled.intermediate_values) == [1]
    assert "pruner_would_cut_at" not in sampled.user_attrs
