"""One Optuna study on the real engines (tests/engines.py): trials as Slurm jobs, the study in PostgreSQL,
runs and checkpoints on an MLflow tracking server, two sweeper workers as two machines would run them, one
trial job cancelled with scancel and one worker killed with SIGKILL on the way. Also: Slurm's GPU indices per
job, and optuna-dashboard reading a PostgreSQL study. `pytest -m cluster`; skipped, saying why, where the
engines cannot start (`make engines` installs them)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from tests.conftest import FAST_OVERRIDES
from tests.engines import MlflowServer, Postgres, SlurmCluster, free_port, wait_for

pytestmark = pytest.mark.cluster

N_TRIALS = 4
STUDY = "cluster"
# 16 px generated faces, 1 epoch: a trial is mostly its process start-up. The learning rate stays in the
# search space (a continuous draw): two trials with equal parameters are then a sampler's fault, not chance.
FAST = [o for o in FAST_OVERRIDES if not o.startswith("optimizer.lr=")]
TINY = [*FAST, "data.synthetic.n=160", "data.image_size=16", "trainer.max_epochs=1"]


def _worker_command(storage: str, tracking_uri: str, partition: str) -> list[str]:
    args = [
        "sweep=optuna_optimizers",
        f"optuna.study_name={STUDY}",
        f"optuna.n_trials={N_TRIALS}",
        "optuna.n_jobs=2",
        "optuna/pruner=none",  # every finished trial COMPLETE
        f"optuna.storage={storage}",
        # a dead worker's trials go stale in seconds, not the default two minutes
        "optuna.heartbeat_interval=4",
        "optuna.grace_period=12",
        "optuna.max_failures=6",
        f"tracking.experiment={STUDY}",
        f"tracking.tracking_uri={tracking_uri}",
        "tracking.artifact_root=null",  # the server stores artifacts (--artifacts-destination)
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={partition}",
        "hydra.launcher.gpus_per_task=1",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=15",
    ]
    return [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *args]


def _start_worker(machine: Path, cmd: list[str], cluster: SlurmCluster) -> subprocess.Popen:
    """A sweeper as another machine runs it: its own working folder and outputs."""
    machine.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cluster.env, "AGECLS_OUTPUT_DIR": str(machine / "outputs"), "OMP_NUM_THREADS": "1"}
    log = open(machine / "sweeper.log", "ab")  # noqa: SIM115 - closed with the process (below)
    proc = subprocess.Popen(
        cmd, cwd=machine, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _squeue(cluster: SlurmCluster) -> list[tuple[str, str, str]]:
    """(job id, job name, state) of the cluster's queued and running jobs."""
    lines = cluster.run("squeue", "-h", "-o", "%i|%j|%T").splitlines()
    return [tuple(line.split("|")) for line in lines if line]  # type: ignore[misc]


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def test_study_on_slurm_postgres_and_mlflow_server_through_faults(
    slurm_cluster: SlurmCluster, postgres: Postgres, mlflow_server: MlflowServer, tmp_path: Path
):
    started = time.monotonic()
    events: list[str] = []

    def note(text: str) -> None:
        events.append(f"{time.monotonic() - started:6.1f} s  {text}")

    storage = postgres.create_database("optuna")
    cmd = _worker_command(storage, mlflow_server.uri, slurm_cluster.partition)
    a = _start_worker(tmp_path / "machine-a", cmd, slurm_cluster)
    b = None
    try:
        # worker A creates the study; B joins once it exists (docs/SWEEPS.md: open a PostgreSQL study once)
        wait_for(lambda: optuna.load_study(study_name=STUDY, storage=storage), "the study in PostgreSQL", 240)
        study = optuna.load_study(study_name=STUDY, storage=storage)
        note("worker A created the study")
        b = _start_worker(tmp_path / "machine-b", cmd, slurm_cluster)

        # fault 1: one trial's job is cancelled by hand once it is training
        def training_job() -> tuple[str, str, str] | None:
            for job in _squeue(slurm_cluster):
                number = int(job[1].rsplit("-", 1)[-1])
                trial = study.get_trials(deepcopy=False)[number]
                logs = list(
                    (tmp_path / "machine-a").glob(f"outputs/multiruns/*/*/trial-{number:04d}/train.log")
                )
                if job[2] == "RUNNING" and trial.state == TrialState.RUNNING and logs:
                    return job
            return None

        wait_for(lambda: training_job() is not None, "a training trial job of worker A", 240)
        victim = training_job()
        assert victim is not None
        slurm_cluster.run("scancel", victim[0])
        cancelled = int(victim[1].rsplit("-", 1)[-1])
        note(f"scancel job {victim[0]} ({victim[1]})")

        # fault 2: worker A's machine dies once the study is under way
        wait_for(lambda: _states(study).get("COMPLETE", 0) >= 2, "two complete trials", 400)
        note(f"SIGKILL worker A at {_states(study)}; queue {_squeue(slurm_cluster)}")
        a.kill()
        a.wait(30)

        assert b.wait(600) == 0, _tail(tmp_path / "machine-b" / "sweeper.log")
        note(f"worker B exited 0 at {_states(study)}")
        # machine A comes back and re-runs its command: the study is complete, or it finishes it
        a = _start_worker(tmp_path / "machine-a", cmd, slurm_cluster)
        assert a.wait(600) == 0, _tail(tmp_path / "machine-a" / "sweeper.log")
        note(f"worker A re-run exited 0 at {_states(study)}")
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            if proc is not None:
                proc.log_file.close()
        print("\n".join(events))

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary = "\n".join(f"{t.number} {t.state.name} {t.params}" for t in trials)
    print(summary)
    assert trials[cancelled].state == TrialState.FAIL, "the scancelled trial is failed"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == cancelled]
    assert [t.params for t in retried] == [trials[cancelled].params], "and re-queued once with its params"
    scripts = list((tmp_path / "machine-a").glob("outputs/multiruns/*/*/.submitit/*/*_submission.sh"))
    script = scripts[0].read_text()
    for line in ("--partition=agecls", "--gpus-per-task=1", "--cpus-per-task=1", "--job-name=cluster-trial-"):
        assert f"#SBATCH {line}" in script, script
    assert len(complete) == N_TRIALS, summary
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == N_TRIALS, f"duplicate parameter sets among COMPLETE trials:\n{summary}"

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == [], "no run left RUNNING"
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts proxied by the server"
    for trial in complete:
        folder = mlflow.artifacts.download_artifacts(
            run_id=trial.user_attrs["mlflow_run_id"],
            artifact_path="checkpoints",
            dst_path=str(tmp_path / "downloads" / str(trial.number)),
            tracking_uri=mlflow_server.uri,
        )
        assert [p.suffix for p in Path(folder).iterdir()] == [".ckpt"], trial.number

    best = client.get_model_version_by_alias(f"agecls-{STUDY}", "best")
    assert best.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    photo = tmp_path / "photo" / "face.jpg"
    photo.parent.mkdir()
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        Image.open(fh).convert("RGB").save(photo)
    out = tmp_path / "predicted"
    predict = [Path(sys.executable).with_name("agecls-predict"), f"ckpt=models:/agecls-{STUDY}@best"]
    predict += [f"tracking_uri={mlflow_server.uri}", f"images={photo.parent}", f"out={out}"]
    done = subprocess.run(predict, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout[-2000:])
    print(f"scenario wall time {time.monotonic() - started:.0f} s")


