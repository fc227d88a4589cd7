"""Studies of several objectives (Pareto studies): the objectives on offer, their checks, and a study that
runs, resumes and writes its front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from torch import nn

from agecls.cli import train as cli_train
from agecls.errors import UsageError
from agecls.evaluation.objectives import (
    OBJECTIVES,
    compute_objectives,
    fairness_gap,
    latency_ms,
    param_count,
    worst_group_f1,
)
from agecls.study import open_study
from agecls.sweep.console import TrialView, pareto_front, status_line
from agecls.sweep.summary import write_summary
from agecls.sweep.warm_start import top_configurations

# The fairness view of an age run on validation (evaluate_splits' table): a group without faces is left out.
FAIRNESS = pd.DataFrame(
    [
        ("gender", "male", 10, 0.50, 0.6),
        ("gender", "female", 12, 0.80, 0.8),
        ("ethnicity", "white", 20, 0.90, 0.9),
        ("ethnicity", "black", 3, 0.40, 0.5),
        ("ethnicity", "asian", 5, 0.70, 0.7),
        ("ethnicity", "indian", 0, 0.10, 0.0),
    ],
    columns=["attribute", "group", "n", "macro_f1", "acc"],
)


def test_fairness_gap_and_worst_group_match_a_hand_computed_table():
    assert fairness_gap(FAIRNESS, "gender") == pytest.approx(0.80 - 0.50)
    assert worst_group_f1(FAIRNESS, "gender") == pytest.approx(0.50)
    # indian has no face on validation: neither its 0.10 nor its n count
    assert fairness_gap(FAIRNESS, "ethnicity") == pytest.approx(0.90 - 0.40)
    assert worst_group_f1(FAIRNESS, "ethnicity") == pytest.approx(0.40)
    one = FAIRNESS[FAIRNESS["group"].isin(["male", "white"])]
    with pytest.raises(
        ValueError, match=r"^the fairness table has one group of gender \(male\); a gap needs two$"
    ):
        fairness_gap(one, "gender")
    assert worst_group_f1(one, "gender") == pytest.approx(0.50)
    only_ethnicity = FAIRNESS[FAIRNESS["attribute"] == "ethnicity"]  # the table of a gender task
    with pytest.raises(
        ValueError, match=r"^the fairness table has no group of gender \(it covers: ethnicity\)$"
    ):
        worst_group_f1(only_ethnicity, "gender")


def test_objectives_of_a_run_count_parameters_and_time_the_model():
    shared = nn.Linear(4, 2)
    model = nn.Sequential(nn.Linear(3, 4), shared, nn.ReLU(), nn.Linear(2, 4), shared)
    assert param_count(model) == (3 * 4 + 4) + (4 * 2 + 2) + (2 * 4 + 4)  # the shared layer once: 38
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    conv.train()
    ms = latency_ms(conv, 8, 1, "cpu", batch=4, repeats=2, warmup=1)
    assert 0 < ms < 1000 and conv.training, "timed in eval mode, the module's mode restored"

    values = compute_objectives(
        macro_f1=0.61,
        fairness=FAIRNESS[FAIRNESS["attribute"] == "ethnicity"],
        module=model,
        fit_seconds=12.5,
        image_size=8,
        channels=1,
    )
    # no gender groups (a gender task), no latency unless asked for; in the order objectives are offered
    assert values == {
        "val/macro_f1": 0.61,
        "val/fairness_gap_ethnicity": pytest.approx(0.5),
        "val/worst_group_f1_ethnicity": pytest.approx(0.4),
        "model/params": 38.0,
        "train/wall_seconds": 12.5,
    }
    assert list(values) == [n for n in OBJECTIVES if n in values]


def _main(monkeypatch, capsys, out: Path, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("AGECLS_OUTPUT_DIR", str(out))
    monkeypatch.setattr(sys, "argv", ["agecls-train", *argv])
    with pytest.raises(SystemExit) as exited:
        cli_train.main()
    return exited.value.code, capsys.readouterr().err


TWO = ["objective.metrics=[val/macro_f1,model/params]"]
BAD = [
    (
        ["objective.metrics=[val/macro_f1]", "objective.directions=[maximize]"],
        'objective.metrics=["val/macro_f1"]: several objectives are a list of 2 or more (null: the one '
        "objective.metric); valid: " + ", ".join(OBJECTIVES),
    ),
    (
        ["objective.metrics=[val/macro_f1,val/fairness_gap]", "objective.directions=[maximize,minimize]"],
        "objective.metrics[1]=val/fairness_gap: not an objective on offer; did you mean "
        "val/fairness_gap_gender? valid: " + ", ".join(OBJECTIVES),
    ),
    (
        ["objective.metrics=[model/params,model/params]", "objective.directions=[minimize,minimize]"],
        'objective.metrics=["model/params","model/params"]: model/params is listed twice; valid: each '
        "objective once",
    ),
    (
        [*TWO, "objective.directions=[maximize]"],
        'objective.directions=["maximize"]: one direction (maximize or minimize) per objective.metrics entry '
        "(2), e.g. [maximize, minimize]",
    ),
    (
        [*TWO, "objective.directions=[maximize,down]"],
        "objective.directions[1]=down: valid: maximize, minimize",
    ),
    (
        ["objective.directions=[maximize,minimize]"],
        'objective.directions=["maximize","minimize"]: directions go with objective.metrics (one each); '
        "valid: null with objective.metrics=null",
    ),
    (
        [
            "task=gender",
            "objective.metrics=[val/macro_f1,val/fairness_gap_gender]",
            "objective.directions=[maximize,minimize]",
        ],
        "objective.metrics[1]=val/fairness_gap_gender: task=gender predicts gender, and its fairness view "
        "covers the other attributes' groups; valid: val/fairness_gap_ethnicity, "
        "val/worst_group_f1_ethnicity",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_objectives_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, overrides, message):
    out = tmp_path / "out"
    assert _main(monkeypatch, capsys, out, *overrides) == (2, f"agecls-train: error: {message}\n")
    assert not out.exists()


STUDY = ["hydra/sweeper=agecls_optuna", "tracking=none", "model.hidden=choice(16,32)"]
STUDY += [*TWO, "objective.directions=[maximize,minimize]"]


def test_a_pruner_or_a_single_objective_sampler_is_refused_before_the_study_opens(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    code, err = _main(monkeypatch, capsys, out, "-m", *STUDY, "optuna/pruner=median")
    assert (code, err) == (
        2,
        "agecls-train: error: optuna/pruner=median: optuna's pruners work with one objective, and "
        "objective.metrics has 2; valid: optuna/pruner=none (trials stop by early stopping: "
        "callbacks.early_stopping.*)\n",
    )
    cmaes = [
        "optuna/pruner=none",
        "optuna/sampler=random",
        "optuna.sampler._target_=optuna.samplers.CmaEsSampler",
    ]
    code, err = _main(monkeypatch, capsys, out, "-m", *STUDY, *cmaes)
    assert (code, err) == (
        2,
        "agecls-train: error: optuna.sampler._target_=optuna.samplers.CmaEsSampler: works with one "
        "objective, and objective.metrics has 2; valid: optuna/sampler=nsga2, qmc, random, tpe\n",
    )
    assert not (out / "optuna.db").exists()


def _ocfg(tmp_path: Path):
    return OmegaConf.create(
        {
            "study_name": "p",
            "storage": f"sqlite:///{tmp_path}/o.db",
            "heartbeat_interval": 30,
            "grace_period": 120,
            "retries": 1,
            "pruner": {"_target_": "optuna.pruners.NopPruner"},
        }
    )


def test_a_study_keeps_its_objectives_and_its_front_is_written(tmp_path):
    names = ["val/macro_f1", "model/params"]
    study = open_study(_ocfg(tmp_path), directions=["maximize", "minimize"], metric_names=names)
    assert study.metric_names == names and [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    again = open_study(_ocfg(tmp_path), directions=["maximize", "minimize"], metric_names=names)
    assert again.metric_names == names
    with pytest.raises(UsageError) as refused:
        open_study(_ocfg(tmp_path), "maximize")
    assert str(refused.value) == (
        f"study 'p' in sqlite:///{tmp_path}/o.db has the objectives [val/macro_f1 (maximize), model/params "
        "(minimize)]; this command asks for one objective, objective.metric (maximize); valid: the study's "
        "own objective.metrics and objective.directions, or another optuna.study_name for a new study"
    )

    space = {"model.hidden": CategoricalDistribution([16, 32, 64, 128])}
    for hidden, values in ((16, [0.50, 5000]), (32, [0.60, 9000]), (64, [0.55, 20000]), (128, [0.70, 40000])):
        study.add_trial(create_trial(params={"model.hidden": hidden}, distributions=space, values=values))
    # trial 2 (64) is worse than trial 1 (32) in both: off the front
    views = [TrialView(t.number, t.state.name, values=tuple(t.values), params=t.params) for t in study.trials]
    assert [t.number for t in pareto_front(views, ["maximize", "minimize"])] == [0, 1, 3]
    line = status_line(views, 6, 1, 90, names=names, directions=["maximize", "minimize"])
    assert line == (
        "4/6 done (4 complete, 0 pruned), 0 running, 0 failed | 1m30s elapsed, time left known once a trial "
        "ends | front 3 of 4 complete | best val/macro_f1 0.7000 (trial 3), model/params 5000 (trial 0)"
    )
    write_summary(study, tmp_path)
    assert (tmp_path / "best.txt").read_text() == (
        "Pareto front: 3 of 4 complete trials; objectives val/macro_f1 (maximize), model/params (minimize)\n"
        "trial 0: val/macro_f1 0.5000, model/params 5000\n  model.hidden=16\n"
        "trial 1: val/macro_f1 0.6000, model/params 9000\n  model.hidden=32\n"
        "trial 3: val/macro_f1 0.7000, model/params 40000\n  model.hidden=128\n"
    )
    csv = pd.read_csv(tmp_path / "trials.csv")
    assert csv["values_model/params"].tolist() == [5000, 9000, 20000, 40000]
    # warm starts from it: its front, best first by the first objective
    top = top_configurations(f"sqlite:///{tmp_path}/o.db", "p", 2, space)
    assert top == [{"model.hidden": 128}, {"model.hidden": 32}]


def _sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    tiny = ["data.synthetic.n=200", "data.image_size=16", "model.blocks=2", "model.base_channels=8"]
    tiny += ["trainer.max_epochs=1", "optuna/pruner=none", "optuna.study_name=pareto"]
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *tiny, *STUDY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)


@pytest.mark.slow
def test_a_study_of_two_objectives_runs_and_resumes(tmp_path):
    out = tmp_path / "out"
    first = _sweep(out, "optuna.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{out}/optuna.db")
    assert study.metric_names == ["val/macro_f1", "model/params"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.intermediate_values == {}, "no epoch reported"
    objectives = trial.user_attrs["objectives"]
    assert trial.values == [objectives["val/macro_f1"], objectives["model/params"]]
    assert set(objectives) == {n for n in OBJECTIVES if n != "model/latency_ms"}, "every one it can compute"
    results = json.loads((Path(trial.user_attrs["run_dir"]) / "results.json").read_text())
    assert results["objectives"] == objectives
    console = first.stdout + first.stderr
    assert (
        f"trial 0 COMPLETE values val/macro_f1 {trial.values[0]:.4f}, model/params {trial.values[1]:.0f}"
        in console
    )
    assert "front 1 of 1 complete | best val/macro_f1" in console

    again = _sweep(out, "optuna.n_trials=2")
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{out}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert study.trials[0].datetime_complete == trial.datetime_complete, "the first trial is kept, not re-run"
    assert (
        "trial 0 started" not in again.stdout + again.stderr
        and "trial 1 started" in again.stdout + again.stderr
    )
    second = study.trials[1]
    assert second.values == [second.user_attrs["objectives"][m] for m in study.metric_names]
    summaries = sorted(out.glob("multiruns/*/*/best.txt"))
    assert summaries and summaries[-1].read_text().startswith("Pareto front: ")
