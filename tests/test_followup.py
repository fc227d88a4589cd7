"""After a study's n_trials: re-seeded top trials chosen by their seed mean, pruned trials continued to the
end from their last.ckpt (and promoted when they would have won), the seeds' ensemble on validation, and
the pruner judging each trial's best epoch so far."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from tests.conftest import FAST_OVERRIDES

from agecls.errors import UsageError
from agecls.study import fresh
from agecls.sweep.followup import (
    check_pruned,
    ensemble_val,
    followup_settings,
    pruned_candidates,
    reseed,
    reseed_job,
)
from agecls.sweep.selection import best_seed_run, chosen_trial, selection_table
from agecls.training.trial import PruningCallback

SPACE = {"optimizer": CategoricalDistribution(["adam", "nadam", "sgd", "rmsprop"])}
NAMES = SPACE["optimizer"].choices


class Done:
    def done(self) -> bool:
        return True


class FakeExecutor:
    """Runs nothing: each started job writes the results.json its run would, with the value `values` gives
    for (job name); records the commands it was given."""

    kind = "fake"

    def __init__(self, values: dict[str, float]) -> None:
        self.values, self.started = values, []

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, name: str) -> Done:
        self.started.append((name, cmd))
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir="))[len("hydra.run.dir=") :])
        results = {
            "objective": self.values[name],
            "epochs_trained": 4,
            "best_epoch": 3,
            "run_dir": str(run_dir),
            "mlflow_run_id": f"run-{name}",
            "checkpoint": str(run_dir / "checkpoints" / "best.ckpt"),
        }
        (run_dir / "results.json").write_text(json.dumps(results))
        return Done()


def _cfg(top: int = 0, seeds=(1, 2), check: int = 0, metrics=None, leader=()) -> OmegaConf:
    reseed = {"top": top, "seeds": list(seeds), "leader_seeds": list(leader)}
    return OmegaConf.create(
        {
            "optuna": {"reseed": reseed, "check_pruned": check},
            "objective": {"metric": "val/acc", "mode": "max", "metrics": metrics},
            "hydra": {"job": {"config_name": "train"}},
        }
    )


def _study(tmp_path: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize"
    )


def _trial_dir(tmp_path: Path, number: int, tracking: bool = True) -> Path:
    folder = tmp_path / f"trial-{number:04d}"
    (folder / "checkpoints").mkdir(parents=True)
    config = {
        "seed": 42,
        "trainer": {"max_epochs": 4},
        "tracking": {"enabled": tracking, "tags": {}},
        "optuna": {"trial": number},
    }
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    return folder


def _complete(study, tmp_path: Path, number: int, value: float) -> None:
    folder = _trial_dir(tmp_path, number)
    attrs = {"seed": 42, "run_dir": str(folder), "mlflow_run_id": f"run-{number}"}
    study.add_trial(
        create_trial(params={"optimizer": NAMES[number]}, distributions=SPACE, value=value, user_attrs=attrs)
    )


def _study_of(tmp_path: Path, values: list[float]) -> optuna.Study:
    """A study of COMPLETE trials 0, 1, ... with these values, each with its folder and config.yaml."""
    study = _study(tmp_path)
    for number, value in enumerate(values):
        _complete(study, tmp_path, number, value)
    return study


def test_a_reseed_of_an_untracked_trial_sets_no_tracking_keys(tmp_path):
    """tracking=none has no tags or run name: the re-seed's command must not set them (Hydra would refuse)."""
    folder = _trial_dir(tmp_path, 0, tracking=False)
    trial = create_trial(params={"optimizer": "adam"}, distributions=SPACE, value=0.5)
    trial.user_attrs["run_dir"] = str(folder)
    job = reseed_job(trial, 1, tmp_path, "s", "PARENT")
    assert not [part for part in job.cmd if "tracking." in part]
    assert "seed=1" in job.cmd and job.run_dir == tmp_path / "trial-0000-seed-1"


