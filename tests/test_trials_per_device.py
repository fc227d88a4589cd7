"""`optuna.trials_per_device`: several trials share a GPU. On this CPU machine the sweeper's slots still
name fake GPUs (CUDA_VISIBLE_DEVICES=0/1), each trial trains on the CPU (trainer.accelerator=auto finds no
CUDA) and records the device it was given. A trial that runs out of GPU memory beside others is simulated
by a training step raising torch.cuda.OutOfMemoryError (a sitecustomize on the sweep's PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState
from tests.conftest import FAST_OVERRIDES

from agecls.study import device_label
from agecls.sweep.checks import SweepError
from agecls.sweep.executors import RUN_ALONE_ENV, SubmititExecutor, SubprocessExecutor, submitit_parameters

# 64 faces of 16 px, one epoch: a trial is mostly its start; the learning rate stays searched
TINY = [o for o in FAST_OVERRIDES if not o.startswith("optimizer.lr=")]
TINY += ["data.synthetic.n=64", "data.image_size=16", "trainer.max_epochs=1", "model.blocks=1"]
SHARED = ["optuna.devices=[0,1]", "optuna.trials_per_device=2", "optuna/pruner=none"]

# The first training step of the sweep (whichever trial gets there first) runs out of "GPU memory"; every
# later step (that trial re-run alone included) trains: the claim is a file created once.
OOM_HOOK = """
import importlib.abc, importlib.util, os, sys

