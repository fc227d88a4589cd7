"""Studies that resume without repeats or shortfall: per-trial sampler seeds, dead trials of this host
re-queued at once (and marked), concurrent workers that neither repeat draws nor overshoot n_trials."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from tests.test_sweeper import TINY

from agecls.evaluation.study_report import trials_table
from agecls.study import heartbeat_ages, process_gone, process_record, record_heartbeat, requeue, trial_id
from agecls.sweep.recovery import Reaper, surplus
from agecls.sweep.sampler import study_sampler, trial_seed

SPACE = {
    "x": FloatDistribution(0.0, 1.0),
    "opt": CategoricalDistribution(["adam", "nadam", "rmsprop", "sgd", "adamw", "adamax", "adadelta"]),
}


def _draws(study: optuna.Study, n: int) -> list[tuple]:
    """Ask `n` trials, tell each its x (TPE then models real values), return their params."""
    out = []
    for _ in range(n):
        trial = study.ask(SPACE)
        out.append((trial.params["x"], trial.params["opt"]))
        study.tell(trial, trial.params["x"])
    return out


@pytest.mark.parametrize("sampler", ["TPESampler", "RandomSampler", "QMCSampler"])
def test_a_restarted_sweeper_and_a_second_worker_draw_new_parameters(tmp_path, sampler):
    cfg = OmegaConf.create({"_target_": f"optuna.samplers.{sampler}", "seed": 42})
    url = f"sqlite:///{tmp_path}/s.db"

    def start() -> optuna.Study:  # a sweeper (re)starting on the study: a fresh sampler, same config
        return optuna.load_study(study_name="s", storage=url, sampler=study_sampler(cfg))

    optuna.create_study(study_name="s", storage=url, direction="maximize")
    first, restarted = start(), start()
    draws = _draws(first, 2) + _draws(restarted, 2) + _draws(first, 1) + _draws(start(), 1)
    assert len(set(draws)) == 6, draws
    # the same seed and trial number give the same draw: a study re-run from scratch repeats itself
    optuna.create_study(study_name="again", storage=url, direction="maximize")
    again = optuna.load_study(study_name="again", storage=url, sampler=study_sampler(cfg))
    assert _draws(again, 2) == draws[:2]
    assert trial_seed(42, 0) != trial_seed(42, 1) and trial_seed(42, 3) == trial_seed(42, 3)


def test_process_record_tells_a_gone_or_reused_pid():
    me = process_record()
    assert me["host"] == socket.gethostname() and me["pid"] == os.getpid() and me["start"] > 0
    assert process_gone(me) is False
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = process_record(child.pid)
    deadline = time.monotonic() + 30
    while process_gone(record) is False and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(record) is True, "an ended child not yet reaped (a zombie) is gone"
    child.wait()
    assert process_gone(record) is True
    assert process_gone({**me, "start": me["start"] + 1}) is True, "the pid now names another process"
    assert process_gone({**me, "boot": "another-boot"}) is True
    assert process_gone({**me, "host": "elsewhere"}) is None, "another host: only its heartbeat tells"


def _running(study: optuna.Study, **attrs) -> int:
    trial = study.ask(SPACE)
    record_heartbeat(study, trial_id(trial))
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial.number


def test_dead_trials_of_this_host_are_requeued_at_once_marked_and_their_runs_ended(tmp_path, caplog):
    from agecls.sweep.study_tracking import StudyRun

    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = process_record(child.pid)
    child.wait()
    me = process_record()
    elsewhere = {**dead, "host": "node-7"}
    numbers = {
        "dead process": _running(study, process=dead, sweeper=me),
        "alive process": _running(study, process=me),
        "other host": _running(study, process=elsewhere),
        "dead sweeper, no process yet": _running(study, sweeper=dead),
        "mine": _running(study, process=dead),  # this sweeper's own: it watches its handle instead
    }
    cfg = OmegaConf.create(
        {
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"},
            "optuna": {"storage": url, "register_best": False},
        }
    )
    cfg.tracking.artifact_root = str(tmp_path / "art")
    tracker = StudyRun.open(cfg, "s")
    runs = {}
    for name, number in numbers.items():
        tags = {"optuna.study": "s", "optuna.trial": str(number), "mlflow.parentRunId": tracker.run_id}
        runs[name] = tracker.client.create_run(tracker.experiment_id, tags=tags).info.run_id

    reaper = Reaper(study, url, retries=1, grace_period=120, tracker=tracker)
    failed = reaper({numbers["mine"]: None})
    assert failed == [numbers["dead process"], numbers["dead sweeper, no process yet"]]
    trials = study.get_trials()
    state = {name: trials[n].state for name, n in numbers.items()}
    assert state == {
        "dead process": TrialState.FAIL,
        "alive process": TrialState.RUNNING,
        "other host": TrialState.RUNNING,
        "dead sweeper, no process yet": TrialState.FAIL,
        "mine": TrialState.RUNNING,
    }
    gone = f"its trial process (pid {dead['pid']} on {dead['host']}) is gone"
    assert trials[numbers["dead process"]].user_attrs["failed_because"] == gone
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["requeued_from"] for t in queued] == failed
    assert queued[0].user_attrs["requeue_reason"] == gone
    assert queued[0].params == trials[numbers["dead process"]].params
    assert "process" not in queued[0].user_attrs, "the dead run's process record is not copied"
    assert queued[1].user_attrs["requeue_reason"].startswith("its sweeper that started it (pid")
    table = trials_table(study)  # agecls-report's trials.csv
    assert sorted(table["requeued_from"].dropna().astype(int)) == failed
    status = {name: tracker.client.get_run(run).info.status for name, run in runs.items()}
    assert [name for name, s in status.items() if s == "FAILED"] == [
        "dead process",
        "dead sweeper, no process yet",
    ]
    ended = tracker.client.get_run(runs["dead process"]).data.tags["agecls.ended_by"]
    assert ended == f"sweeper: {gone}"
    assert reaper({numbers["mine"]: None}) == [], "nothing left to reap"

    # a sweeper with nothing left to start says which trials it waits for
    running = study.get_trials(states=(TrialState.RUNNING,))
    ages = heartbeat_ages(url, running)
    assert sorted(ages) == sorted(t.number for t in running) and all(0 <= a < 60 for a in ages.values())
    with caplog.at_level(logging.INFO, logger="agecls.sweep.recovery"):
        reaper.log_waiting(5)
    waited = f"trial {numbers['other host']} (host node-7, pid {dead['pid']}, last heartbeat"
    assert "0 of optuna.n_trials=5 trials finished; waiting for 3 running elsewhere" in caplog.text
    assert waited in caplog.text


def test_a_trial_asked_for_at_the_same_moment_as_another_workers_is_given_back(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=url)
    first = _running(study)
    failed = study.ask(SPACE)
    study.tell(failed, state=TrialState.FAIL)
    requeue(study, study.trials[failed.number], 1, "its trial process (pid 1 on x) is gone")
    mine = study.ask(SPACE)  # pops the re-queued trial
    assert mine.user_attrs["requeued_from"] == failed.number
    assert not surplus(study, first, 2, url) and not surplus(study, mine.number, 2, url)
    extra = study.ask(SPACE)  # a second worker saw 1 running of 2 at the same moment
    assert surplus(study, extra.number, 2, url)
    assert study.trials[extra.number].state == TrialState.FAIL
    assert study.trials[extra.number].user_attrs["failed_because"].startswith("surplus: trials before it")
    # a re-queued trial taken from the queue as a surplus goes back to the queue, its reason kept
    study.tell(mine, state=TrialState.FAIL)
    requeue(study, study.trials[mine.number], None, "again")
    popped = study.ask(SPACE)
    assert popped.user_attrs["requeued_from"] == mine.number
    assert surplus(study, popped.number, 1, url)
    (waiting,) = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert waiting.user_attrs == {"requeued_from": popped.number, "requeue_reason": "again"}
    assert waiting.params == study.trials[failed.number].params


def _has_study(path: Path, name: str) -> bool:
    """Whether the sqlite storage at `path` holds study `name` (read-only: an Optuna storage opened while
    the sweeper creates the schema would race it)."""
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return bool(db.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchall())
    except sqlite3.Error:  # the schema is not there yet
        return False


# -- the central scenario: real processes killed with SIGKILL, then the same command run again -----------
def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *args]


# The same command run again once (default suite), or twice at once: a second worker joins the restarted
# one (heavy: two more processes importing torch; the heavy two-worker study in test_sweeper also checks it).
@pytest.mark.slow
@pytest.mark.parametrize(
    "workers", [1, pytest.param(2, marks=pytest.mark.heavy)], ids=["rerun", "two-workers"]
)
def test_a_study_killed_mid_epoch_resumes_at_once_without_repeats_or_shortfall(tmp_path, workers):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    args = ["sweep=optuna_optimizers", "optuna.study_name=kill", "optuna.n_trials=2", "optuna.n_jobs=1"]
    # A grace period far longer than the test: a re-run that waited for the heartbeat would show.
    args += ["optuna/pruner=none", "trainer.max_epochs=3", "optuna.grace_period=600"]
    args += ["model.dropout=interval(0.1,0.6)"]  # continuous: two fair draws never coincide
    cmd = _command(*args)
    storage = f"sqlite:///{out}/optuna.db"

    first = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300  # start-up is slow when the machine is loaded
    running: list = []
    while time.monotonic() < deadline and first.poll() is None:
        if _has_study(out / "optuna.db", "kill"):  # opened by the sweeper: reading it now creates nothing
            trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
            running = [t for t in trials if t.state == TrialState.RUNNING]
            if running and all(t.intermediate_values for t in running):
                break
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweeper and its trials die mid-epoch, nothing runs a handler
    _, err = first.communicate(timeout=60)
    killed = optuna.load_study(study_name="kill", storage=storage).get_trials()
    assert any(t.state == TrialState.RUNNING for t in killed), ([t.state for t in killed], err[-3000:])

    started = time.monotonic()
    reruns = [
        subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(workers)
    ]
    errors = [w.communicate(timeout=600)[1].decode() for w in reruns]
    seconds = time.monotonic() - started
    assert [w.returncode for w in reruns] == [0] * workers, [e[-3000:] for e in errors]
    assert seconds < 600, "the re-run waited for the dead trials' heartbeats to go stale"

    trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states, states
    dead = [t for t in killed if t.state == TrialState.RUNNING]
    for t in dead:
        assert trials[t.number].state == TrialState.FAIL
        assert trials[t.number].user_attrs["failed_because"].startswith("its trial process (pid")
    requeued = [t for t in trials if "requeued_from" in t.user_attrs]
    assert sorted(t.user_attrs["requeued_from"] for t in requeued) == [t.number for t in dead]
    for t in requeued:
        assert t.params == trials[t.user_attrs["requeued_from"]].params
        assert "is gone" in t.user_attrs["requeue_reason"]
    drawn = [t for t in trials if "requeued_from" not in t.user_attrs and t.state != TrialState.WAITING]
    drawn = [t for t in drawn if not t.user_attrs.get("failed_because", "").startswith("surplus")]
    params = [tuple(sorted(t.params.items())) for t in drawn]
    assert len(set(params)) == len(params) >= 2, "a fresh draw repeated an earlier trial's parameters"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("optuna_optimizers").experiment_id])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    by_trial = {r.data.tags.get("optuna.trial"): r for r in runs if "optuna.trial" in r.data.tags}
    for t in dead:
        run = by_trial.get(str(t.number))
        if run is not None:  # killed before it opened its run: nothing to end
            assert run.info.status == "FAILED"
            assert run.data.tags["agecls.ended_by"].startswith("sweeper: its trial process (pid")
    for t in requeued:
        assert by_trial[str(t.number)].data.tags["optuna.requeued_from"] == str(t.user_attrs["requeued_from"])