def test_a_reseed_of_a_promoted_trial_keeps_the_users_tags_but_not_the_continued_from(tmp_path):
    """A promoted trial's folder (trial-NNNN-continued) carries optuna.continued_from in its config.yaml; a
    re-seed of it is not a continuation, and Hydra would merge a dict override into the inherited tags."""
    from agecls.config import compose

    folder = tmp_path / "trial-0003-continued"
    folder.mkdir()
    inherited = {
        "team": "faces",
        "optuna.study": "s",
        "optuna.continued_from": "3",
        "mlflow.parentRunId": "P",
    }
    config = {"seed": 42, "tracking": {"enabled": True, "tags": inherited}}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    trial = create_trial(params={"optimizer": "adam"}, distributions=SPACE, value=0.5)
    trial.user_attrs["run_dir"] = str(folder)
    cmd = reseed_job(trial, 1, tmp_path, "s", "PARENT").cmd
    start = cmd.index("~tracking.tags")
    given = "++tracking.tags={" + ",".join(f"{k}:'{v}'" for k, v in inherited.items()) + "}"
    cfg = compose("train", ["tracking=mlflow", given, *cmd[start : start + 2]])
    assert cfg.tracking.tags == {
        "team": "faces",
        "optuna.study": "s",
        "optuna.reseed_of": str(trial.number),
        "mlflow.parentRunId": "PARENT",
    }


def test_top_trials_are_reseeded_and_chosen_by_their_seed_mean_once(tmp_path):
    # trial 0 is best on its one seed (0.80) but falls to 0.60 and 0.62 on others; trial 1 holds 0.77-0.79
    study = _study_of(tmp_path, [0.80, 0.78, 0.70])
    values = {"s-trial-0000-seed-1": 0.60, "s-trial-0000-seed-2": 0.62}
    values.update({"s-trial-0001-seed-1": 0.77, "s-trial-0001-seed-2": 0.79})
    executor = FakeExecutor(values)
    cfg = _cfg(top=2)

    assert reseed(study, cfg, executor, [{}, {}], tmp_path, "PARENT") == [0, 1]
    assert sorted(name for name, _ in executor.started) == sorted(values), "the top 2 only, each seed once"
    name, cmd = executor.started[0]
    assert cmd[cmd.index("--config-path") + 1] == str((tmp_path / "trial-0000").resolve())
    assert "seed=1" in cmd and "optuna.trial=null" in cmd
    tags = "+tracking.tags={optuna.study:'s',optuna.reseed_of:'0',mlflow.parentRunId:'PARENT'}"
    assert cmd[cmd.index(tags) - 1] == "~tracking.tags"
    assert f"hydra.run.dir={tmp_path / 'trial-0000-seed-1'}" in cmd

    study = fresh(study)
    first, second, third = study.trials
    assert first.user_attrs["reseeds"] == {"1": 0.60, "2": 0.62}
    assert first.user_attrs["seed_mean"] == pytest.approx((0.80 + 0.60 + 0.62) / 3)
    assert first.user_attrs["seed_std"] == pytest.approx(0.1101514)
    assert second.user_attrs["seed_mean"] == pytest.approx(0.78)
    assert second.user_attrs["seed_std"] == pytest.approx(0.01)
    assert "seed_mean" not in third.user_attrs
    assert study.best_trial.number == 0 and chosen_trial(study).number == 1
    assert best_seed_run(study, second) == (
        2,
        "run-s-trial-0001-seed-2",
        str(tmp_path / "trial-0001-seed-2"),
        0.79,
    )
    table = selection_table(study)
    assert table["trial"].tolist() == [1, 0, 2] and table["chosen"].tolist() == [True, False, False]
    assert table.loc[0, ["seed_1", "seed_2", "seed_42"]].tolist() == [0.77, 0.79, 0.78]

    # the same command again (a resumed study): the re-seeds' results.json exist, nothing runs twice
    again = FakeExecutor(values)
    reseed(fresh(study), cfg, again, [{}], tmp_path, "PARENT")
    assert again.started == []
    assert fresh(study).trials[1].user_attrs["seed_mean"] == pytest.approx(0.78)


