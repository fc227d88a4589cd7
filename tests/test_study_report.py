"""The study report does not mislead: pruned trials are drawn and listed with their last value, and
parameter importances are withheld when too few trials stand behind them."""

from __future__ import annotations

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
