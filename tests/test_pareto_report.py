"""Reading a multi-objective study: the front and its named points, a user's rule, pareto.csv with bootstrap
intervals from each trial's validation predictions, the report's plot, and registry aliases that agecls-serve
and agecls-predict resolve to the right trial's run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from agecls.errors import AgeclsError
from agecls.evaluation import pareto
from agecls.evaluation.pareto import RULE_FORM, RuleError, apply_rule, parse_rule

F1, GAP, PARAMS = "val/macro_f1", "val/fairness_gap_ethnicity", "model/params"
# (F1, gap, params) of trials 0..4: 3 is dominated by 0; 0, 1, 2 and 4 make the front.
VALUES = [(0.70, 0.20, 5e5), (0.69, 0.05, 6e5), (0.60, 0.10, 1e5), (0.65, 0.30, 9e5), (0.695, 0.08, 5e5)]
LR = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _study(
    storage: str | None = None, name: str = "front", attrs: list[dict] | None = None, values=VALUES
) -> optuna.Study:
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"], storage=storage, study_name=name
    )
    study.set_metric_names([F1, GAP, PARAMS])
    for i, v in enumerate(values):
        extra = (attrs or [{}] * len(values))[i]
        study.add_trial(
            optuna.trial.create_trial(
                values=list(v),
                params={"lr": 1e-3 * (i + 1)},
                distributions=LR,
                user_attrs={"objectives": {"model/latency_ms": 3.0 - 0.5 * i}, **extra},
            )
        )
    return study


def test_the_front_and_its_named_points():
    study = _study()
    assert [t.number for t in pareto.pareto_front(study)] == [0, 1, 2, 4]
    named = {alias: t.number for alias, t in pareto.named_points(study).items()}
    assert named == {"best_f1": 0, "fairest": 1, "smallest": 2}
    # a study without a params objective has no `smallest`; a worst-group F1 stands in for a gap
    two = optuna.create_study(directions=["maximize", "maximize"])
    two.set_metric_names([F1, "val/worst_group_f1_gender"])
    for v in [(0.7, 0.5), (0.6, 0.55), (0.5, 0.52)]:
        two.add_trial(optuna.trial.create_trial(values=list(v)))
    assert {a: t.number for a, t in pareto.named_points(two).items()} == {"best_f1": 0, "fairest": 1}


@pytest.mark.parametrize(
    ("rule", "trial"),
    [
        ("min val/fairness_gap_ethnicity where val/macro_f1 >= best - 0.01", 1),
        ("min val/fairness_gap_ethnicity where val/macro_f1>=best-0.005", 4),
        ("max val/macro_f1 where model/params <= 2e5", 2),
        ("max val/macro_f1 where val/fairness_gap_ethnicity < 0.1 and model/params < 6e5", 4),
        ("min model/latency_ms where val/macro_f1 >= 0.68", 4),  # an objective the trials recorded
        ("max val/macro_f1", 0),
    ],
)
def test_a_rule_picks_its_trial(rule, trial):
    assert apply_rule(rule, _study()).number == trial


def test_a_rule_reads_back_as_written():
    rule = parse_rule(
        "min val/fairness_gap_ethnicity where val/macro_f1 >= best - 0.01 and model/params <= 2e6"
    )
    assert (rule.goal, rule.objective) == ("min", GAP)
    assert [str(c) for c in rule.conditions] == ["val/macro_f1 >= best - 0.01", "model/params <= 2e+06"]


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ("", "is empty"),
        ("smallest val/macro_f1", "starts with 'smallest', not min or max"),
        ("min", "expected an objective after 'min', got the end"),
        ("min val/macro_f1 if x", "expected 'where' or the end after val/macro_f1, got 'if'"),
        (
            "min model/params where val/macro_f1",
            "expected one of >=, <=, >, < after val/macro_f1, got the end",
        ),
        (
            "min model/params where val/macro_f1 = 1",
            "expected one of >=, <=, >, < after val/macro_f1, got '='",
        ),
        (
            "min model/params where val/macro_f1 >= top",
            "expected best, best - X, best + X or a number after '>=', got 'top'",
        ),
        ("min model/params where val/macro_f1 >= best -", "expected a number after 'best -', got the end"),
        (
            "min model/params where val/macro_f1 >= best * 0.99",
            "expected 'and' or the end after val/macro_f1 >= best, got '*'",
        ),
        (
            "min model/params where val/macro_f1 >= 0.5 or x",
            "expected 'and' or the end after val/macro_f1 >= 0.5, got 'or'",
        ),
    ],
)
def test_a_bad_rule_is_one_line_naming_it_and_the_form(rule, why):
    with pytest.raises(RuleError) as err:
        parse_rule(rule)
    assert str(err.value) == f'rule "{rule}": {why}; {RULE_FORM}'
    assert err.value.exit_code == 2


def test_a_rule_on_an_unknown_objective_or_that_no_trial_meets():
    study = _study()
    with pytest.raises(RuleError) as err:
        apply_rule("min val/fairness_gap_gender", study)
    assert str(err.value) == (
        'rule "min val/fairness_gap_gender": val/fairness_gap_gender is not an objective of study '
        "'front'; valid: model/latency_ms, model/params, val/fairness_gap_ethnicity, val/macro_f1"
    )
    with pytest.raises(AgeclsError) as err:
        apply_rule("min model/params where val/macro_f1 > best + 0.01", study)
    assert str(err.value) == (
        "rule \"min model/params where val/macro_f1 > best + 0.01\": no complete trial of study 'front' "
        "meets it (5 complete trials; val/macro_f1 > best + 0.01 = 0.71)"
    )


def test_the_gap_interval_matches_a_hand_computed_case():
    # group 0: all four right, macro-F1 1; group 1: truth [0, 1], preds [0, 0]: class 0 has F1 2/3 (1 hit,
    # 1 true, 2 predicted), class 1 has 0, macro-F1 1/3. Gap 2/3, worst group 1/3.
    preds = np.array([0, 1, 0, 1, 0, 0])
    target = np.array([0, 1, 0, 1, 0, 1])
    groups = np.array([0, 0, 0, 0, 1, 1])
    got = pareto.group_bootstrap(preds, target, groups, k=2, n=200)
    assert got["gap"][0] == pytest.approx(1 - 1 / 3) and got["worst"][0] == pytest.approx(1 / 3)
    assert 0 <= got["gap"][1] <= got["gap"][2] <= 1


def _run_folder(path: Path, seed: int, n: int = 60) -> Path:
    """A run folder with what pareto.csv reads: predictions_val.csv (UTKFace names carry the groups) and
    results.json's class names."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 3, n)
    preds = np.where(rng.random(n) < 0.7, target, rng.integers(0, 3, n))
    eth = rng.integers(0, 5, n)
    paths = [f"{20 + i}_{i % 2}_{e}_2017011{i:04d}.jpg.chip.jpg" for i, e in enumerate(eth)]
    path.mkdir(parents=True)
    pd.DataFrame({"row": range(n), "path": paths, "label": target, "pred": preds}).to_csv(
        path / "predictions_val.csv", index=False
    )
    (path / "results.json").write_text(json.dumps({"class_names": ["0-20", "21-40", "41+"]}))
    return path