def _patch(module):
    original = module.FaceClassifier.training_step

    def training_step(self, *args, **kwargs):
        claim = os.path.join(os.environ["AGECLS_TEST_OOM_DIR"], "claimed")
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return original(self, *args, **kwargs)
        os.write(fd, os.environ.get("CUDA_VISIBLE_DEVICES", "").encode())
        os.close(fd)
        import torch
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    module.FaceClassifier.training_step = training_step

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "agecls.tasks.module":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Finder())
"""


def test_slots_share_each_device_and_the_setting_is_checked():
    ocfg = OmegaConf.create({"devices": [0, 1], "trials_per_device": 2, "n_jobs": 1})
    assert [s["CUDA_VISIBLE_DEVICES"] for s in SubprocessExecutor(ocfg).slots()] == ["0", "1", "0", "1"]
    cpu = OmegaConf.create({"devices": None, "trials_per_device": 3, "n_jobs": 2})
    assert [s["CUDA_VISIBLE_DEVICES"] for s in SubprocessExecutor(cpu).slots()] == ["", ""], (
        "no effect on CPU"
    )
    for bad in (0, -1, "two"):
        cpu.trials_per_device = bad
        with pytest.raises(SweepError, match=r"optuna.trials_per_device=.*valid: an integer >= 1"):
            SubprocessExecutor(cpu).slots()


def test_slurm_jobs_ask_for_a_gpu_shard_when_trials_share_devices():
    launcher = {
        "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "submitit_folder": "/tmp/x",
        "gpus_per_task": 1,
        "gres": None,
        "gpus_per_node": None,
        "cpus_per_task": 2,
    }
    *_, whole = submitit_parameters(launcher)
    assert whole["slurm_gpus_per_task"] == 1 and whole["slurm_gres"] is None
    *_, shared = submitit_parameters(launcher, trials_per_device=2)
    assert shared["slurm_gres"] == "shard:1" and shared["slurm_gpus_per_task"] is None
    assert shared["gpus_per_node"] is None and shared["cpus_per_task"] == 2
    with pytest.raises(SweepError, match="asks for 2 GPUs per job"):
        submitit_parameters({**launcher, "gres": "gpu:a100:2"}, trials_per_device=2)


def test_a_slurm_trial_rerun_alone_asks_for_the_launchers_whole_gpu(tmp_path, monkeypatch):
    launcher = {
        "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "submitit_folder": str(tmp_path / "%j"),
        "partition": "gpu",
        "gpus_per_task": 1,
        "cpus_per_task": 2,
        "name": "agecls",
    }
    executor = SubmititExecutor(launcher, OmegaConf.create({"n_jobs": 2, "trials_per_device": 2}))
    scripts: list[str] = []

    def submitter(auto):
        def submit(*args, **kwargs):  # the sbatch script as submitted, without a cluster
            scripts.append(auto._executor._make_submission_file_text("python -m x", "u"))
            return SimpleNamespace(job_id=str(len(scripts)))

        return submit

    for auto in (executor.executor, executor.alone):
        monkeypatch.setattr(auto, "submit", submitter(auto))
    for n, env in enumerate([{}, {RUN_ALONE_ENV: "1"}, {}]):
        executor.start(["true"], env, tmp_path / f"{n}.log", f"s-trial-{n}")
    shared, alone, again = scripts
    assert "#SBATCH --gres=shard:1" in shared and "--gpus-per-task" not in shared, shared
    assert "#SBATCH --gpus-per-task=1" in alone and "--gres" not in alone, alone
    assert "#SBATCH --gres=shard:1" in again and "#SBATCH --job-name=s-trial-2" in again, again


def test_device_label_names_what_the_environment_gives():
    assert device_label({"CUDA_VISIBLE_DEVICES": "1"}) == "cuda:1"
    assert device_label({"CUDA_VISIBLE_DEVICES": ""}) == "cpu"
    assert device_label({}) is None
    shard = {"CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_GPUS": "1", "SLURM_SHARDS_ON_NODE": "1"}
    assert device_label(shard) == "cuda:1 (1 shard)"
    assert device_label({"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "3"}) == "cuda:0 (Slurm GPU 3)"


def _sweep(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, "sweep=optuna_optimizers", *SHARED, *args]
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=600)


def _overlap(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


@pytest.mark.slow
def test_four_trials_run_at_once_two_per_device_each_recording_it(tmp_path):
    out = tmp_path / "out"
    done = _sweep(out, "optuna.study_name=share", "optuna.n_trials=4")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="share", storage=f"sqlite:///{out}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert Counter(t.user_attrs["device"] for t in trials) == {"cuda:0": 2, "cuda:1": 2}
    assert all(_overlap(a, b) for a in trials for b in trials), "the four trials ran at once"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("optuna_optimizers").experiment_id])
    tagged = {
        r.data.tags["optuna.trial"]: r.data.tags.get("device") for r in runs if "optuna.trial" in r.data.tags
    }
    assert tagged == {str(t.number): t.user_attrs["device"] for t in trials}


@pytest.mark.slow
def test_a_trial_out_of_gpu_memory_beside_others_is_rerun_alone(tmp_path):
    out, hook = tmp_path / "out", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OOM_HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "AGECLS_TEST_OOM_DIR": str(hook)}
    done = _sweep(out, "optuna.study_name=oom", "optuna.n_trials=6", "tracking.enabled=false", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="oom", storage=f"sqlite:///{out}/optuna.db")
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["error"].startswith(
        "OutOfMemoryError: CUDA out of memory"
    )
    oom = failed[0]
    assert oom.user_attrs["failed_because"].startswith(f"out of GPU memory on {oom.user_attrs['device']}")
    (alone,) = [t for t in trials if t.user_attrs.get("run_alone")]
    assert alone.user_attrs["requeued_from"] == oom.number and alone.params == oom.params
    assert alone.state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6, "the OOM counts as no failure"
    device = alone.user_attrs["device"]
    beside = [t for t in trials if t is not alone and t.user_attrs["device"] == device and _overlap(t, alone)]
    assert beside == [], f"trials ran on {device} beside the one re-run alone: {[t.number for t in beside]}"
    others = [t for t in trials if t.user_attrs["device"] != device and _overlap(t, alone)]
    assert others, "the other device kept running trials meanwhile"
    assert "ran out of GPU memory beside other trials; re-queued to run alone" in done.stdout + done.stderr