def test_the_leader_gets_more_seeds_and_the_choice_is_made_again_over_all_of_them(tmp_path):
    """Top 2 on seed 1: trial 0 leads by its mean (0.80, 0.78) over trial 1 (0.76, 0.76). Its leader seeds 2
    and 3 (0.70, 0.70) pull its mean to 0.745, below trial 1's 0.76: trial 1 is chosen. Trial 1 got no extra
    seeds, and a resumed study runs nothing again and names the same leader."""
    study = _study_of(tmp_path, [0.80, 0.76, 0.70])
    values = {"s-trial-0000-seed-1": 0.78, "s-trial-0001-seed-1": 0.76}
    values.update({"s-trial-0000-seed-2": 0.70, "s-trial-0000-seed-3": 0.70})
    executor = FakeExecutor(values)
    cfg = _cfg(top=2, seeds=[1], leader=[2, 3])

    assert reseed(study, cfg, executor, [{}], tmp_path, "PARENT") == [0, 1]
    assert [name for name, _ in executor.started] == [
        "s-trial-0000-seed-1",
        "s-trial-0001-seed-1",
        "s-trial-0000-seed-2",
        "s-trial-0000-seed-3",
    ], "the top trials' seeds first, then the leader's"
    first, second, _ = fresh(study).trials
    assert first.user_attrs["reseeds"] == {"1": 0.78, "2": 0.70, "3": 0.70}
    assert first.user_attrs["leader_seeds"] == [2, 3]
    assert first.user_attrs["seed_mean"] == pytest.approx(0.745)
    assert second.user_attrs["reseeds"] == {"1": 0.76} and second.user_attrs["leader_seeds"] == []
    assert chosen_trial(fresh(study)).number == 1
    assert selection_table(fresh(study)).loc[1, ["seed_1", "seed_2", "seed_3", "seed_42"]].tolist() == [
        0.78,
        0.70,
        0.70,
        0.80,
    ]

    again = FakeExecutor(values)
    reseed(fresh(study), cfg, again, [{}], tmp_path, "PARENT")
    assert again.started == []
    assert fresh(study).trials[0].user_attrs["seed_mean"] == pytest.approx(0.745)
    assert fresh(study).trials[0].user_attrs["leader_seeds"] == [2, 3]


def test_leader_seeds_are_refused_when_they_repeat_the_seeds_and_off_without_top_trials():
    from agecls.sweep.followup import check_followups, leader_seeds

    # reseed.top=0 turns re-seeding off, the leader's seeds included (a sweep file's list stays quiet)
    assert leader_seeds(_cfg(top=0, seeds=[1], leader=[3])) == []
    assert leader_seeds(_cfg(top=2, seeds=[1], leader=[3])) == [3]
    with pytest.raises(UsageError, match=r"leader_seeds=\[1, 3\] repeats optuna.reseed.seeds=\[1\]"):
        check_followups(_cfg(top=2, seeds=[1], leader=[1, 3]))
    with pytest.raises(UsageError, match=r"leader_seeds=\['a'\]; valid: a list of distinct whole numbers"):
        check_followups(_cfg(top=2, seeds=[1], leader=["a"]))
    with pytest.raises(UsageError, match=r"optuna.reseed.leader is not a setting; valid: .*leader_seeds"):
        check_followups(OmegaConf.create({"optuna": {"reseed": {"top": 1, "seeds": [1], "leader": [2]}}}))
    check_followups(_cfg(top=2, seeds=[1], leader=[2, 3]))