def test_pareto_csv_lists_the_front_with_intervals(tmp_path):
    attrs = [
        {"run_dir": str(_run_folder(tmp_path / f"trial-{i:04d}", i)), "mlflow_run_id": f"run{i}"}
        for i in range(len(VALUES))
    ]
    table = pareto.pareto_table(
        _study(attrs=attrs), n_boot=200, rule=parse_rule("max val/macro_f1 where model/params < 3e5")
    )
    assert list(table.columns) == [
        "trial",
        "named",
        F1,
        f"{F1}_lo",
        f"{F1}_hi",
        GAP,
        f"{GAP}_lo",
        f"{GAP}_hi",
        PARAMS,
        "val_faces",
        "lr",
        "mlflow_run_id",
        "run_dir",
    ]
    assert table["trial"].tolist() == [0, 4, 1, 2]  # by F1, best first
    assert table["named"].tolist() == ["best_f1", "", "fairest", "smallest,rule"]
    assert table[F1].tolist() == [0.70, 0.695, 0.69, 0.60] and table["val_faces"].tolist() == [60] * 4
    assert table["mlflow_run_id"].tolist() == ["run0", "run4", "run1", "run2"]
    # the interval is about the trial's own validation predictions: it holds their macro-F1
    from agecls.evaluation.bootstrap import bootstrap_ci

    val = pd.read_csv(tmp_path / "trial-0001" / "predictions_val.csv")
    point, lo, hi = bootstrap_ci(val["pred"], val["label"], 3, n=200)
    row = table[table["trial"] == 1].iloc[0]
    assert (row[f"{F1}_lo"], row[f"{F1}_hi"]) == (lo, hi) and lo <= point <= hi
    assert 0 <= row[f"{GAP}_lo"] <= row[f"{GAP}_hi"] <= 1


