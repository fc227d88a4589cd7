"""hydra-optuna-sweeper's conventions: `hydra/sweeper=optuna`, its keys under `hydra.sweeper` and its sampler
group, each meaning the agecls setting with the same meaning (agecls.sweep.plugin_keys)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from agecls.config import CONFIG_DIR
from agecls.errors import UsageError
from agecls.sweep.checks import SweepError
from agecls.sweep.plugin_keys import apply_plugin_keys, with_plugin_keys
from agecls.sweep.sampler import StudyGridSampler, grid_size, grid_values, study_sampler

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _applied(overrides: list[str]) -> tuple[DictConfig, list[str]]:
    cfg = _compose(["hydra/sweeper=optuna", *overrides])
    return cfg, apply_plugin_keys(cfg)


def test_hydra_sweeper_optuna_selects_agecls_sweeper_with_the_typed_optuna_block(output_dir):
    cfg = _compose(["hydra/sweeper=optuna"])
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.agecls_sweeper.optuna_sweeper.PluginKeysSweeper"
    assert OmegaConf.get_type(cfg.optuna).__name__ == "OptunaSettings"
    # every plugin key unset: nothing changes, the plugin's own defaults (minimize, n_jobs 2) do not apply
    plain = _compose([])
    assert apply_plugin_keys(cfg) == []
    assert cfg.optuna.n_trials == plain.optuna.n_trials == 20 and cfg.optuna.n_jobs == 1
    assert cfg.objective.mode == "max" and cfg.optuna.sampler == plain.optuna.sampler
    with pytest.raises(ConfigCompositionException) as raised:
        _compose(["hydra/sweeper=optuna", "hydra.sweeper.n_trails=3"])
    assert "Key 'n_trails' not in 'PluginKeysSweeperConf'" in str(raised.value.__cause__)


def test_each_plugin_key_sets_the_agecls_setting_with_its_meaning(output_dir):
    cfg, lines = _applied(
        [
            "hydra.sweeper.n_trials=7",
            "hydra.sweeper.n_jobs=3",
            "hydra.sweeper.study_name=plug",
            "hydra.sweeper.storage=sqlite:////tmp/plug.db",
            "hydra.sweeper.direction=minimize",
            "hydra.sweeper.max_failure_rate=0.5",
            "+hydra.sweeper.params={model.dropout: 'interval(0.1, 0.5)'}",
            "+hydra.sweeper.params.optimizer.lr='tag(log, interval(1e-4, 1e-2))'",  # nests: read as one key
        ]
    )
    assert (cfg.optuna.n_trials, cfg.optuna.n_jobs) == (7, 3)
    assert (cfg.optuna.study_name, cfg.optuna.storage) == ("plug", "sqlite:////tmp/plug.db")
    assert cfg.objective.mode == "min"
    assert cfg.optuna.max_failures == 3  # the plugin stops past half the trials failed: more than 3 of 7
    assert cfg.optuna.params == {
        "model.dropout": "interval(0.1, 0.5)",
        "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
    }
    # what a trial process reads of its own config comes to it as overrides
    assert lines == [
        "optuna.study_name='plug'",
        "optuna.storage='sqlite:////tmp/plug.db'",
        "objective.mode='min'",
    ]


@pytest.mark.parametrize(
    ("option", "target", "keys"),
    [
        ("tpe", "TPESampler", {"n_startup_trials": 10, "n_ei_candidates": 24, "multivariate": False}),
        ("random", "RandomSampler", {}),
        ("cmaes", "CmaEsSampler", {"x0": None, "sigma0": None}),
        ("nsgaii", "NSGAIISampler", {"population_size": 50, "crossover_prob": 0.9, "swapping_prob": 0.5}),
        ("grid", "GridSampler", {}),
    ],
)
def test_the_plugins_sampler_group_becomes_optuna_sampler(output_dir, option, target, keys):
    cfg, _ = _applied([f"hydra/sweeper/sampler={option}", "hydra.sweeper.sampler.seed=123"])
    assert cfg.optuna.sampler._target_ == f"optuna.samplers.{target}"
    assert cfg.optuna.sampler.seed == 123
    assert {k: cfg.optuna.sampler[k] for k in keys} == keys
    assert target in dir(optuna.samplers)  # a sampler the installed Optuna still has


def test_a_sampler_seed_alone_seeds_agecls_own_sampler(output_dir):
    cfg, _ = _applied(["hydra.sweeper.sampler.seed=123"])
    assert OmegaConf.to_container(cfg.optuna.sampler) == {
        "_target_": "optuna.samplers.TPESampler",
        "seed": 123,
        "n_startup_trials": 5,
        "multivariate": True,
    }


def test_several_directions_set_objective_directions(output_dir):
    cfg, lines = _applied(
        ["objective.metrics=[val/macro_f1,model/params]", "hydra.sweeper.direction=[maximize,minimize]"]
    )
    assert list(cfg.objective.directions) == ["maximize", "minimize"]
    assert lines == ["objective.directions=['maximize','minimize']"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sweep=demo", "hydra.sweeper.n_trials=3"],
            "hydra.sweeper.n_trials=3 and optuna.n_trials=8 are the same setting with different values",
        ),
        (
            ["objective.mode=min", "hydra.sweeper.direction=maximize"],
            "hydra.sweeper.direction=maximize and objective.mode=min are the same setting",
        ),
        (
            ["optuna.sampler.seed=5", "hydra.sweeper.sampler.seed=123"],
            "hydra.sweeper.sampler.seed=123 and optuna.sampler.seed=5 are the same setting",
        ),
        (
            ["optuna/sampler=random", "hydra/sweeper/sampler=nsgaii"],
            "hydra/sweeper/sampler=nsgaii (sets {_target_: optuna.samplers.NSGAIISampler, seed: null, ",
        ),
        (
            ["sweep=demo", "+hydra.sweeper.params={model.blocks: 'range(2, 6)'}"],
            "hydra.sweeper.params.model.blocks=range(2, 6) and optuna.params.model.blocks=range(2, 3) are",
        ),
        (
            ["optuna.max_failures=1", "hydra.sweeper.max_failure_rate=0.5"],
            "hydra.sweeper.max_failure_rate=0.5 of 20 trials and optuna.max_failures=1 are the same setting",
        ),
        (["hydra.sweeper.direction=up"], "hydra.sweeper.direction=up: valid: minimize, maximize, or a list"),
        (["hydra.sweeper.max_failure_rate=2"], "hydra.sweeper.max_failure_rate=2.0: valid: a share from 0.0"),
        (
            ["hydra.sweeper.direction=[maximize,minimize]"],
            "hydra.sweeper.direction lists 2 directions and objective.metrics has 0 metrics",
        ),
        (["+hydra.sweeper.search_space={x: {type: float}}"], "hydra.sweeper.search_space: the plugin's"),
        (["hydra.sweeper.custom_search_space=my.fn"], "hydra.sweeper.custom_search_space: a Python function"),
        (
            ["hydra.sweeper._target_=hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"],
            "hydra-optuna-sweeper is not installed; agecls runs the same keys with its own sweeper: delete",
        ),
    ],
)
def test_a_setting_given_both_ways_differently_or_meaningless_here_is_refused(output_dir, overrides, message):
    with pytest.raises(UsageError) as raised:
        _applied(overrides)
    assert message in str(raised.value)


def test_the_same_value_both_ways_is_accepted_and_agecls_sweeper_ignores_the_mapping(output_dir):
    cfg, _ = _applied(["sweep=demo", "hydra.sweeper.n_trials=8", "hydra.sweeper.study_name=demo"])
    assert cfg.optuna.n_trials == 8
    own = _compose(["sweep=demo"])  # hydra/sweeper=agecls_optuna: no plugin keys to read
    assert with_plugin_keys(own) is own and apply_plugin_keys(own) == []


def test_a_grid_is_every_value_of_the_space_and_caps_the_trials():
    assert grid_values(IntDistribution(1, 3)) == [1, 2, 3]
    assert grid_values(IntDistribution(0, 10, step=5)) == [0, 5, 10]
    assert grid_values(FloatDistribution(-1.0, 1.0, step=1.0)) == [-1.0, 0.0, 1.0]
    assert grid_values(CategoricalDistribution(["foo", "bar"])) == ["foo", "bar"]
    with pytest.raises(SweepError, match="a grid needs a choice or a range with a step"):
        grid_values(FloatDistribution(0.1, 0.5))
    space = {"x": CategoricalDistribution([-1, 1]), "y": FloatDistribution(-1.0, 1.0, step=1.0)}
    sampler = study_sampler(OmegaConf.create({"_target_": "optuna.samplers.GridSampler", "seed": 0}), space)
    assert isinstance(sampler, StudyGridSampler) and grid_size(sampler) == 6
    study = optuna.create_study(sampler=sampler)
    points = []
    for _ in range(6):
        trial = study.ask(space)
        points.append((trial.params["x"], trial.params["y"]))
        study.tell(trial, 0.0)  # the grid's end stops nothing here: agecls's loop counts the trials
    assert sorted(points) == [(x, y) for x in (-1, 1) for y in (-1.0, 0.0, 1.0)]
    assert grid_size(study_sampler(OmegaConf.create({"_target_": "optuna.samplers.RandomSampler"}))) is None


def test_agecls_train_refuses_a_disagreement_in_one_line_before_opening_a_study(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", "sweep=demo", "hydra/sweeper=optuna"]
    cmd.append("hydra.sweeper.n_trials=3")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "agecls-train: error: hydra.sweeper.n_trials=3 and optuna.n_trials=8 are the same setting with "
        "different values; valid: set one of them, or both to the same value"
    )
    assert not (out / "optuna.db").exists()


TINY = [
    "data.synthetic.n=300",
    "data.image_size=32",
    "data.batch_size=32",
    "model.blocks=2",
    "model.base_channels=8",
    "model.hidden=32",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "tracking=none",
]


def test_a_sweep_written_the_plugins_way_on_the_command_line_runs_as_a_study(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    plugin = [
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=5",  # capped at the grid's 2 points
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.study_name=plug",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/plug.db",
        "hydra.sweeper.direction=maximize",
        "optimizer=choice(adam, nadam)",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *plugin]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="plug", storage=f"sqlite:///{tmp_path}/plug.db")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert sorted(t.params["optimizer"] for t in study.trials) == ["adam", "nadam"]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert not (out / "optuna.db").exists()  # the storage the plugin's key named, not agecls's default
    _check_results(tmp_path / "sweep", study)
    assert study.metric_names == ["val/macro_f1"]  # optuna-dashboard's label for the one objective
    assert "value" in (tmp_path / "sweep" / "trials.csv").read_text().splitlines()[0].split(",")


def _template_block() -> str:
    """The translated lightning-hydra-template file, as docs/SWEEPS.md shows it."""
    text = (ROOT / "docs" / "SWEEPS.md").read_text()
    section = text.split("#### From lightning-hydra-template", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def _check_results(sweep_dir: Path, study: optuna.Study) -> dict:
    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    assert results == {
        "name": "optuna",
        "best_params": study.best_trial.params,
        "best_value": study.best_value,
    }
    return results


def test_the_translated_template_file_runs_as_a_study_and_writes_the_plugins_results(tmp_path):
    conf = tmp_path / "my_conf"
    (conf / "sweep").mkdir(parents=True)
    (conf / "sweep" / "mnist_optuna.yaml").write_text(_template_block())
    out, sweep_dir = tmp_path / "out", tmp_path / "sweep"
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    # no -m: the file's hydra.mode makes it a sweep; 2 trials and tiny data keep it short
    cmd = [sys.executable, "-m", "agecls.cli.train", "--config-dir", str(conf), "sweep=mnist_optuna"]
    tiny = ["data.synthetic.n=300", "data.image_size=32", "trainer.max_epochs=1", "tracking=none"]
    cmd += [*tiny, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}", "optuna/pruner=none"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="agecls", storage=f"sqlite:///{out}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    searched = {"optimizer.lr", "data.batch_size", "model.hidden", "model.base_channels", "model.blocks"}
    assert all(set(t.params) == searched for t in study.trials)
    assert all(0.0001 <= t.params["optimizer.lr"] <= 0.1 for t in study.trials)
    results = _check_results(sweep_dir, study)
    assert set(results["best_params"]) == searched


def test_optimization_results_are_the_plugins_shape_and_follow_the_study(tmp_path):
    from agecls.sweep.results import write_optimization_results

    study = optuna.create_study(direction="maximize")
    assert write_optimization_results(study, tmp_path) is None  # nothing complete yet: no file
    study.enqueue_trial({"x": 0.25, "opt": "adam"})
    study.optimize(
        lambda t: t.suggest_float("x", 0, 1) + (t.suggest_categorical("opt", ["adam", "sgd"]) == "sgd"), 1
    )
    write_optimization_results(study, tmp_path)
    assert _check_results(tmp_path, study)["best_value"] == 0.25
    study.enqueue_trial({"x": 0.5, "opt": "sgd"})  # the study resumed: the file follows its new best
    study.optimize(
        lambda t: t.suggest_float("x", 0, 1) + (t.suggest_categorical("opt", ["adam", "sgd"]) == "sgd"), 1
    )
    write_optimization_results(study, tmp_path)
    assert _check_results(tmp_path, study) == {
        "name": "optuna",
        "best_params": {"x": 0.5, "opt": "sgd"},
        "best_value": 1.5,
    }
    pareto = optuna.create_study(directions=["maximize", "minimize"])
    for x, y in ((1.0, 1.0), (2.0, 2.0), (1.0, 2.0)):
        pareto.add_trial(
            optuna.trial.create_trial(
                params={"x": x}, distributions={"x": FloatDistribution(0, 3)}, values=[x, y]
            )
        )
    write_optimization_results(pareto, tmp_path)
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "optimization_results.yaml")) == {
        "name": "optuna",
        "solutions": [
            {"params": {"x": 1.0}, "values": [1.0, 1.0]},
            {"params": {"x": 2.0}, "values": [2.0, 2.0]},
        ],
    }