def _pruned(study, tmp_path: Path, number: int, reported: dict[int, float]) -> Path:
    folder = _trial_dir(tmp_path, number)
    best = folder / "checkpoints" / "best.ckpt"
    callbacks = {"ModelCheckpoint{}": {"dirpath": str(folder / "checkpoints"), "best_model_path": str(best)}}
    callbacks["ModelCheckpoint{}"]["best_k_models"] = {str(best): 0.5}
    torch.save({"epoch": max(reported), "callbacks": callbacks}, folder / "checkpoints" / "last.ckpt")
    (folder / "run.json").write_text(json.dumps({"status": "pruned", "mlflow_run_id": f"run-{number}"}))
    attrs = {"seed": 42, "run_dir": str(folder), "max_epochs": 4}
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"optimizer": NAMES[number]},
            distributions=SPACE,
            intermediate_values=reported,
            user_attrs=attrs,
        )
    )
    return folder


def test_pruned_trials_continue_from_their_checkpoint_and_a_winner_joins_the_study(tmp_path, capsys):
    study = _study(tmp_path)
    _complete(study, tmp_path, 0, 0.70)
    _pruned(study, tmp_path, 1, {1: 0.40, 2: 0.55})  # best last value: continued first
    _pruned(study, tmp_path, 2, {1: 0.50, 2: 0.45})
    _pruned(study, tmp_path, 3, {1: 0.30})  # the worst: not among the 2 checked
    assert [t.number for t in pruned_candidates(study, 2)] == [1, 2]
    values = {"s-trial-0001-continued": 0.74, "s-trial-0002-continued": 0.66}
    executor = FakeExecutor(values)

    summary = check_pruned(study, _cfg(check=2), executor, [{}, {}], tmp_path, "PARENT")

    assert summary == {"study/pruned_checked": 2, "study/pruned_would_win": 1, "values": {1: 0.74}}
    out = capsys.readouterr().out
    assert "2 of 3 pruned trials continued to the end; 1 would have won (values trial 1: 0.7400" in out
    copy = tmp_path / "trial-0001-continued"
    name, cmd = executor.started[0]
    assert name == "s-trial-0001-continued"
    assert f"trainer.resume={copy}" in cmd and "trainer.max_epochs=4" in cmd
    config = OmegaConf.load(copy / "config.yaml")
    assert OmegaConf.to_container(config.tracking.tags) == {
        "optuna.study": "s",
        "optuna.continued_from": "1",
        "mlflow.parentRunId": "PARENT",
    }
    assert config.optuna.trial is None
    assert "mlflow_run_id" not in json.loads((copy / "run.json").read_text()), "its own MLflow run"
    state = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"][
        "ModelCheckpoint{}"
    ]
    assert state["best_model_path"] == str((copy / "checkpoints" / "best.ckpt").resolve())
    assert list(state["best_k_models"]) == [state["best_model_path"]]

    study = fresh(study)
    trials = {t.number: t for t in study.trials}
    assert trials[1].user_attrs["continued"] == {
        "value": 0.74,
        "epochs": 4,
        "run_dir": str(copy),
        "mlflow_run_id": "run-s-trial-0001-continued",
    }
    assert trials[2].user_attrs["continued"]["value"] == 0.66 and "continued" not in trials[3].user_attrs
    promoted = trials[4]
    assert promoted.state == TrialState.COMPLETE and promoted.value == 0.74
    assert promoted.params == {"optimizer": "nadam"} and promoted.user_attrs["continued_from"] == 1
    assert promoted.user_attrs["run_dir"] == str(copy) and study.best_trial.number == 4
    assert study.user_attrs == {"pruned_checked": 2, "pruned_would_win": 1}

    again = FakeExecutor(values)  # a resumed study: nothing runs or joins twice
    assert check_pruned(study, _cfg(check=2), again, [{}], tmp_path, "PARENT")["study/pruned_would_win"] == 1
    assert again.started == [] and len(fresh(study).trials) == 5