def test_the_report_of_a_pareto_study_draws_and_writes_the_front(tmp_path, output_dir, capsys):
    from agecls.cli import report

    storage = f"sqlite:///{tmp_path}/optuna.db"
    attrs = [{"run_dir": str(_run_folder(tmp_path / f"trial-{i:04d}", i))} for i in range(len(VALUES))]
    _study(storage, "pf", attrs)
    out = tmp_path / "rep"
    argv = [
        "pf",
        f"storage={storage}",
        f"tracking_uri=sqlite:///{output_dir}/mlflow.db",
        f"out={out}",
        "n_boot=100",
        "rule=max val/macro_f1 where model/params < 3e5",
    ]
    assert report.main(argv) == 0
    assert (out / "pareto_front.png").stat().st_size > 10_000
    assert not (out / "optimization_history.png").exists()  # several objectives: no single history
    trials = pd.read_csv(out / "trials.csv")
    assert trials["trial"].tolist() == [0, 4, 1, 3, 2] and trials[GAP].tolist() == [0.2, 0.08, 0.05, 0.3, 0.1]
    front = pd.read_csv(out / "pareto.csv")
    assert front["trial"].tolist() == [0, 4, 1, 2]
    assert front["named"].fillna("").tolist() == ["best_f1", "", "fairest", "smallest,rule"]
    assert front[f"{F1}_lo"].notna().all() and front[f"{GAP}_hi"].notna().all()
    printed = capsys.readouterr().out
    assert "Pareto front: 4 trials (pareto.csv, pareto_front.png)" in printed
    assert "  fairest: trial 1: val/macro_f1 0.69 [" in printed
    assert "  smallest: trial 2: val/macro_f1 0.6 [" in printed and "  rule: trial 2: " in printed
    register = printed.split("Register them: ")[1].splitlines()
    assert register[0].endswith("   (agecls-pf@best_f1, @fairest, @smallest)")
    assert register[1].endswith(' rule="max val/macro_f1 where model/params < 3e5"   (agecls-pf@rule)')


def test_the_single_objective_report_is_unchanged(tmp_path):
    from agecls.evaluation.study_report import trials_table, write_plots

    study = optuna.create_study(direction="maximize")
    for i in range(3):
        study.add_trial(
            optuna.trial.create_trial(value=0.1 * i, params={"lr": 1e-3 * (i + 1)}, distributions=LR)
        )
    assert trials_table(study)["value"].tolist() == pytest.approx([0.2, 0.1, 0.0])
    written = {p.name for p in write_plots(study, tmp_path, None)}
    assert "optimization_history.png" in written and "pareto_front.png" not in written


