"""Trials as submitit jobs: `hydra/launcher=slurm` (composition and the sbatch script it submits; a study on a
real Slurm cluster is tests/test_cluster.py, `-m cluster`) and `hydra/launcher=submitit_local` (a real study
and a grid through submitit's local executor, and the faults a real cluster cannot produce on demand: a job
controller started with SIGINT ignored).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from tests.conftest import FAST_OVERRIDES
from tests.test_sweeper import _start_training_sweep

from agecls.config import CONFIG_DIR
from agecls.sweep.executors import SubmititExecutor, SubprocessExecutor, submitit_parameters, trial_executor
from agecls.sweep.recovery import fail_and_requeue
from agecls.sweep.stopping import stop_trials
from agecls.training.trial import TrialContext, TrialNotRunning

ONE_EPOCH = [*FAST_OVERRIDES, "trainer.max_epochs=1", "data.synthetic.n=300"]
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.gpus_per_task=1",
    "hydra.launcher.timeout_min=120",
]


def _compose_with_hydra(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.fixture
def fake_srun(tmp_path, monkeypatch) -> None:
    """submitit's Slurm executor refuses to start without `srun` on PATH; a stub is enough to build the
    sbatch script (nothing is submitted)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("sweep", ["optuna_bins", "grid_optimizers"])
def test_slurm_launcher_composes_with_its_settings(output_dir, sweep):
    cfg = _compose_with_hydra([f"sweep={sweep}", *SLURM, "hydra.launcher.mem_gb=16"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_task, launcher.timeout_min) == ("gpu", 1, 120)
    assert launcher.mem_gb == 16 and launcher.cpus_per_task == 8
    assert str(launcher.submitit_folder).startswith(str(cfg.hydra.sweep.dir))
    if sweep.startswith("optuna"):
        assert cfg.hydra.sweeper._target_.endswith("AgeclsOptunaSweeper")


def test_slurm_trial_jobs_request_the_configured_resources(output_dir, fake_srun):
    cfg = _compose_with_hydra(["sweep=optuna_bins", *SLURM, "optuna.n_jobs=3", "hydra.launcher.qos=high"])
    cluster, _, init, params = submitit_parameters(OmegaConf.to_container(cfg.hydra.launcher, resolve=True))
    assert cluster == "slurm" and init == {"slurm_max_num_timeout": 0}
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 120

    executor = trial_executor(cfg)
    assert isinstance(executor, SubmititExecutor) and executor.kind == "slurm"
    assert executor.slots() == [{"OMP_NUM_THREADS": "8"}] * 3, "n_jobs jobs at once, threads = cpus_per_task"
    executor.executor.update_parameters(name="optuna_bins-trial-0007")
    script = executor.executor._executor._make_submission_file_text("python -m submitit.core._submit", "u")
    for line in (
        "--partition=gpu",
        "--gpus-per-task=1",
        "--time=120",
        "--cpus-per-task=8",
        "--mem=32GB",
        "--qos=high",
        "--job-name=optuna_bins-trial-0007",
    ):
        assert f"#SBATCH {line}" in script, script


def test_default_launcher_runs_trials_as_child_processes(output_dir):
    cfg = _compose_with_hydra(["sweep=optuna_bins", "optuna.devices=null", "optuna.n_jobs=2"])
    executor = trial_executor(cfg)
    assert isinstance(executor, SubprocessExecutor)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in executor.slots()] == ["", ""]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has ended


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_cancelled_local_job_stops_its_trial_process(tmp_path, sigint):
    """Ctrl-C on the sweeper cancels each job; the trial process inside it must not live on orphaned, even
    when the jobs were started with SIGINT ignored (a sweep run as a background job of a script)."""
    cfg = _compose_with_hydra(["sweep=optuna_bins", "hydra/launcher=submitit_local"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher["submitit_folder"] = str(tmp_path / "jobs" / "%j")
    executor = SubmititExecutor(launcher, cfg.optuna)
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    disposition = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL
    previous = signal.signal(signal.SIGINT, disposition)  # inherited by the job's processes
    try:
        handle = executor.start([sys.executable, "-c", code], {}, tmp_path / "process.log", "t-trial-0000")
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = int(pid_file.read_text())
    assert not handle.done() and _alive(pid)
    stop_trials([handle], graces=(5, 30, 30))
    assert handle.done()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), "the trial process outlived its cancelled job"


def test_trial_that_died_without_telling_is_failed_and_requeued_once(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="d")
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    first = study.ask(space)
    fail_and_requeue(study, study.trials[first.number], retries=1)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    second = study.ask(space)
    assert second.params == first.params, "re-queued with the same parameters"
    fail_and_requeue(study, study.trials[second.number], retries=1)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL], "retries=1: not again"