def test_followups_are_refused_for_several_objectives_and_bad_values():
    metrics = ["val/macro_f1", "model/params"]
    assert followup_settings(_cfg(metrics=metrics)) == (0, [1, 2], 0)
    with pytest.raises(
        UsageError, match=r"^optuna.reseed.top=3 with 2 objectives .*valid: optuna.reseed.top=0"
    ):
        followup_settings(_cfg(top=3, metrics=metrics))
    with pytest.raises(UsageError, match=r"^optuna.check_pruned=2 with 2 objectives"):
        followup_settings(_cfg(check=2, metrics=metrics))
    with pytest.raises(UsageError, match=r"optuna.reseed.seeds=\[1, 1\]; valid: a list of distinct"):
        followup_settings(_cfg(top=1, seeds=[1, 1]))
    with pytest.raises(UsageError, match=r"optuna.check_pruned=-1; valid: a whole number >= 0"):
        followup_settings(_cfg(check=-1))


def _predictions(folder: Path, p_male: list[float]) -> Path:
    folder.mkdir()
    (folder / "config.yaml").write_text(OmegaConf.to_yaml({"task": {"name": "gender", "target": "gender"}}))
    (folder / "results.json").write_text(json.dumps({"class_names": ["male", "female"]}))
    frame = pd.DataFrame({"row": [3, 5, 8, 9], "label": [0, 1, 0, 1], "pred": [0, 0, 0, 0]})
    frame["p_male"], frame["p_female"] = p_male, [1 - p for p in p_male]
    frame.to_csv(folder / "predictions_val.csv", index=False)
    return folder


def test_the_seeds_ensemble_is_scored_on_validation_from_their_predictions(tmp_path):
    # each seed gets one face wrong (macro-F1 0.733 alone); their mean probabilities get all four right
    a = _predictions(tmp_path / "a", [0.6, 0.45, 0.7, 0.55])
    b = _predictions(tmp_path / "b", [0.55, 0.3, 0.45, 0.2])
    assert ensemble_val([a]) == pytest.approx(0.7333333)
    assert ensemble_val([b]) == pytest.approx(0.7333333)
    assert ensemble_val([a, b]) == pytest.approx(1.0)


class _Trial:
    def __init__(self) -> None:
        self.reported: list[float] = []


def _callback(report: str, direction: str) -> PruningCallback:
    study = SimpleNamespace(direction=optuna.study.StudyDirection[direction.upper()])
    return PruningCallback(SimpleNamespace(study=study, trial=_Trial(), number=0), "val/macro_f1", report)


def test_the_pruner_sees_each_trials_best_epoch_so_far_unless_told_last():
    curve = [0.50, 0.61, 0.52, float("nan"), 0.58, 0.63]
    best = _callback("best", "maximize")
    assert [best._reported(v) for v in curve] == [0.50, 0.61, 0.61, 0.61, 0.61, 0.63]
    lowest = _callback("best", "minimize")
    assert [lowest._reported(v) for v in [1.2, 0.9, 1.1]] == [1.2, 0.9, 0.9]
    last = _callback("last", "maximize")
    assert [last._reported(v) for v in curve[:3]] == [0.50, 0.61, 0.52]
    with pytest.raises(ValueError, match=r"optuna.report='mean'; valid: best, last"):
        _callback("mean", "maximize")


def _trainer(epoch: int) -> SimpleNamespace:
    """A fitting trainer of 4 epochs at the end of validation of `epoch` (0-based), val/macro_f1 0.5."""
    return SimpleNamespace(
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        callback_metrics={"val/macro_f1": torch.tensor(0.5)},
        current_epoch=epoch,
        max_epochs=4,
        should_stop=False,
        fit_loop=SimpleNamespace(
            min_epochs=0, epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(is_last_batch=True))
        ),
    )


def test_no_trial_is_pruned_at_its_last_epoch_where_pruning_saves_nothing():
    """Successive halving with min_resource 2 and 4 epochs has a rung at 4: a trial that reached it has
    spent its budget, and pruning it there would only hide its value from the study's choice."""

    class Pruning(_Trial):
        def report(self, value: float, step: int) -> None:
            self.reported.append((step, value))

        def should_prune(self) -> bool:
            return True  # a pruner that would cut every trial at every rung

    callback = PruningCallback(
        SimpleNamespace(
            study=SimpleNamespace(direction=optuna.study.StudyDirection.MAXIMIZE), trial=Pruning()
        ),
        "val/macro_f1",
    )
    callback.ctx.number = 0
    for epoch, expect in ((3, None), (2, 3)):  # the last epoch of 4, then an epoch before it
        trainer = _trainer(epoch)
        callback.on_validation_end(trainer, None)
        assert callback.pruned_at == expect and trainer.should_stop == (expect is not None)
    assert callback.ctx.trial.reported == [(4, 0.5), (3, 0.5)]  # the last epoch is still reported


