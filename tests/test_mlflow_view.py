"""What a user sees in the MLflow UI: experiments that open on their runs, runs named by what they tried,
MLflow's standard source tags, and the key metrics as columns of every run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf
from tests.conftest import compose_train

from agecls.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    ensure_experiment,
    git_commit,
    overrides_run_name,
    recording,
    short_value,
    trial_run_name,
)

CHROMIUM = os.environ.get("AGECLS_CHROMIUM", "/usr/bin/chromium")


def _tracking(tmp_path: Path, experiment: str = "view") -> OmegaConf:
    return OmegaConf.create(
        {
            "enabled": True,
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "experiment": experiment,
            "artifact_root": str(tmp_path / "artifacts"),
        }
    )


def test_experiments_open_on_their_runs_new_and_pre_existing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    made = ensure_experiment(uri, "fresh", tmp_path / "artifacts")
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    old = client.create_experiment("older")  # as an earlier agecls (or a user) made it: no kind
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment(uri, "older", tmp_path / "artifacts") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")  # a user's own choice stays
    ensure_experiment(uri, "older", tmp_path / "artifacts")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_run_names_for_a_trial_and_for_a_single_run():
    params = {"optimizer": "adam", "optimizer.lr": 0.00032, "model.dropout": 0.25, "model.blocks": 3}
    assert trial_run_name(3, params) == "trial-0003 blocks=3 dropout=0.25 lr=3.2e-4 optimizer=adam"
    assert trial_run_name(12, {}) == "trial-0012"
    assert trial_run_name(7, {"optimizer.lr": 0.001}, "night") == "night trial-0007 lr=1e-3"
    clash = {"model.dropout": 0.5, "head.dropout": 0.1}
    assert trial_run_name(1, clash) == "trial-0001 head.dropout=0.1 model.dropout=0.5"
    long = trial_run_name(2, {f"p{i}": "x" * 20 for i in range(6)})
    assert len(long) == 80 and long.endswith("…")

    overrides = ["task=gender", "trainer.max_epochs=2", "+data.synthetic.n=300"]
    assert overrides_run_name(overrides, "age defaults") == "task=gender max_epochs=2 n=300"
    assert overrides_run_name([], "age defaults") == "age defaults"
    assert [short_value(v) for v in (3e-3, 0.5, 12345.0, 0.0, 64, "a" * 30)] == [
        "3e-3",
        "0.5",
        "1.2e4",
        "0",
        "64",
        "a" * 23 + "…",
    ]


def test_every_run_has_a_name_and_mlflow_source_tags(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/agecls-train", "task=gender", "run_name=a b"])
    tracking = _tracking(tmp_path)
    with recording(tracking, None, {"seed": 7}, run_dir=tmp_path / "run") as rec:
        pass
    with recording(tracking, "mine", {"seed": 7}) as named:
        pass
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri)
    run = client.get_run(rec.run_id)
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == git_commit() != "unknown"
    assert tags["mlflow.source.name"] == "agecls-train"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.note.content"] == (
        f"```\nagecls-train task=gender 'run_name=a b'\n```\n\nRun folder: `{tmp_path / 'run'}`\n"
    )
    assert "git_commit" not in tags
    # MLflow's own name generator draws from `random`, which the run's seed has fixed: never left to it.
    assert run.info.run_name.startswith("agecls-train 20")
    assert client.get_run(named.run_id).info.run_name == "mine"


def test_a_multitask_run_records_the_key_metrics_and_tags(tiny_multitask_ckpt):
    run_dir = tiny_multitask_ckpt.parent.parent
    results = json.loads((run_dir / "results.json").read_text())
    cfg = compose_train(["tracking.experiment=predict-src"])
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(results["mlflow_run_id"])
    assert run.info.run_name == "multitask defaults"  # no Hydra overrides: the task, with its defaults
    metrics = run.data.metrics
    for key in ("best_val/macro_f1", "test/macro_f1", "val/macro_f1", "objective"):
        assert key in metrics, sorted(metrics)
    assert metrics["best_val/macro_f1"] == pytest.approx(results["best_val/macro_f1"])
    assert metrics["best_val/age/macro_f1"] == metrics["best_val/macro_f1"]  # age: the objective
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert run.data.tags["mlflow.source.git.commit"] == git_commit()
    assert "git_commit" not in run.data.tags


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_ui_shows_a_study_s_trials_by_name(tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')"
    )
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) or set AGECLS_CHROMIUM"
        )
    # A tiny study's MLflow runs as a study records them (a real sweep takes minutes on a busy machine): the
    # study's parent run, and three trial runs through `recording` with a trial's tags and name.
    tracking = _tracking(tmp_path, "study-view")
    uri = str(tracking.tracking_uri)
    experiment_id = ensure_experiment(uri, tracking.experiment, tracking.artifact_root)
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.create_run(experiment_id, run_name="study view", tags={"agecls.role": "study"})
    sampled = [{"optimizer": "adam", "optimizer.lr": 3.2e-4}, {"optimizer": "sgd", "optimizer.lr": 0.012}]
    sampled.append({"optimizer": "adamw", "optimizer.lr": 1e-3})
    names = []
    for number, params in enumerate(sampled):
        names.append(trial_run_name(number, params))
        tags = {"optuna.study": "view", "optuna.trial": str(number), "mlflow.parentRunId": parent.info.run_id}
        with recording(tracking, names[-1], tags) as rec:
            rec.params(params)
            for epoch in (1, 2):
                rec.metrics({"val/macro_f1": 0.2 * epoch + 0.1 * number}, step=epoch)
            rec.metrics({"best_val/macro_f1": 0.4 + 0.1 * number, "test/macro_f1": 0.35 + 0.1 * number})
    client.set_terminated(parent.info.run_id)
    assert names == [
        "trial-0000 lr=3.2e-4 optimizer=adam",
        "trial-0001 lr=0.012 optimizer=sgd",
        "trial-0002 lr=1e-3 optimizer=adamw",
    ]

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                time.sleep(0.25)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 900})
                # MLflow 3.17 picks the page from its GenAI / Model training switch (default GenAI), which
                # this parameter sets, as the README's link does.
                page.goto(f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning")
                page.get_by_text("study view").first.wait_for(timeout=60_000)
                landed, table = page.url, page.inner_text("body")
                # the trials are nested under the study's run: expand it
                page.locator('[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
                page.get_by_text(names[0]).first.wait_for(timeout=30_000)
                rows = page.locator(".ag-pinned-left-cols-container .ag-row")
                shown = [text.strip() for text in rows.all_inner_texts()]
                page.screenshot(path=str(tmp_path / "mlflow_runs.png"))
                for name in names:
                    rows.filter(has_text=name).first.locator("input.ag-checkbox-input").check(force=True)
                page.get_by_role("button", name="Compare").click()
                page.get_by_text("Parallel Coordinates Plot").first.wait_for(timeout=30_000)
                page.locator("svg.main-svg").first.wait_for(timeout=30_000)  # the plot, drawn
                compared = page.inner_text("body")
                shots = os.environ.get("AGECLS_SCREENSHOTS")
                if shots:
                    shutil.copy(tmp_path / "mlflow_runs.png", Path(shots) / "mlflow_runs.png")
                    page.screenshot(path=str(Path(shots) / "mlflow_compare.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert f"/experiments/{experiment_id}/runs" in landed
    assert "Token Usage" not in table and "No data available" not in table
    # each row reads: its colour, its name, when it started (the newest first)
    assert [row.split("\n")[-2] for row in shown] == ["study view", *reversed(names)], shown
    assert "Comparing 3 Runs" in compared and all(name in compared for name in names)