def test_slurm_gives_each_concurrent_trial_job_its_own_gpu(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Two trial jobs of one GPU each at once, submitted the way the sweeper submits trials (its submitit
    executor and job wrapper; the cluster has 2 GPUs): Slurm hands each a different index as
    CUDA_VISIBLE_DEVICES, and the trial process inside the job sees exactly that one."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from agecls.config import CONFIG_DIR
    from agecls.sweep.executors import SubmititExecutor

    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)  # submitit's sbatch and sacct calls reach this cluster
    overrides = ["sweep=optuna_bins", "hydra/launcher=slurm", "optuna.n_jobs=2"]
    overrides += [f"hydra.launcher.partition={slurm_cluster.partition}", "hydra.launcher.gpus_per_task=1"]
    overrides += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher["submitit_folder"] = str(tmp_path / "jobs" / "%j")
    executor = SubmititExecutor(launcher, cfg.optuna)
    trial = "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(4)"
    handles = [
        executor.start([sys.executable, "-c", trial], slot, tmp_path / f"trial{n}.log", f"gpu-trial-{n}")
        for n, slot in enumerate(executor.slots())
    ]
    # the queue, not the jobs' result files: submitit writes those just before a job ends
    wait_for(lambda: not _squeue(slurm_cluster), "both trial jobs to end", 180)
    seen = [(tmp_path / f"trial{n}.log").read_text().strip() for n in range(2)]
    assert sorted(seen) == ["0", "1"], seen
    jobs = [f"-j{h.job.job_id}" for h in handles]

    def accounted() -> list[list[str]]:
        out = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "State,AllocTRES,Start,End", *jobs)
        return [line.split("|") for line in out.splitlines()]

    # slurmdbd records a job's end after the queue has let it go (seconds later on loaded cores)
    def ended() -> bool:
        states = [r[0] for r in accounted()]
        return len(states) == 2 and not {"PENDING", "RUNNING"} & set(states)

    wait_for(ended, "the jobs' accounting", 60)
    rows = accounted()
    assert [r[0] for r in rows] == ["COMPLETED", "COMPLETED"], rows
    assert all("gres/gpu=1" in r[1] for r in rows), rows
    (_, _, s0, e0), (_, _, s1, e1) = rows
    assert s1 < e0 and s0 < e1, f"the two jobs did not overlap in time: {rows}"


