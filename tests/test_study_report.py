"""The study report does not mislead: pruned trials are drawn and listed with their last value, and
parameter importances are withheld when too few trials stand behind them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib
import optuna
import pandas as pd
import pytest

from agecls.evaluation.report import leaderboard
from agecls.evaluation.study_report import trials_table, write_plots

matplotlib.use("Agg")


def _study(n_complete: int, n_pruned: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(n_complete + n_pruned):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        for epoch in range(1, 4 if i < n_complete else 3):
            trial.report(0.1 * i + 0.01 * epoch, epoch)
        if i < n_complete:
            study.tell(trial, 0.1 * i + 0.03)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study


def test_pruned_trials_show_their_last_value_and_epoch():
    table = trials_table(_study(2, 2))
    assert list(table["state"]) == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    pruned = table[table["state"] == "PRUNED"]
    assert pruned["value"].isna().all()
    assert pruned["last_epoch"].tolist() == [2, 2]
    assert pruned["last_value"].tolist() == pytest.approx([0.32, 0.22])  # trial 3 then 2: by last value
    assert table.loc[0, "last_epoch"] == 3 and table.loc[0, "value"] == pytest.approx(0.13)


def test_importances_are_withheld_below_the_minimum_and_history_counts_pruned(tmp_path, caplog):
    study = _study(3, 2)
    written = {p.name for p in write_plots(study, tmp_path, None, min_importance_trials=8)}
    assert "param_importances.png" not in written
    assert {"optimization_history.png", "intermediate_values.png"} <= written
    assert "param importances withheld: 3 complete trials, fewer than min_importance_trials=8" in caplog.text

    many = _study(8, 1)
    assert "param_importances.png" in {p.name for p in write_plots(many, tmp_path, None)}


def test_history_title_counts_each_state(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from agecls.evaluation import study_report

    titles = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: titles.append(fig.axes[0].get_title()))
    study_report.history_plot(_study(2, 3), tmp_path / "h.png")
    assert titles == ["Optimisation history: 2 complete, 3 pruned, 0 failed"]


def test_the_mlflow_leaderboard_gives_a_pruned_run_its_last_validation_value():
    runs = pd.DataFrame(
        {
            "run_id": ["aaaaaaaa11", "bbbbbbbb22"],
            "status": ["FINISHED", "KILLED"],
            "tags.trial_state": [None, "PRUNED"],
            "metrics.best_val/macro_f1": [0.61, None],
            "metrics.val/macro_f1": [0.58, 0.44],
        }
    )
    table = leaderboard(runs)
    assert table["status"].tolist() == ["FINISHED", "PRUNED"]
    assert table["last_val/macro_f1"].isna().tolist() == [True, False]
    assert table.loc[1, "last_val/macro_f1"] == pytest.approx(0.44)


def test_an_unknown_experiment_without_a_study_is_one_line_exit_1(output_dir, tmp_path, monkeypatch, capsys):
    import mlflow

    import agecls.study
    from agecls.cli import report as report_cli
    from agecls.errors import AgeclsError
    from agecls.evaluation.report import NoSuchExperiment, load_runs

    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: None)
    monkeypatch.setattr(mlflow, "search_experiments", lambda: [SimpleNamespace(name="other")])
    with pytest.raises(NoSuchExperiment) as caught:
        load_runs("sqlite:///x.db", "nosuch")
    assert isinstance(caught.value, AgeclsError) and caught.value.exit_code == 1
    monkeypatch.setattr(agecls.study, "find_study", lambda storage, name: None)
    assert report_cli.main(["nosuch", "tracking_uri=sqlite:///x.db", f"out={tmp_path}"]) == 1
    assert capsys.readouterr().err == (
        "agecls-report: error: no MLflow experiment named 'nosuch' in sqlite:///x.db; experiments: other\n"
    )


def test_intermediate_values_are_drawn_only_when_a_trial_reported_two_epochs(tmp_path):
    study = optuna.create_study(direction="maximize")
    for i in range(3):
        trial = study.ask()
        trial.report(0.5 + 0.01 * i, 1)  # every trial ran one epoch: one dot each, nothing to read
        study.tell(trial, 0.5 + 0.01 * i)
    assert [p.name for p in write_plots(study, tmp_path, None)] == ["optimization_history.png"]
    trial = study.ask()
    for epoch in (1, 2):
        trial.report(0.4 + 0.1 * epoch, epoch)
    study.tell(trial, 0.6)
    written = [p.name for p in write_plots(study, tmp_path, None)]
    assert written == ["optimization_history.png", "intermediate_values.png"]


def test_a_confusion_figure_is_titled_with_its_trial(tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np

    from agecls.evaluation.study_report import titled_figure, trial_caption

    study = _study(2, 0)
    best = study.best_trial
    best.set_user_attr("mlflow_run_id", "1a2b3c4d5e6f")
    assert trial_caption(study, best) == "Trial 1: value 0.1300 (MLflow run 1a2b3c4d)"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("objective:\n  metric: val/acc\n")
    first = study.trials[0]
    first.set_user_attr("run_dir", str(run_dir))
    assert trial_caption(study, first) == "Trial 0: val/acc 0.0300"  # the run's objective
    study.set_metric_names(["val/macro_f1"])
    assert trial_caption(study, first) == "Trial 0: val/macro_f1 0.0300"
    plain = tmp_path / "plain.png"
    plt.imsave(plain, np.ones((120, 300, 3)))  # a white figure as MLflow holds it
    titled = plt.imread(titled_figure(plain, tmp_path / "titled.png", "Trial 1: value 0.1300"))
    assert titled.shape[:2] == (156, 300)  # a band of 36 px on top
    band, below = titled[:36, :, :3], titled[36:, :, :3]
    assert band.min() < 0.2 and below.min() == pytest.approx(
        1.0
    )  # the title's dark text, the figure unchanged


def test_commands_are_named_as_the_user_can_type_them(tmp_path, monkeypatch):
    from agecls.cli import report as report_cli

    venv = tmp_path / "checkout" / ".venv" / "bin"
    venv.mkdir(parents=True)
    for name in ("python", "agecls-serve", "mlflow"):
        (venv / name).write_text("#!/bin/sh\n")
        (venv / name).chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(report_cli.sys, "executable", str(venv / "python"))
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the checkout's environment not activated
    assert report_cli._program("agecls-serve") == str(venv / "agecls-serve")
    assert report_cli.browse_line("sqlite:///x.db") == (
        f"Browse every run:  {venv / 'mlflow'} ui --backend-store-uri sqlite:///x.db   "
        "(then open http://127.0.0.1:5000)"
    )
    assert report_cli.dashboard_line("sqlite:///o.db") == (
        "Dashboard:  pip install 'agecls[dashboard]', then optuna-dashboard sqlite:///o.db"
    )
    monkeypatch.setenv("PATH", f"{venv}:/usr/bin:/bin")  # activated: the name is enough
    assert report_cli._program("agecls-serve") == "agecls-serve"
    (venv / "optuna-dashboard").write_text("#!/bin/sh\n")
    (venv / "optuna-dashboard").chmod(0o755)
    assert report_cli.dashboard_line("sqlite:///o.db") == "Dashboard:  optuna-dashboard sqlite:///o.db"


def _tracked_study(tmp_path: Path, experiment: str, study_name: str) -> tuple[str, str, list[str]]:
    """An MLflow store with experiment `experiment` holding one plain run and study `study_name`'s parent
    run and two trial runs (each with a confusion figure), and the Optuna storage of that study."""
    import matplotlib.pyplot as plt
    import numpy as np
    from mlflow import MlflowClient

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    client.set_terminated(client.create_run(exp, tags={"overrides": "optimizer=sgd"}).info.run_id)
    parent = client.create_run(exp, tags={"optuna.study": study_name, "agecls.role": "study"}).info.run_id
    figure = tmp_path / "confusion.png"
    plt.imsave(figure, np.ones((60, 120, 3)))
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize")
    run_ids = []
    for i, lr in enumerate(("1e-3", "1e-2")):
        tags = {"optuna.study": study_name, "mlflow.parentRunId": parent, "overrides": f"optimizer.lr={lr}"}
        run_id = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(run_id, "best_val/macro_f1", 0.5 + 0.1 * i)
        client.log_artifact(run_id, str(figure), "evaluation")
        client.set_terminated(run_id)
        trial = study.ask()
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.report(0.5 + 0.1 * i, 1)
        study.tell(trial, 0.5 + 0.1 * i)
        run_ids.append(run_id)
    client.set_terminated(parent)
    return uri, storage, run_ids


def test_a_study_named_apart_from_its_experiment_gets_the_leaderboard_of_its_runs(
    output_dir, tmp_path, capsys
):
    from agecls.cli import report as report_cli

    uri, storage, run_ids = _tracked_study(tmp_path, "demo", "ovh")
    out = tmp_path / "rep"
    assert report_cli.main(["ovh", f"tracking_uri={uri}", f"storage={storage}", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "\nLeaderboard of study 'ovh' (its runs in MLflow experiment 'demo') (2 runs, ranked by" in printed
    board = pd.read_csv(out / "leaderboard.csv")
    assert board["run"].tolist() == [run_ids[1][:8], run_ids[0][:8]]  # the plain run of `demo` is not one
    assert board["optimizer.lr"].tolist() == [0.01, 0.001]
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "compute.json",
        "confusion_trial0000.png",
        "confusion_trial0001.png",
        "leaderboard.csv",
        "leaderboard.md",
        "optimization_history.png",
        "trials.csv",
    ]  # one epoch per trial: no intermediate_values.png
    assert "plots: optimization_history.png, confusion_trial0001.png, confusion_trial0000.png" in printed
    assert f"\n{report_cli.dashboard_line(storage)}\n" in printed and "Dashboard:  pip" not in printed
    assert f"\n{report_cli.browse_line(uri)}\n" in printed
    for hint in ("Dashboard:  ", "Browse every run:  "):  # typed as given, from any folder
        command = printed.split(hint)[1].split()[0]
        assert command in ("optuna-dashboard", "mlflow") or Path(command).is_absolute(), command


def test_a_study_whose_runs_are_not_in_the_store_says_what_to_pass(output_dir, tmp_path, capsys):
    from agecls.cli import report as report_cli

    _, storage, _ = _tracked_study(tmp_path, "demo", "ovh")
    other = f"sqlite:///{tmp_path}/other.db"
    assert (
        report_cli.main(["ovh", f"tracking_uri={other}", f"storage={storage}", f"out={tmp_path / 'r'}"]) == 0
    )
    printed = capsys.readouterr().out
    assert (
        f"\nNo leaderboard: no MLflow experiment named 'ovh' in {other}; experiments: Default, and none of "
        "its runs is tagged optuna.study=ovh. Pass the store the study's runs went to: tracking_uri=... (its "
        "tracking.tracking_uri).\n"
    ) in printed
    assert not (tmp_path / "r" / "leaderboard.csv").exists() and (tmp_path / "r" / "trials.csv").is_file()
