"""A killed single run is marked FAILED by the next command, and `trainer.resume` continues it to the result
of the uninterrupted run, in the same MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from tests.conftest import FAST_OVERRIDES

from agecls.data.augment import build_augment
from agecls.data.datamodule import FaceDataModule
from agecls.errors import UsageError
from agecls.tracking import end_dead_runs, process_identity, process_started, write_run_file
from agecls.training.resume import check_same_run
from agecls.training.train import train

# Shuffled batches, dropout, the EMA and the per-epoch learning rate schedule all have to continue where the
# killed process left them.
RUN = [
    *FAST_OVERRIDES,
    "data.synthetic.n=200",
    "callbacks.ema.enabled=true",
    "scheduler=cosine",
    "tracking.experiment=resume",
]


def _client(output_dir: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def _killed_run(output_dir: Path, run_dir: Path, kill_at_epoch: int, *overrides: str) -> tuple[int, int, str]:
    """agecls-train in a subprocess that SIGKILLs itself as epoch `kill_at_epoch` (from 0) starts: its exit
    status, pid and stderr."""
    env = {
        **os.environ,
        "AGECLS_OUTPUT_DIR": str(output_dir),
        "KILL_AT_EPOCH": str(kill_at_epoch),
        # the same kernels' threading as this process, so the epochs done there round as they would here
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    script = Path(__file__).parent / "kill_at_epoch.py"
    with subprocess.Popen(
        [sys.executable, str(script), *overrides, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    ) as job:
        _, stderr = job.communicate(timeout=300)
    return job.returncode, job.pid, stderr


@pytest.mark.slow
def test_a_killed_run_is_marked_failed_then_resumed_to_the_uninterrupted_result(
    compose_cfg, output_dir, tmp_path
):
    whole = train(compose_cfg(RUN))

    run_dir = tmp_path / "killed"
    status, pid, stderr = _killed_run(output_dir, run_dir, 2, *RUN)
    assert status == -9, stderr[-3000:]
    marker = json.loads((run_dir / "run.json").read_text())
    assert marker["status"] == "running" and marker["pid"] == pid
    client = _client(output_dir)
    run_id = marker["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # The next command on this host finds the run's process gone and says so.
    assert end_dead_runs(compose_cfg(RUN).tracking) == [run_id]
    dead = client.get_run(run_id)
    assert dead.info.status == "FAILED"
    host = process_identity()["agecls.host"]
    assert dead.data.tags["agecls.ended_by"] == f"process gone on host {host}: pid {pid} not running"
    marker = json.loads((run_dir / "run.json").read_text())
    assert marker["status"] == "failed" and marker["ended_by"] == dead.data.tags["agecls.ended_by"]

    resumed = train(compose_cfg([*RUN, f"trainer.resume={run_dir}"]))
    assert resumed["mlflow_run_id"] == run_id and resumed["run_dir"] == str(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "agecls.ended_by" not in run.data.tags
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    epochs = whole["epochs_trained"]
    for metric in ("train/loss", "val/macro_f1"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), (metric, steps)
    for metric in ("val/loss", "val/macro_f1"):
        ours = [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]
        theirs = client.get_metric_history(whole["mlflow_run_id"], metric)
        assert ours == [m.value for m in sorted(theirs, key=lambda m: m.step)], metric
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["objective"] == whole["objective"]
    a, b = _weights(whole["checkpoint"]), _weights(resumed["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test/macro_f1"] == whole["test/macro_f1"]


def test_only_this_hosts_runs_whose_process_is_gone_are_ended(compose_cfg, output_dir):
    tracking = compose_cfg(["tracking.experiment=dead-runs"]).tracking
    client = _client(output_dir)
    experiment = client.create_experiment("dead-runs")
    with subprocess.Popen([sys.executable, "-c", "pass"]) as job:
        job.wait()
    me = process_identity()
    host, started = me["agecls.host"], me["agecls.started"]
    cases = {
        "exited": {"agecls.pid": str(job.pid), "agecls.host": host, "agecls.started": "1"},
        "alive": me,
        "pid reused": {**me, "agecls.started": "1"},
        "other host": {"agecls.pid": str(job.pid), "agecls.host": "elsewhere", "agecls.started": "1"},
    }
    ids = {
        name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
        for name, tags in cases.items()
    }
    ended = end_dead_runs(tracking)
    assert sorted(ended) == sorted([ids["exited"], ids["pid reused"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"exited": "FAILED", "alive": "RUNNING", "pid reused": "FAILED", "other host": "RUNNING"}
    why = client.get_run(ids["pid reused"]).data.tags["agecls.ended_by"]
    pid = me["agecls.pid"]
    assert (
        why
        == f"process gone on host {host}: pid {pid} is now another process, started at tick {started}, not 1"
    )
    assert end_dead_runs(tracking) == []  # the FAILED ones are not judged again


def test_resume_refuses_a_path_without_a_checkpoint_and_a_live_run(compose_cfg, output_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UsageError) as raised:
        train(compose_cfg([*RUN, f"trainer.resume={missing}"]))
    assert str(raised.value) == (
        f"trainer.resume={missing}: no such folder or file; valid: auto, a run folder holding "
        "checkpoints/last.ckpt, or a .ckpt file in one"
    )
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"checkpoints/last.ckpt does not exist \(the run ended no epoch"):
        train(compose_cfg([*RUN, f"trainer.resume={folder}"]))

    # A run whose process still runs on this host (here: this test's own parent process) is not resumed.
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / "config.yaml").write_text("seed: 1\n")
    parent = os.getppid()
    write_run_file(
        folder,
        status="running",
        pid=parent,
        host=process_identity()["agecls.host"],
        started=process_started(parent),
    )
    with pytest.raises(UsageError) as raised:
        train(compose_cfg([*RUN, f"trainer.resume={folder}"]))
    assert str(raised.value) == (
        f"trainer.resume: {folder} is still running (pid {parent} on this host, {folder / 'run.json'}); "
        "valid: resume it once that process has stopped"
    )


def test_resume_auto_needs_the_command_that_started_the_run(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "seed: 42\ntrainer:\n  max_epochs: 4\n  resume: null\nmodel:\n  blocks: 2\n"
    )
    check_same_run(
        {"seed": 42, "trainer": {"max_epochs": 9, "resume": "auto"}, "model": {"blocks": 2}}, tmp_path
    )
    with pytest.raises(UsageError) as raised:
        check_same_run(
            {"seed": 7, "trainer": {"max_epochs": 4, "resume": "auto"}, "model": {"blocks": 3}}, tmp_path
        )
    assert str(raised.value) == (
        f"trainer.resume=auto: this command's config differs from the one {tmp_path} ran with: "
        "model.blocks=3 (was 2), seed=7 (was 42); valid: the run's own command (only trainer.resume, "
        "trainer.max_epochs, trainer.enable_progress_bar may change), or a new hydra.run.dir"
    )


@pytest.mark.slow
def test_agecls_train_refuses_overrides_that_would_change_a_resumed_run(output_dir, tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / "config.yaml").write_text("seed: 42\n")
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(output_dir)}
    command = ["agecls-train", f"trainer.resume={folder}", "trainer.max_epochs=9", "model.blocks=3"]
    run = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:], f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    saved = folder / "config.yaml"
    assert run.stderr.strip().splitlines()[-1] == (
        f"agecls-train: error: trainer.resume={folder} continues the run with its own {saved}, but the "
        "command also sets 'model.blocks=3'; valid: only trainer.resume, trainer.max_epochs, "
        "trainer.enable_progress_bar (start a new run to change anything else)"
    )


@pytest.mark.parametrize(
    ("pipeline", "weighted"), [("loader", False), ("loader", True), ("device", False), ("device", True)]
)
def test_a_datamodule_restored_from_its_state_draws_the_next_epoch_of_the_original(
    compose_cfg, pipeline, weighted
):
    """Batch order, weighted sampling and augmentation (albumentations in-process, or the device pipeline's
    generators) continue from a checkpoint's datamodule state, not from the seed."""
    cfg = compose_cfg(["augment=seed", "data.image_size=32", "data.crop_margin=4"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 36, 36, 1), dtype=np.uint8)
    labels, split = np.arange(60) % 3, np.array(["train"] * 36 + ["val"] * 12 + ["test"] * 12)

    def datamodule() -> FaceDataModule:
        return FaceDataModule(
            images,
            labels,
            split,
            3,
            batch_size=8,
            seed=1,
            image_size=32,
            pipeline=pipeline,
            weighted_sampler=weighted,
            train_transform=build_augment(cfg.augment),
        )

    def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(loader)
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    original = datamodule()
    loader = original.train_dataloader()
    first = epoch(loader)
    state = original.state_dict()
    second = epoch(loader)
    restored = datamodule()
    restored.load_state_dict(state)
    again = epoch(restored.train_dataloader())
    assert torch.equal(again[0], second[0]) and torch.equal(again[1], second[1])
    assert not torch.equal(second[0], first[0])  # the streams had moved on: the seed alone gives `first`