def test_optuna_dashboard_reads_a_postgresql_study(postgres: Postgres, tmp_path: Path):
    pytest.importorskip("optuna_dashboard", reason="pip install 'agecls[dashboard]'")
    storage = postgres.create_database("dashboard")
    study = optuna.create_study(storage=storage, study_name="dash", direction="maximize")
    for x in (0.25, 0.5, 0.75):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(trial, x)
    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(exe), storage, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def get(path: str):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())

        wait_for(lambda: get("/api/studies") is not None, "optuna-dashboard", 120, log, proc)
        (summary,) = get("/api/studies")["study_summaries"]
        assert summary["study_name"] == "dash"
        detail = get(f"/api/studies/{summary['study_id']}?after=0")
        assert [t["state"] for t in detail["trials"]] == ["Complete"] * 3
        assert [t["values"] for t in detail["trials"]] == [[0.25], [0.5], [0.75]]
        assert detail["best_trials"][0]["values"] == [0.75]
    finally:
        proc.terminate()
        proc.wait(30)


# heavy (about a minute): by default test_trials_per_device packs trials per device locally, and the study
# above runs trials as Slurm jobs
@pytest.mark.heavy
def test_trials_share_each_gpu_through_slurm_shards(slurm_cluster: SlurmCluster, tmp_path: Path):
    """`optuna.trials_per_device=2` on the cluster's 2 GPUs of 2 shards each (tests/engines.py): every
    trial job asks for `--gres=shard:1`, four run at once, two per GPU, and each trial records the GPU
    Slurm gave its job (user attr and MLflow tag `device`)."""
    out = tmp_path / "out"
    args = ["sweep=optuna_optimizers", "optuna.study_name=shards", "optuna.n_trials=4", "optuna.n_jobs=4"]
    args += ["optuna.trials_per_device=2", "optuna/pruner=none", "hydra/launcher=slurm"]
    args += [f"hydra.launcher.partition={slurm_cluster.partition}", "hydra.launcher.gpus_per_task=1"]
    args += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *args]
    env = {**os.environ, **slurm_cluster.env, "AGECLS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True)
    done = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    study = optuna.load_study(study_name="shards", storage=f"sqlite:///{out}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    devices = Counter(t.user_attrs["device"] for t in trials)
    assert devices == {"cuda:0 (1 shard)": 2, "cuda:1 (1 shard)": 2}, devices
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("optuna_optimizers").experiment_id])
    tags = {r.data.tags["optuna.trial"]: r.data.tags["device"] for r in runs if "optuna.trial" in r.data.tags}
    assert tags == {str(t.number): t.user_attrs["device"] for t in trials}

    script = next(out.glob("multiruns/*/*/.submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --gres=shard:1" in script and "--gpus-per-task" not in script, script

    def accounted() -> list[list[str]]:
        lines = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobName,State,AllocTRES,Start,End")
        return [line.split("|")[1:] for line in lines.splitlines() if line.startswith("shards-trial-")]

    # slurmdbd records a job's end after the queue has let it go
    wait_for(lambda: [r[0] for r in accounted()] == ["COMPLETED"] * 4, "the trial jobs' accounting", 60)
    rows = accounted()
    assert all("gres/shard=1" in r[1] and "gres/gpu" not in r[1] for r in rows), rows
    assert max(r[2] for r in rows) < min(r[3] for r in rows), f"the four jobs did not all run at once: {rows}"
