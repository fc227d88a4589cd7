"""A study survives its cluster: two workers share a PostgreSQL study and an MLflow server; machine B (its own
hostname and process space, the network shared) is lost mid-trial, PostgreSQL restarts, and the MLflow
server is away for 15 s while trials log. Worker A finishes the study: exactly n_trials complete, the lost
trial failed by heartbeat and re-queued once, no run left RUNNING, every epoch's metrics logged, and no
artifact on a worker's own disk. Also (heavy) a sweeper whose database stays away past its patience:
one line, and the same command finishes the study. `pytest -m cluster`; skipped, saying why, without the
engines."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from tests.engines import Gate, MlflowServer, Postgres, wait_for

pytestmark = pytest.mark.cluster

N_TRIALS = 4
EPOCHS = 3
STUDY = "faults"
MLFLOW_AWAY_S = 15
# longer than optuna.heartbeat_interval=2, so worker A's heartbeat meets the outage (a 1 s restart may fall
# between two calls and leave nothing to wait out)
DB_DOWN_S = 6
TINY = [
    "experiment=demo",
    "sweep=demo",
    "data.synthetic.n=160",
    "data.image_size=16",
    "data.batch_size=32",
    "model.base_channels=8",
    "model.hidden=32",
    f"trainer.max_epochs={EPOCHS}",
]


def _command(storage: str, tracking_uri: str) -> list[str]:
    args = [
        f"optuna.study_name={STUDY}",
        f"optuna.n_trials={N_TRIALS}",
        "optuna.n_jobs=1",
        "optuna/pruner=none",  # every finished trial COMPLETE
        f"optuna.storage={storage}",
        "optuna.heartbeat_interval=2",  # machine B's trial goes stale in seconds
        "optuna.grace_period=10",
        "optuna.register_best=false",
        f"tracking.experiment={STUDY}",
        f"tracking.tracking_uri={tracking_uri}",  # and no tracking.artifact_root: the default must do
    ]
    return [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *args]


def _start(machine: Path, cmd: list[str]) -> subprocess.Popen:
    """A worker with its own working folder and outputs, its output in machine/sweeper.log."""
    machine.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(machine / "outputs"), "OMP_NUM_THREADS": "1"}
    with open(machine / "sweeper.log", "ab") as log:
        return subprocess.Popen(
            cmd, cwd=machine, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _namespace_init(unshare: subprocess.Popen) -> int:
    """The host pid of the first process of `unshare --pid --fork`'s namespace (its pid 1)."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _running_on(study: optuna.Study, host: str, epochs: int = 1) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial whose process runs on `host` and has reported `epochs` epochs."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = trial.user_attrs.get("process") or {}
        if record.get("host") == host and len(trial.intermediate_values) >= epochs:
            return trial
    return None