def test_a_kept_trial_is_asked_at_every_rung_but_never_stopped():
    """A warm start (keep): the pruner still sees each epoch (its rungs record the value) and the first
    epoch it would cut is recorded once; training goes on."""

    class Pruning(_Trial):
        def __init__(self) -> None:
            super().__init__()
            self.asked, self.attrs = 0, {}

        def report(self, value: float, step: int) -> None:
            self.reported.append(step)

        def should_prune(self) -> bool:
            self.asked += 1
            return True

        def set_user_attr(self, key: str, value) -> None:
            self.attrs[key] = value

    ctx = SimpleNamespace(study=SimpleNamespace(direction=optuna.study.StudyDirection.MAXIMIZE), number=0)
    ctx.trial = Pruning()
    callback = PruningCallback(ctx, "val/macro_f1", keep=True)
    for epoch in (0, 1, 2):
        trainer = _trainer(epoch)
        callback.on_validation_end(trainer, None)
        assert not trainer.should_stop and callback.pruned_at is None
    callback.on_train_end(trainer, None)  # raises nothing: the trial completes
    assert ctx.trial.reported == [1, 2, 3] and ctx.trial.asked == 3
    assert ctx.trial.attrs == {"pruner_would_cut_at": 1} and callback.would_cut_at == 1


def test_a_pruned_trial_is_continued_from_its_pruned_epoch_and_promoted(tmp_path):
    """A real study: trial 1 is pruned after epoch 1 (checkpoints/last.ckpt holds that epoch), continued to
    epoch 3 in its own MLflow run that logs epochs 2 and 3 only, and beats the best complete trial."""
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="late", storage=f"sqlite:///{out}/optuna.db", direction="maximize")
    space = {"optimizer": CategoricalDistribution(["adam", "nadam"])}
    study.add_trial(create_trial(params={"optimizer": "adam"}, distributions=space, value=0.0))
    overrides = [*FAST_OVERRIDES, "data.synthetic.n=200", "data.image_size=16", "trainer.max_epochs=3"]
    overrides += ["hydra/sweeper=agecls_optuna", "optimizer=choice(adam,nadam)", "tracking.experiment=late"]
    overrides += ["optuna.study_name=late", "optuna.n_trials=2", "optuna/pruner=threshold"]
    overrides += ["optuna.pruner.lower=1.01", "optuna.pruner.n_warmup_steps=0", "optuna.check_pruned=1"]
    overrides += ["optuna.reseed.top=1", "optuna.reseed.seeds=[7]"]
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 of 1 pruned trials continued to the end; 1 would have won" in done.stdout

    study = fresh(study)
    zero, pruned, promoted = study.trials
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    folder = Path(pruned.user_attrs["run_dir"])
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    copy = folder.with_name(folder.name + "-continued")
    results = json.loads((copy / "results.json").read_text())
    assert results["epochs_trained"] == 3
    continued = pruned.user_attrs["continued"]
    assert continued == {
        "value": results["objective"],
        "epochs": 3,
        "run_dir": str(copy),
        "mlflow_run_id": results["mlflow_run_id"],
    }
    assert promoted.state == TrialState.COMPLETE and promoted.value == results["objective"]
    assert promoted.user_attrs["continued_from"] == 1 and promoted.params == pruned.params

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    run = client.get_run(continued["mlflow_run_id"])
    assert run.data.tags["optuna.continued_from"] == "1" and run.info.status == "FINISHED"
    experiment = client.get_experiment_by_name("late").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`agecls.role` = 'study'")
    (pruned_run,) = client.search_runs([experiment], filter_string="tags.`optuna.trial` = '1'")
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id != pruned_run.info.run_id
    # the continuation trains epochs 2 and 3 only; the pruned run keeps its one epoch
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/macro_f1")] == [2, 3]
    assert [m.step for m in client.get_metric_history(pruned_run.info.run_id, "val/macro_f1")] == [1]

    # the promoted trial, best on its seed, is re-seeded; the study's record and @best follow the choice
    promoted = fresh(study).trials[2]
    seed_run = json.loads((copy.with_name(copy.name + "-seed-7") / "results.json").read_text())
    assert promoted.user_attrs["reseeds"] == {"7": seed_run["objective"]}
    record = client.get_run(parent.info.run_id).data
    assert record.metrics["study/pruned_checked"] == 1 and record.metrics["study/pruned_would_win"] == 1
    assert record.metrics["study/chosen_seed_mean"] == pytest.approx(
        (promoted.value + seed_run["objective"]) / 2
    )
    assert record.tags["best.trial"] == "2"
    assert record.tags["best.chosen_by"] == "mean validation value over seeds"
    best_seed = promoted.value >= seed_run["objective"]
    expected = promoted.user_attrs["mlflow_run_id"] if best_seed else seed_run["mlflow_run_id"]
    assert record.tags["best.run_id"] == expected
    version = client.get_model_version_by_alias("agecls-late", "best")
    assert version.run_id == expected


