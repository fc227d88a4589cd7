"""End to end: real (small) training runs through `train()` and the `agecls-train` console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from tests.conftest import FAST_OVERRIDES

from agecls.evaluation.report import leaderboard, load_runs
from agecls.tasks.classification import GENDER_NAMES
from agecls.tasks.module import FaceClassifier
from agecls.tracking import ManifestMismatchError, check_manifest
from agecls.training.train import train

pytestmark = pytest.mark.slow


def _run(compose_cfg, experiment: str, *overrides: str) -> dict:
    return train(compose_cfg([*FAST_OVERRIDES, f"tracking.experiment={experiment}", *overrides]))


def _client(output_dir: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")


def test_a_run_trains_evaluates_the_best_checkpoint_and_records_everything(compose_cfg, output_dir):
    results = _run(compose_cfg, "e2e", "task=gender", "trainer.max_epochs=5")
    run_dir = Path(results["run_dir"])
    for name in (
        "config.yaml",
        "results.json",
        "per_class_val.csv",
        "per_class_test.csv",
        "confusion.png",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "results.json").read_text())["test/macro_f1"] == results["test/macro_f1"]
    # Gender on the synthetic faces is learnable: far above the 0.5 of guessing, even in 5 small epochs.
    assert results["test/macro_f1"] > 0.6, results
    assert results["objective"] == pytest.approx(results["best_val/macro_f1"], abs=1e-6)
    assert sum(map(sum, results["confusion_test"])) == results["data_sizes"]["test"]
    # Fairness view: the task's macro-F1 within each value of the other attributes (here ethnicity).
    fairness = results["fairness_test"]
    assert {row["attribute"] for row in fairness} == {"ethnicity"}
    assert sum(row["n"] for row in fairness) == results["data_sizes"]["test"]
    assert (run_dir / "fairness_test.csv").is_file()

    run = _client(output_dir).get_run(results["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.blocks"] == "2" and run.data.params["task.target"] == "gender"
    assert run.data.tags["data.manifest_hash"] and run.data.tags["seed"] == "42"
    for key in (
        "best_val/macro_f1",
        "test/macro_f1",
        "test/acc",
        "best_epoch",
        "test/macro_f1_by_ethnicity/white",
    ):
        assert key in run.data.metrics, key
    history = _client(output_dir).get_metric_history(run.info.run_id, "val/macro_f1")
    assert [m.step for m in history] == list(range(1, results["epochs_trained"] + 1))
    artifacts = {
        a.path
        for folder in ("config", "evaluation", "checkpoints")
        for a in _client(output_dir).list_artifacts(run.info.run_id, folder)
    }
    assert {"config/config.yaml", "evaluation/results.json", "checkpoints/best.ckpt"} <= artifacts

    # The checkpoint alone rebuilds the model.
    model = FaceClassifier.load_from_checkpoint(results["checkpoint"], map_location="cpu")
    assert model.task.class_names == GENDER_NAMES
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_same_seed_gives_identical_metrics(compose_cfg):
    a = _run(compose_cfg, "e2e-seed", "trainer.max_epochs=2")
    b = _run(compose_cfg, "e2e-seed", "trainer.max_epochs=2")
    keys = ("best_val/macro_f1", "test/macro_f1", "test/acc", "best_epoch")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert a["confusion_test"] == b["confusion_test"]


def test_a_crashing_run_is_marked_failed(compose_cfg, output_dir, monkeypatch):
    # The model refuses to build, inside the tracked run (a bad config value is refused before the run opens).
    def refuse(*args, **kwargs):
        raise ValueError("model.blocks: the model refused to build")

    monkeypatch.setattr("agecls.training.train.build_module", refuse)
    with pytest.raises(ValueError, match="blocks"):
        _run(compose_cfg, "e2e-fail")
    runs = load_runs(f"sqlite:///{output_dir}/mlflow.db", "e2e-fail")
    assert list(runs["status"]) == ["FAILED"]


def test_multirun_from_the_console_script_then_report(output_dir, tmp_path):
    env_bin = Path(sys.executable).parent
    train_cmd = [
        str(env_bin / "agecls-train"),
        "-m",
        *FAST_OVERRIDES,
        "trainer.max_epochs=1",
        "tracking.experiment=e2e-grid",
        "optimizer=adam,sgd",
    ]
    done = subprocess.run(train_cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "outputs").exists(), "runs must go to paths.output_dir, not the current directory"
    report = subprocess.run(
        [str(env_bin / "agecls-report"), "e2e-grid", "--out", str(tmp_path / "rep")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| optimizer |" in report.stdout and "| sgd |" in report.stdout
    assert (tmp_path / "rep" / "leaderboard.csv").is_file()
    table = leaderboard(load_runs(f"sqlite:///{output_dir}/mlflow.db", "e2e-grid"))
    assert len(table) == 2 and set(table["status"]) == {"FINISHED"}


def test_an_experiment_refuses_runs_on_another_manifest(compose_cfg, output_dir):
    _run(compose_cfg, "e2e-manifest", "trainer.max_epochs=1")
    other = compose_cfg([*FAST_OVERRIDES, "tracking.experiment=e2e-manifest", "data.synthetic.n=300"])
    with pytest.raises(ManifestMismatchError, match="tracking.allow_new_manifest=true"):
        train(other)
    runs = load_runs(f"sqlite:///{output_dir}/mlflow.db", "e2e-manifest")
    assert len(runs) == 1, "the refused run left no trace in MLflow"
    allowed = compose_cfg(
        [*FAST_OVERRIDES, "tracking.experiment=e2e-manifest", "tracking.allow_new_manifest=true"]
    )
    check_manifest(allowed.tracking, "some-other-hash")  # no error
