"""Recovery of trials no process will finish: RUNNING trials of dead processes or stale heartbeats failed
and re-queued with their parameters, surplus trials given back, an interrupted sweeper's trials re-queued."""

from __future__ import annotations

import logging
import warnings
from datetime import datetime
from typing import Any

from agecls.study import (
    fail_trial,
    find_trial,
    heartbeat_ages,
    process_gone,
    requeue,
    set_finished_attrs,
    sqlite_lock,
)
from agecls.sweep.checks import SweepError
from agecls.sweep.executors import Running
from agecls.sweep.stopping import stop_trials

log = logging.getLogger(__name__)


class Reaper:
    """Fails and re-queues the study's RUNNING trials that no process will finish: at once those whose
    recorded process (or, before it recorded one, the sweeper that asked for them) ran on this host and
    is gone; after `grace_period` without a heartbeat those of other hosts. Their MLflow runs end FAILED."""

    def __init__(self, study, url: str, retries: int, grace_period: int, tracker: Any) -> None:
        self.study, self.url, self.retries, self.grace = study, url, retries, grace_period
        self.tracker = tracker

    def __call__(self, running: dict[int, Running]) -> list[int]:
        """Reap the trials that are not this sweeper's own (`running`: it watches those itself); returns
        the numbers failed here."""
        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        failed_before = len(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        with sqlite_lock(self.url), warnings.catch_warnings():
            # two sweepers failing one stale trial must not both re-queue it; heartbeats are experimental
            warnings.simplefilter("ignore", ExperimentalWarning)
            fail_stale_trials(self.study)
        others = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in running
        ]
        ages = heartbeat_ages(self.url, [t for t in others if _dead_here(t) is None]) if others else {}
        failed = []
        for frozen in others:
            reason = _dead_here(frozen)
            if reason is None and frozen.number in ages and ages[frozen.number] is None:
                started = frozen.datetime_start or datetime.now()
                if (datetime.now() - started).total_seconds() > self.grace:
                    # asked by a sweeper that died before it recorded a heartbeat or anything else
                    reason = f"no heartbeat at all since it was asked for at {started:%Y-%m-%d %H:%M:%S}"
            if reason and fail_and_requeue(self.study, frozen, self.retries, reason=reason, url=self.url):
                log.warning("trial %d failed and re-queued: %s", frozen.number, reason)
                failed.append(frozen.number)
        failed_after = len(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if self.tracker and failed_after > failed_before:
            self.tracker.end_orphan_runs(self.study)
        return failed

    def log_waiting(self, target: int) -> None:
        """Say which trials the study is waiting for: number, host, pid, last heartbeat."""
        from optuna.trial import TrialState

        others = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not others:
            return
        ages = heartbeat_ages(self.url, others)
        finished = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        shown = []
        for t in others:
            record = t.user_attrs.get("process") or t.user_attrs.get("sweeper") or {}
            age = ages.get(t.number)
            beat = "no heartbeat yet" if age is None else f"last heartbeat {age:.0f} s ago"
            where = f"host {record.get('host', '?')}, pid {record.get('pid', '?')}"
            shown.append(f"trial {t.number} ({where}, {beat})")
        log.info(
            "%d of optuna.n_trials=%d trials finished; waiting for %d running elsewhere: %s. One without a "
            "heartbeat for optuna.grace_period=%d s is failed and re-queued here.",
            len(finished),
            target,
            len(others),
            "; ".join(shown),
            self.grace,
        )


def _dead_here(frozen) -> str | None:
    """Why a RUNNING trial can be failed at once: its recorded trial process (or, before one was recorded,
    the sweeper that asked for it) ran on this host and is gone. None when it is alive or ran elsewhere."""
    for key, what in (("process", "trial process"), ("sweeper", "sweeper that started it")):
        record = frozen.user_attrs.get(key)
        if record is None:
            continue
        if process_gone(record):
            return f"its {what} (pid {record.get('pid')} on {record.get('host')}) is gone"
        return None
    return None


def surplus(study, number: int, target: int, url: str) -> bool:
    """Whether trial `number`, just asked for, is one too many: the trials before it (finished or running)
    already fill the study, because another worker asked at the same moment. It is then failed, marked
    `surplus`, without running (a re-queued trial it took from the queue is queued again), so concurrent
    workers end with exactly n_trials finished trials."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    before = [t for t in study.get_trials(deepcopy=False, states=states) if t.number < number]
    if len(before) < target:
        return False
    reason = f"surplus: trials before it already fill optuna.n_trials={target} (another worker asked too)"
    failed = fail_trial(study, number, reason, url)
    if failed is not None and "requeued_from" in failed.user_attrs:
        requeue(study, failed, None, str(failed.user_attrs.get("requeue_reason", reason)))
    log.info("trial %d not run: %s", number, reason)
    return True


def fail_and_requeue(
    study, frozen, retries: int, *, reason: str = "ended without telling the study", url: str | None = None
) -> bool:
    """Fail a trial whose process or job ended without telling the study, and re-queue its parameters
    (at most `retries` times per original trial), marked with the reason; False when another process
    finished or failed it first."""
    failed = fail_trial(study, frozen.number, reason, url)
    if failed is None:
        return False
    requeue(study, failed, retries, reason)
    return True


def requeue_alone(study, frozen, shared: bool) -> bool:
    """Re-queue, once, a failed trial that ran out of GPU memory on a device it shared with other trials
    (`shared`: its sweeper slot's GPU had others; or its Slurm job had a GPU shard), marked `run_alone`: the
    sweeper then starts it only on a GPU with nothing else running, or as a Slurm job of a whole GPU. Its
    record says why (`failed_because`, beside the trial's own `error`). False for any other failed trial,
    and for one that already ran alone."""
    attrs = frozen.user_attrs
    device = str(attrs.get("device") or "its GPU")
    shared = shared or "shard" in device
    if not (shared and attrs.get("out_of_memory")) or attrs.get("run_alone"):
        return False
    reason = f"out of GPU memory on {device}, shared with other trials: re-queued to run alone"
    requeue(study, frozen, None, reason, marks={"run_alone": True})  # no retry limit: once, by `run_alone`
    set_finished_attrs(study, frozen, {"failed_because": reason})
    return True


def current_trial(study, number: int):
    """Trial `number` (one this sweeper asked for, so it exists) as the storage holds it now."""
    frozen = find_trial(study, number)
    if frozen is None:  # pragma: no cover - the study lost a trial this sweeper asked for
        raise SweepError(f"study {study.study_name!r} has no trial {number}")
    return frozen


def settle_ended(study, number: int, retries: int, url: str, tracker: Any):
    """Trial `number` as stored once its process or job ended; one still RUNNING died without telling the
    study (killed, out of memory, a lost node): failed, re-queued (optuna.retries), its MLflow run ended."""
    from optuna.trial import TrialState

    frozen = current_trial(study, number)
    if frozen.state == TrialState.RUNNING:
        why = "its process or job ended without telling the study (killed?)"
        fail_and_requeue(study, frozen, retries, reason=why, url=url)
        frozen = current_trial(study, number)
        if tracker:
            tracker.end_orphan_runs(study)
    return frozen


def requeue_interrupted(study, running: dict[int, Running], url: str) -> None:
    """Stop running trials, fail them in the study and re-queue their parameters."""
    stop_trials([item.handle for item in running.values()])
    for item in running.values():
        failed = fail_trial(study, item.number, "interrupted: the sweeper was stopped", url)
        if failed is not None:
            # failed.params also holds what the trial drew itself (bins.cut1.. of bins=search)
            requeue(study, failed, None, "interrupted: the sweeper was stopped")


def stop_for_outage(running: dict[int, Running], tracker: Any, error: Exception) -> str:
    """The sweeper gives up on an unreachable storage: its running trials stopped (they could not tell the
    study anyway), the study's MLflow run KILLED; returns the one line to stop with. The trials stay
    RUNNING in the study: the same command run again finds their processes gone and re-queues them."""
    stop_trials([item.handle for item in running.values()])
    if tracker:
        try:
            tracker.client.set_terminated(tracker.run_id, status="KILLED")
        except Exception as exc:  # noqa: BLE001 - the tracking server may be down too; the storage is the news
            log.warning("the study's MLflow run %s not ended: %s", tracker.run_id[:8], exc)
    stopped = f"; {len(running)} running trial(s) stopped, re-queued when it runs again" if running else ""
    return f"the sweep stopped: {error}{stopped}"