def test_followups_stopped_by_ctrl_c_end_the_studys_run_killed(tmp_path, monkeypatch):
    """Ctrl-C during re-seeds or continued trials: the study's MLflow run says KILLED (as after Ctrl-C during
    its trials), not RUNNING until someone runs the command again."""
    from mlflow import MlflowClient

    from agecls.sweep import sweeper
    from agecls.sweep.study_tracking import StudyRun

    def interrupted(*args):
        raise KeyboardInterrupt  # what run_jobs raises again on Ctrl-C, its jobs stopped

    monkeypatch.setattr(sweeper, "run_followups", interrupted)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    tracker = StudyRun(client=client, run_id=run_id, cfg=_cfg(top=1))
    with pytest.raises(KeyboardInterrupt):
        sweeper.followups(None, _cfg(top=1), None, [{}], tmp_path, tracker)
    assert client.get_run(run_id).info.status == "KILLED"
    with pytest.raises(KeyboardInterrupt):  # untracked: nothing to end
        sweeper.followups(None, _cfg(top=1), None, [{}], tmp_path, None)


def test_best_serves_the_seeds_ensemble_only_when_validation_prefers_it_and_argmax_decodes_it(tmp_path):
    from agecls.sweep.selection import served

    study = _study_of(tmp_path, [0.70, 0.60])
    values = {"s-trial-0000-seed-1": 0.72, "s-trial-0001-seed-1": 0.61}
    reseed(study, _cfg(top=2, seeds=[1]), FakeExecutor(values), [{}], tmp_path, "PARENT")

    def with_ensemble(number: int, ens: float):
        from agecls.study import set_finished_attrs

        set_finished_attrs(study, fresh(study).trials[number], {"ensemble_val": ens})
        return fresh(study).trials[number]

    kind, members, why = served(study, with_ensemble(0, 0.74))
    assert kind == "ensemble" and why == "the seeds' ensemble 0.7400 > the best seed 0.7200 on validation"
    assert members == ["run-s-trial-0000-seed-1", "run-0"]  # by seed: 1, then the trial's own 42
    kind, members, why = served(study, with_ensemble(0, 0.71))
    assert (kind, members) == ("seed", []) and why.startswith("the best seed 0.7200 >= the seeds' ensemble")
    # a coral head is decoded by its cumulative median, not the argmax a served ensemble would take
    (tmp_path / "trial-0000" / "config.yaml").write_text(OmegaConf.to_yaml({"task": {"head": "coral"}}))
    kind, _, why = served(study, with_ensemble(0, 0.74))
    assert kind == "seed" and "coral head" in why