@pytest.mark.slow
def test_registered_aliases_resolve_to_the_named_trials_runs(
    tiny_multitask_ckpt, output_dir, tmp_path, capsys
):
    """agecls-register study=NAME registers the front's named points, one version per trial; a rule adds
    its alias (to an existing version when it picks a registered trial); models:/NAME@fairest resolves to
    the fairest trial's run, as agecls-serve and agecls-predict resolve it."""
    from mlflow import MlflowClient

    from agecls.cli import register
    from agecls.serving.sources import resolve_model

    ckpt = Path(tiny_multitask_ckpt)
    uri = f"sqlite:///{output_dir}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    source = client.get_run(json.loads((ckpt.parent.parent / "results.json").read_text())["mlflow_run_id"])
    runs = [source.info.run_id]
    for _ in range(2):  # two more trials' runs holding a checkpoint
        run = client.create_run(source.info.experiment_id).info.run_id
        client.log_artifact(run, str(ckpt), "checkpoints")
        runs.append(run)
    # trials 0 (best_f1), 1 (fairest), 2 (smallest) on three runs; trial 4 shares trial 0's run
    attrs = [{"mlflow_run_id": r} for r in (runs[0], runs[1], runs[2], "", runs[0])]
    storage = f"sqlite:///{tmp_path}/optuna.db"
    _study(storage, "pareto-reg", attrs)
    common = ["study=pareto-reg", f"storage={storage}", f"tracking_uri={uri}", "detect=false"]
    assert register.main(common) == 0
    printed = capsys.readouterr().out
    assert (
        "as agecls-pareto-reg@fairest: trial 1 (val/macro_f1 0.69, val/fairness_gap_ethnicity 0.05, "
        in printed
    )
    name = "agecls-pareto-reg"
    got = {a: client.get_model_version_by_alias(name, a) for a in ("best_f1", "fairest", "smallest")}
    assert {a: v.run_id for a, v in got.items()} == {
        "best_f1": runs[0],
        "fairest": runs[1],
        "smallest": runs[2],
    }
    assert sorted(int(v.version) for v in got.values()) == [1, 2, 3]
    rule = "min val/fairness_gap_ethnicity where val/macro_f1 >= best - 0.005"  # trial 4: trial 0's run
    assert register.main([*common, f"rule={rule}", "alias=within_half_point"]) == 0
    assert client.get_model_version_by_alias(name, "within_half_point").version == got["best_f1"].version
    assert len(client.search_model_versions(f"name = '{name}'")) == 3

    path, where = resolve_model(f"models:/{name}@fairest", uri, tmp_path / "dl")
    assert where.run_id == runs[1] and path.read_bytes() == ckpt.read_bytes()


def test_register_refuses_mixed_or_bad_study_arguments(output_dir, capsys):
    from agecls.cli import register

    assert register.main(["run=abc", "rule=max val/macro_f1"]) == 2
    assert "rule= goes with study=NAME" in capsys.readouterr().err
    assert register.main(["study=s", "alias=x"]) == 2
    assert (
        "alias=x: with study= the aliases are best_f1, fairest, smallest (or best)" in capsys.readouterr().err
    )
    assert register.main(["study=s", "rule=maxx val/macro_f1"]) == 2
    assert "rule \"maxx val/macro_f1\": starts with 'maxx', not min or max;" in capsys.readouterr().err


def test_the_study_run_records_the_front(output_dir, tmp_path):
    """A multi-objective study's parent run carries the front (pareto.json for MLflow's table view,
    pareto.csv), its size, trials and named points as tags, and each objective's best value."""
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    from agecls.sweep.study_tracking import StudyRun

    uri = f"sqlite:///{output_dir}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(f"pareto-run-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id
    cfg = OmegaConf.create(
        {
            "tracking": {"tracking_uri": uri},
            "optuna": {"register_best": False, "register_rule": "max val/macro_f1 where model/params < 3e5"},
        }
    )
    tracker = StudyRun(client=client, run_id=run_id, cfg=cfg, experiment_id=experiment, study_name="front")
    tracker.close(_study(), "FINISHED", 1.0)
    run = client.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if k.startswith(("pareto.", "named."))}
    assert tags == {
        "pareto.size": "4",
        "pareto.trials": "0,1,2,4",
        "named.best_f1": "0",
        "named.fairest": "1",
        "named.smallest": "2",
        "named.rule": "2",
    }
    metrics = run.data.metrics
    assert (metrics["study/best/val/macro_f1"], metrics["study/best/model/params"]) == (0.70, 1e5)
    assert metrics["study/best/val/fairness_gap_ethnicity"] == 0.05 and "study/best_value" not in metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {"pareto.json", "pareto.csv"}
    local = client.download_artifacts(run_id, "pareto.csv", str(tmp_path))
    assert pd.read_csv(local)["named"].fillna("").tolist() == ["best_f1", "", "fairest", "smallest,rule"]