def test_trial_process_refuses_a_finished_trial_and_records_seed_and_heartbeat(compose_cfg, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    base = [f"optuna.storage={storage}", "optuna.study_name=h", "seed=7"]
    base += ["optuna.heartbeat_interval=2", "optuna.grace_period=4"]
    study = optuna.create_study(storage=storage, study_name="h", direction="maximize")
    stale, live, quiet = study.ask(), study.ask(), study.ask()
    study.tell(stale.number, state=TrialState.FAIL)
    with pytest.raises(TrialNotRunning, match="FAIL, not RUNNING"):
        TrialContext.from_cfg(compose_cfg([*base, f"optuna.trial={stale.number}"]))
    with pytest.raises(TrialNotRunning, match="has no trial 9"):
        TrialContext.from_cfg(compose_cfg([*base, "optuna.trial=9"]))

    ctx = TrialContext.from_cfg(compose_cfg([*base, f"optuna.trial={live.number}"]))
    other = TrialContext.from_cfg(compose_cfg([*base, f"optuna.trial={quiet.number}"]))
    assert ctx is not None and other is not None
    other.stop_heartbeat()  # its one heartbeat, recorded at the start, goes stale
    time.sleep(5.5)  # past the grace period: the live trial's own thread beats every second
    optuna.storages.fail_stale_trials(ctx.study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[live.number] == TrialState.RUNNING, "the trial process kept its heartbeat fresh"
    assert states[quiet.number] == TrialState.FAIL, "its heartbeat was recorded, then went stale"
    ctx.complete(0.5, {})
    trial = study.get_trials()[live.number]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["seed"] == 7


def _multirun(
    out: Path, *args: str, launcher: str = "submitit_local", env: dict | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "AGECLS_OUTPUT_DIR": str(out)}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *ONE_EPOCH, f"hydra/launcher={launcher}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)


@pytest.mark.heavy  # the same executor runs real Slurm jobs in tests/test_cluster.py, by default
def test_study_through_submitit_local_jobs(tmp_path):
    out = tmp_path / "out"
    args = ["sweep=optuna_optimizers", "optuna.study_name=j", "optuna.n_trials=2", "optuna.n_jobs=2"]
    done = _multirun(out, *args, "optuna/pruner=none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "submitted as local job" in done.stdout + done.stderr
    study = optuna.load_study(study_name="j", storage=f"sqlite:///{out}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["seed"] == 42 for t in study.trials)
    jobs = list(out.glob("multiruns/*/*/.submitit/*/*_0_log.out"))
    assert len(jobs) == 2, "one submitit job per trial"
    assert all((Path(t.user_attrs["run_dir"]) / "process.log").exists() for t in study.trials)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("optuna_optimizers").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("agecls.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {c.data.tags["optuna.trial"] for c in children} == {"0", "1"}
    assert {c.data.params["seed"] for c in children} == {"42"}


@pytest.mark.heavy  # ~1 min of two parallel runs; hydra-submitit-launcher's own path (make test-heavy)
def test_grid_through_submitit_local_launcher(tmp_path):
    """Both runs start at once: they share one new sqlite MLflow store (opened under a lock)."""
    out = tmp_path / "out"
    done = _multirun(out, "optimizer=adam,nadam", "tracking.experiment=grid")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert sorted(r.data.params["optimizer._target_"] for r in runs) == [
        "torch.optim.Adam",
        "torch.optim.NAdam",
    ]
    assert {r.info.status for r in runs} == {"FINISHED"}


class _StopFit(L.Callback):
    """Stops a fit at its first batch the way an interruption reaches it."""

    def __init__(self, raise_: type[BaseException]) -> None:
        self.raise_ = raise_

    def on_train_batch_start(self, *args) -> None:
        raise self.raise_()


@pytest.mark.parametrize(
    ("stop", "status"),
    [(KeyboardInterrupt, "KILLED"), (SIGTERMException, "KILLED"), (RuntimeError, "FAILED")],
    ids=["ctrl-c", "sigterm", "crash"],
)
def test_an_interrupted_fit_ends_its_run_killed_and_a_crash_failed(tmp_path, stop, status):
    """A cancelled trial job (submitit's local cancel is SIGINT, scancel and the job wrapper pass SIGTERM)
    stops the trial's fit; Lightning turns Ctrl-C into sys.exit(1) and SIGTERM into SIGTERMException, both
    SystemExit, which the run used to record as FAILED like a crash, on every launcher."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from agecls.tracking import recording

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = OmegaConf.create(
        {"enabled": True, "tracking_uri": uri, "experiment": "t", "artifact_root": str(tmp_path / "art")}
    )
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[_StopFit(stop)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    previous = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after the first one
    try:
        with pytest.raises(BaseException) as raised, recording(tracking) as rec:
            trainer.fit(BoringModel())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert isinstance(raised.value, SystemExit if stop is KeyboardInterrupt else stop)
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(rec.run_id).info.status == status


def test_runs_of_trials_killed_outright_are_ended_failed_and_running_trials_left_alone(tmp_path):
    """A trial process killed outright (SIGKILL, out of memory) cannot end its MLflow run; once the study has
    failed that trial, the sweeper ends the run FAILED. Runs of trials still running (this worker's or
    another's) and of finished trials are untouched."""
    from agecls.sweep.study_tracking import StudyRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = OmegaConf.create(
        {
            "tracking": {"tracking_uri": uri, "experiment": "e", "artifact_root": str(tmp_path / "art")},
            "optuna": {"storage": "sqlite:///x.db", "register_best": False},
        }
    )
    study = optuna.create_study(study_name="s")
    for state in ("FAIL", "RUNNING", "COMPLETE"):
        trial = study.ask()
        if state != "RUNNING":
            study.tell(trial, 0.5 if state == "COMPLETE" else None, state=getattr(TrialState, state))
    tracker = StudyRun.open(cfg, "s")
    client = tracker.client
    runs = {}
    for number, status in ((0, "RUNNING"), (1, "RUNNING"), (2, "FINISHED")):
        tags = {"optuna.study": "s", "optuna.trial": str(number), "mlflow.parentRunId": tracker.run_id}
        runs[number] = client.create_run(tracker.experiment_id, tags=tags).info.run_id
        if status != "RUNNING":
            client.set_terminated(runs[number], status=status)
    other = client.create_run(tracker.experiment_id, tags={"optuna.study": "t", "optuna.trial": "0"})

    assert tracker.end_orphan_runs(study) == [runs[0]]
    status = {n: client.get_run(r).info.status for n, r in runs.items()}
    assert status == {0: "FAILED", 1: "RUNNING", 2: "FINISHED"}
    assert client.get_run(runs[0]).data.tags["agecls.ended_by"].startswith("sweeper:")
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # another study's trial 0
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # the study's own run
    assert tracker.end_orphan_runs(study) == []  # idempotent


def test_workers_that_start_together_keep_one_study_run(tmp_path, monkeypatch):
    """Two workers started at the same moment each find no study run and create one; both then keep the
    oldest and the other is deleted, so a worker lost later leaves no duplicate RUNNING."""
    from agecls.sweep.study_tracking import StudyRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = OmegaConf.create(
        {
            "tracking": {"tracking_uri": uri, "experiment": "e", "artifact_root": None},
            "optuna": {"storage": "sqlite:///x.db", "register_best": False},
        }
    )
    first = StudyRun.open(cfg, "s")
    # the second worker's search ran before the first worker's run existed
    found = []
    original = mlflow.MlflowClient.search_runs

    def search_before(self, *args, **kwargs):
        found.append(1)
        return [] if len(found) == 1 else original(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", search_before)
    second = StudyRun.open(cfg, "s")
    assert second.run_id == first.run_id
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([first.experiment_id], filter_string="tags.`agecls.role` = 'study'")
    assert [r.info.run_id for r in runs] == [first.run_id]


def _session_processes(session: int) -> dict[int, str]:
    """pid -> command line of the processes of one session (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == session:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


# heavy: about a minute of subprocess sweep each; the fit-level test above runs by default.
@pytest.mark.heavy
@pytest.mark.parametrize(
    ("launcher", "sig", "status"),
    [
        ("basic", signal.SIGINT, "KILLED"),
        ("submitit_local", signal.SIGINT, "KILLED"),
        ("basic", signal.SIGKILL, "FAILED"),
    ],
    ids=["basic", "submitit_local", "basic-sigkill"],
)
def test_a_trial_stopped_from_outside_is_failed_requeued_and_its_run_ended(tmp_path, launcher, sig, status):
    """A trial stopped from outside the sweeper (a local trial process sent Ctrl-C; a submitit job cancelled
    as submitit's LocalJob.cancel does, SIGINT to the job's controller): the study fails and re-queues it,
    and its MLflow run ends KILLED, the same on both launchers. A trial process killed outright (SIGKILL, as
    the out-of-memory killer does) cannot end its run: the sweeper ends it FAILED."""
    out = tmp_path / "out"
    args = ["sweep=optuna_optimizers", "optuna.study_name=x", "optuna.n_trials=1", "optuna/pruner=none"]
    args += ["optuna.max_failures=0", f"hydra/launcher={launcher}"]  # stop after the cancelled trial
    proc = _start_training_sweep(tmp_path, out, args)
    running = _session_processes(proc.pid)
    if launcher == "basic":
        target = [pid for pid, cmd in running.items() if "optuna.trial=0" in cmd]
    else:
        target = [pid for pid, cmd in running.items() if "submitit.local._local" in cmd]
    assert len(target) == 1, running
    os.kill(target[0], sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "optuna.max_failures=0" in err.decode(), err.decode()[-3000:]
    study = optuna.load_study(study_name="x", storage=f"sqlite:///{out}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].system_attrs["failed_trial"] == 0, "re-queued with the cancelled trial's params"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("optuna_optimizers").experiment_id])
    (trial_run,) = [r for r in runs if r.data.tags.get("optuna.trial") == "0"]
    assert trial_run.info.status == status
    assert ("agecls.ended_by" in trial_run.data.tags) == (sig == signal.SIGKILL)