def _tail(path: Path, chars: int = 5000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_a_study_survives_a_lost_machine_a_database_restart_and_a_tracking_server_away(
    postgres: Postgres, mlflow_server: MlflowServer, tmp_path: Path
):
    storage = postgres.create_database("faults")
    gate = Gate(int(mlflow_server.uri.rsplit(":", 1)[1]))
    cmd = _command(storage, gate.uri)
    a = _start(tmp_path / "machine-a", cmd)
    b = _start(tmp_path / "machine-b", ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "bash", "-c",
                                         'hostname machine-b; exec "$@"', "bash", *cmd])  # fmt: skip
    try:
        wait_for(lambda: optuna.load_study(study_name=STUDY, storage=storage), "the study in PostgreSQL", 240)
        study = optuna.load_study(study_name=STUDY, storage=storage)

        # machine B is lost mid-trial: its namespace's first process (the sweeper) killed, and with it all
        wait_for(lambda: _running_on(study, "machine-b") is not None, "a trial training on machine B", 300)
        lost = _running_on(study, "machine-b")
        assert lost is not None
        os.kill(_namespace_init(b), signal.SIGKILL)
        b.wait(30)

        # PostgreSQL restarts while worker A trains
        here = socket.gethostname()
        wait_for(lambda: _running_on(study, here) is not None, "a trial training on machine A", 300)
        postgres.restart(down_s=DB_DOWN_S)

        # the MLflow server is away for 15 s while A's trial logs its epochs
        wait_for(lambda: _running_on(study, here) is not None, "a trial training on A after it", 300)
        gate.close()
        time.sleep(MLFLOW_AWAY_S)
        gate.open()

        assert a.wait(600) == 0, _tail(tmp_path / "machine-a" / "sweeper.log")
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        gate.close()

    log_a = (tmp_path / "machine-a" / "sweeper.log").read_text(errors="replace")
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # the lost trial: failed by its heartbeat, re-queued once with its parameters, and run by A
    failed = study.get_trials(deepcopy=False)[lost.number]
    assert failed.state == TrialState.FAIL
    again = [t for t in trials if t.user_attrs.get("requeued_from") == lost.number]
    assert len(again) == 1 and again[0].params == lost.params and again[0].state == TrialState.COMPLETE
    assert "no heartbeat for optuna.grace_period=10 s" in again[0].user_attrs["requeue_reason"]
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params), params  # no parameter set ran twice to completion

    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's choice
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    by_trial = {r.data.tags.get("optuna.trial"): r for r in runs if r.data.tags.get("agecls.role") != "study"}
    assert by_trial[str(lost.number)].info.status == "FAILED"
    for trial in complete:
        run = by_trial[str(trial.number)]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val/macro_f1")
        epochs = int(run.data.metrics["epochs_trained"])
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (trial.number, history)
    # no artifact on a worker's own disk: every checkpoint went to the server
    for machine in ("machine-a", "machine-b"):
        assert list((tmp_path / machine).rglob("mlartifacts")) == []
    assert list(mlflow_server.artifacts.rglob("*.ckpt"))
    # what the user saw: each wait said once when it began and once when it ended, no traceback
    trial_logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "machine-a").rglob("process.log"))
    assert f"MLflow server {gate.uri} unreachable (" in trial_logs
    assert f"MLflow server {gate.uri} back after " in trial_logs
    assert f"optuna.storage {storage} back after " in log_a + trial_logs
    assert f"trial {lost.number} failed and re-queued: no heartbeat for optuna.grace_period=10 s" in log_a
    assert "Traceback" not in log_a


@pytest.mark.heavy  # ~2 min: two sweeper starts; the patience alone: tests/test_storage_outage.py
def test_a_sweeper_past_its_storage_patience_stops_in_one_line_and_the_same_command_resumes(
    postgres: Postgres, tmp_path: Path
):
    storage = postgres.create_database("patience")
    args = [f"optuna.study_name={STUDY}", "optuna.n_trials=2", "optuna.n_jobs=1", "optuna/pruner=none"]
    args += [f"optuna.storage={storage}", "optuna.storage_patience_s=3", "tracking=none"]
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *args]
    machine = tmp_path / "machine-a"
    sweeper = _start(machine, cmd)
    try:
        wait_for(lambda: optuna.load_study(study_name=STUDY, storage=storage), "the study in PostgreSQL", 240)
        study = optuna.load_study(study_name=STUDY, storage=storage)
        wait_for(lambda: _running_on(study, socket.gethostname()) is not None, "a training trial", 300)
        postgres.stop()
        try:
            assert sweeper.wait(120) == 1
        finally:
            postgres.start()
    finally:
        if sweeper.poll() is None:
            os.killpg(sweeper.pid, signal.SIGKILL)
    said = (machine / "sweeper.log").read_text(errors="replace").strip().splitlines()[-1]
    prefix = f"agecls-train: error: the sweep stopped: optuna.storage {storage} unreachable for "
    assert said.startswith(prefix), said
    assert "(optuna.storage_patience_s=3) while it would" in said
    assert said.endswith("1 running trial(s) stopped, re-queued when it runs again"), said

    again = _start(machine, cmd)  # the database is back: the same command finishes the study
    assert again.wait(400) == 0, _tail(machine / "sweeper.log")
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"], [
        (t.number, t.state.name, t.user_attrs) for t in trials
    ]
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    (rerun,) = [t for t in trials if t.user_attrs.get("requeued_from") == failed.number]
    assert rerun.state == TrialState.COMPLETE and rerun.params == failed.params
    assert "is gone" in failed.user_attrs["failed_because"]  # its process, stopped by the sweeper
