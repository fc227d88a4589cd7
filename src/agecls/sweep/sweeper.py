"""agecls's Hydra sweeper for Optuna studies: asynchronous trials, pruning, resume, MLflow parent run.

Why not hydra-optuna-sweeper: 1.3.0 pins optuna<3 and its sqlite storage fails with SQLAlchemy 2; it runs
trials in blocking batches through the launcher and cannot prune. Here the study lives in an RDB storage,
and each trial is its own `python -m agecls.cli.train` process: it reports every epoch's validation value,
is pruned by the study's pruner, and tells the study its outcome. This process only asks for trials and
keeps `n_jobs` (or one per GPU) of them running, starting the next the moment one ends.

Resume: the study's state is the storage. Re-running the same command continues it: finished trials are
kept; a trial left RUNNING by a dead process is failed and re-queued with the same parameters (marked
`requeued_from`): at once when its recorded process ran on this host and is gone, else once its heartbeat is
stale (agecls.sweep.recovery). `n_trials` counts complete and pruned trials only, so nothing is counted twice,
and the sweep ends only when the study holds them (waiting for trials running elsewhere). Several processes
(or machines sharing a PostgreSQL storage) may run the same command at once: they share one study, and each
trial's sampler is seeded from the trial's number (agecls.sweep.sampler), so no two draw the same parameters.

Where trials run: as child processes of this one (Hydra's default launcher), or as submitit jobs when the
command selects a submitit launcher (`hydra/launcher=slurm` submits each trial as a Slurm job with the
launcher's GPU/CPU/memory/time requests; `hydra/launcher=submitit_local` runs them as local submitit jobs).
Either way a trial is the same `python -m agecls.cli.train ... optuna.trial=N` command; see
agecls.sweep.executors.

A setting that cannot work is a UsageError before the study opens; Ctrl-C or SIGTERM re-queues the running
trials and raises KeyboardInterrupt. agecls.cli.train turns both into exit codes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf

from agecls.config import is_group
from agecls.errors import AgeclsError, UsageError
from agecls.outage import StoreUnavailable
from agecls.study import (
    device_label,
    fresh,
    open_study,
    process_record,
    record_heartbeat,
    trial_id,
)
from agecls.sweep.checks import SweepError, check_settings, check_several_objectives, study_objectives
from agecls.sweep.console import (
    StatusConsole,
    objective_value,
    running_lines,
    status_line,
    trial_view,
)
from agecls.sweep.drawable import Drawable, check_space
from agecls.sweep.executors import (
    RUN_ALONE_ENV,
    Running,
    TrialExecutor,
    job_slots,
    trial_executor,
    trials_per_device,
)
from agecls.sweep.followup import check_followups, run_followups
from agecls.sweep.params import present_params
from agecls.sweep.recovery import (
    Reaper,
    requeue_alone,
    requeue_interrupted,
    settle_ended,
    stop_for_outage,
    surplus,
)
from agecls.sweep.sampler import grid_size, study_sampler
from agecls.sweep.space import format_value, search_space
from agecls.sweep.summary import write_summary
from agecls.sweep.warm_start import enqueue_warm_starts, warm_starts

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the checked settings decide before the study opens."""

    drawable: Drawable  # the space (key -> Optuna distribution): what every trial draws, what only some do
    fixed: list[str]  # the overrides every trial gets
    names: list[str] | None  # objective.metrics of a study of several objectives, else None
    directions: list[str]
    warm: list[tuple[str, dict[str, Any]]]  # the warm starts to enqueue: (label, values)
    left_out: list[str]  # keys of optuna.optional_params this config does not have


@dataclass
class Sweep:
    """What a sweep settled before its first trial: the study, where its trials run, its MLflow run."""

    study: Any
    plan: Plan
    sweep_dir: Path
    executor: TrialExecutor
    slots: list[dict[str, str]]
    tracker: Any  # the study's StudyRun; None when tracking is off
    reap: Reaper
    url: str
    target: int
    max_failures: int
    retries: int
    heartbeat_interval: int
    console: StatusConsole = field(default_factory=StatusConsole)
    started: float = field(default_factory=time.monotonic)

    @property
    def parent(self) -> str | None:
        return self.tracker.run_id if self.tracker else None


@dataclass
class LoopState:
    """What the trials' loop changes as it goes: the trials it watches, the failures so far, and when it
    last did each periodic step (time.monotonic())."""

    running: dict[int, Running] = field(default_factory=dict)
    failures: int = 0
    reasons: Counter = field(default_factory=Counter)  # why trials failed: reason -> count
    failed_logs: dict[str, Path] = field(default_factory=dict)  # reason -> the first failed trial's log
    stopping: bool = False  # more than optuna.max_failures failed: no new trials
    last_beat: float = 0.0
    last_check: float = 0.0
    last_show: float = 0.0
    last_wait_log: float = 0.0


def followups(study, cfg: DictConfig, executor, slots, sweep_dir: Path, tracker) -> dict[str, Any]:
    """run_followups with the study's MLflow run (`tracker`, None when untracked) ended KILLED when they are
    interrupted, as the trials' loop does: the study's choice waits for the same command to run again."""
    try:
        return run_followups(study, cfg, executor, slots, sweep_dir, tracker.run_id if tracker else None)
    except (KeyboardInterrupt, SystemExit):
        if tracker:
            tracker.client.set_terminated(tracker.run_id, status="KILLED")
        raise


class StudyFailed(AgeclsError):
    """The study stopped short: too many trials failed, or it holds fewer finished trials than it wants."""


class StudyRunner:
    """Runs one study for the Hydra sweeper `hydra/sweeper=agecls_optuna` (hydra_plugins.agecls_sweeper);
    settings are the `optuna` block of the composed train config."""

    def __init__(self, config: DictConfig, hydra_context: HydraContext) -> None:
        self.config, self.hydra_context = config, hydra_context

    def sweep(self, arguments: list[str]) -> Any:
        """Run the study to optuna.n_trials finished trials, then its follow-ups. UsageError before the
        study opens for a setting that cannot work; KeyboardInterrupt (trials re-queued) on Ctrl-C/SIGTERM."""
        import optuna

        assert self.config is not None and self.hydra_context is not None
        # registering the best model downloads its artifacts: no progress bar between the status lines
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            executor = trial_executor(self.config)
        except SweepError as exc:  # e.g. optuna.trial_start: one line, before anything starts
            raise UsageError(str(exc)) from None
        executor.prepare()  # a trial template imports while the study is planned and opened
        plan, study = self._plan(arguments)
        run = self._open(plan, study, executor)
        state = LoopState()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._run_trials(run, state)
        except KeyboardInterrupt:
            self._interrupted(run, state)
            raise
        except StoreUnavailable as exc:  # past optuna.storage_patience_s: one line, the study resumable
            raise StoreUnavailable(stop_for_outage(state.running, run.tracker, exc)) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        self._finish(run, state)
        return []

    # -- the steps of a sweep -------------------------------------------------------------------------------
    def _plan(self, arguments: list[str]) -> tuple[Plan, Any]:
        """(the plan, the study opened): a setting that cannot work stops here as a one-line UsageError,
        before the study opens."""
        cfg, ocfg = self.config, self.config.optuna
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        try:
            check_settings(ocfg)
            trials_per_device(ocfg)  # a bad value: one line before the study opens, not a traceback after
            job_slots(ocfg)
            params = present_params(cfg)
            left_out = [k for k in ocfg.params if k not in params]
            space, fixed = search_space(params, arguments, parser)
            if not space and not (cfg.get("bins") or {}).get("search"):
                raise SweepError(
                    "the search space is empty: set optuna.params (a sweeps/optuna_*.yaml file), sweep a "
                    "key, or search bin edges (bins=search)"
                )
            check_several_objectives(cfg)
            check_followups(cfg)
            names, directions = study_objectives(cfg)
            loader = self.hydra_context.config_loader
            drawable = check_space(space, self._composer(fixed), partial(is_group, loader), _validate_trial)
            plan = Plan(drawable, fixed, names, directions, warm_starts(ocfg, space), left_out)
            sampler = study_sampler(ocfg.sampler, space)
            _cap_to_grid(ocfg, sampler)
            # an existing study with other objectives is refused here, before anything is asked of it
            # the one objective is named too: optuna-dashboard labels its charts with it, not "Objective 0"
            metrics = names or [str(cfg.objective.metric)]
            study = open_study(ocfg, directions=directions, metric_names=metrics, sampler=sampler)
        except (SweepError, UsageError) as exc:
            raise UsageError(str(exc)) from None
        return plan, study

    def _composer(self, fixed: list[str]):
        """compose(lines): the config a trial with these overrides (beside the sweep's own) would run."""
        from omegaconf import open_dict

        loader = self.hydra_context.config_loader

        def compose(lines: list[str]) -> DictConfig:
            cfg = loader.load_sweep_config(self.config, [*fixed, *lines])
            with open_dict(cfg):
                del cfg["hydra"]
            return cfg

        return compose

    def _open(self, plan: Plan, study, executor: TrialExecutor) -> Sweep:
        """Warm starts enqueued, the sweep folder and its multirun.yaml written, the executor and the study's
        MLflow run started."""
        from agecls.sweep.study_tracking import StudyRun

        cfg, ocfg = self.config, self.config.optuna
        if plan.left_out:
            shown = ", ".join(plan.left_out)
            log.info("optuna.params: %s left out (optuna.optional_params not in this config)", shown)
        for line in plan.drawable.describe():
            log.info("optuna.params: %s", line)
        enqueue_warm_starts(study, plan.warm)
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")
        slots = executor.slots()
        tracker = StudyRun.open(cfg, study.study_name) if cfg.tracking.enabled else None
        url, names, directions = str(ocfg.storage), plan.names, plan.directions
        log.info(
            "study %r (%s, %s): %d trials wanted, %d %s slot(s), space %s",
            study.study_name,
            ocfg.storage,
            ", ".join(f"{n} {d}" for n, d in zip(names, directions, strict=True)) if names else directions[0],
            int(ocfg.n_trials),
            len(slots),
            executor.kind,
            ", ".join(plan.drawable.space),
        )
        return Sweep(
            study=study,
            plan=plan,
            sweep_dir=sweep_dir,
            executor=executor,
            slots=slots,
            tracker=tracker,
            reap=Reaper(study, url, int(ocfg.retries), int(ocfg.grace_period), tracker),
            url=url,
            target=int(ocfg.n_trials),
            max_failures=int(ocfg.max_failures),
            retries=int(ocfg.retries),
            heartbeat_interval=int(ocfg.heartbeat_interval),
        )

    def _run_trials(self, run: Sweep, state: LoopState) -> None:
        """Keep a trial in every free slot until the study holds optuna.n_trials finished trials, or more
        than optuna.max_failures failed and those running have ended."""
        from optuna.trial import TrialState

        from agecls.tracking import end_dead_runs

        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        run.reap(state.running)  # before asking: a crashed run's trials are re-queued, not counted as running
        # then the other runs of this host whose process died (after the reaper, which ends its trials' runs
        # with the trial's own reason): once here rather than in every trial
        end_dead_runs(self.config.tracking)
        run.executor.ready()  # the first trial is asked for when it can start
        state.last_check = time.monotonic()
        while True:
            slot = _free_slot(run, state)
            may_start = slot is not None and not state.stopping
            if may_start and _counted(run.study, *finished, TrialState.RUNNING) < run.target:
                self._start_trial(run, state, slot)
                continue
            if not state.running and (state.stopping or _counted(run.study, *finished) >= run.target):
                return
            ended = [item for item in state.running.values() if item.handle.done()]
            for item in ended:
                del state.running[item.number]
                self._trial_ended(run, state, item)
            if ended:
                continue  # its slot takes the next trial at once
            self._tend(run, state)
            run.executor.wait_any(0.5)  # wakes when a trial ends

    def _start_trial(self, run: Sweep, state: LoopState, slot: int) -> None:
        """Ask the study for a trial and start it in `slot`."""
        study = run.study
        trial = study.ask(run.plan.drawable.always)
        run.plan.drawable.draw_conditional(trial)
        if surplus(study, trial.number, run.target, run.url):
            return  # another worker asked at the same moment and filled the study first
        record_heartbeat(study, trial_id(trial))
        # who asked: a sweeper on this host that finds it RUNNING with this process gone (and no trial
        # process recorded yet) fails and re-queues it at once
        trial.set_user_attr("sweeper", process_record())
        env = dict(run.slots[slot])
        device = device_label(env)
        if device is not None:  # a Slurm job's device is the job's to record
            trial.set_user_attr("device", device)
        if trial.user_attrs.get("run_alone"):
            env[RUN_ALONE_ENV] = "1"
        run_dir = run.sweep_dir / f"trial-{trial.number:04d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = self._command(run.plan.fixed, trial.params, trial.number, run.parent, run_dir)
        name = f"{study.study_name}-trial-{trial.number:04d}"
        handle = run.executor.start(cmd, env, run_dir / "process.log", name)
        state.running[trial.number] = Running(handle, trial.number, trial_id(trial), trial.params, slot)
        run.console.clear()
        log.info(
            "trial %d started (slot %d): %s; log %s",
            trial.number,
            slot,
            _params_text(trial.params),
            run_dir / "process.log",
        )
        self._show(run, event=True)

    def _command(
        self, fixed: list[str], params: dict[str, Any], number: int, parent: str | None, run_dir: Path
    ):
        cfg = self.config
        cmd = [sys.executable, "-m", "agecls.cli.train", "--config-name", str(cfg.hydra.job.config_name)]
        # a trial's output goes to a file, where a progress bar is noise; first, so the command line can
        # still turn it on
        cmd.append("trainer.enable_progress_bar=false")
        cmd += _search_path(cfg)  # a sweep file in the user's own folder (--config-dir) is found again
        cmd += [line for line in fixed if not line.startswith("hydra.sweep")]
        cmd += [f"{k}={format_value(v)}" for k, v in params.items()]
        # a run, even where a sweep file makes its command a sweep (`hydra: mode: MULTIRUN`)
        cmd += [f"optuna.trial={number}", f"hydra.run.dir={run_dir}", "hydra.mode=RUN"]
        if parent:
            cmd.append(f"optuna.parent_run_id={parent}")
        return cmd

    def _trial_ended(self, run: Sweep, state: LoopState, item: Running) -> None:
        """Count and log a trial whose process or job has ended (one that died without telling the study is
        failed and re-queued first); too many failures stop new trials."""
        from optuna.trial import TrialState

        run.console.clear()
        frozen = settle_ended(run.study, item.number, run.retries, run.url, run.tracker)
        trial_log = run.sweep_dir / f"trial-{item.number:04d}" / "process.log"
        attrs = frozen.user_attrs
        reason = attrs.get("error") or attrs.get("failed_because") or "no reason recorded"
        failed = frozen.state == TrialState.FAIL
        # out of GPU memory beside other trials: not the trial's fault, it runs again alone
        alone = failed and requeue_alone(run.study, frozen, _shares_device(run.slots, item.slot))
        if failed and not alone:
            state.failures += 1
            state.stopping = state.stopping or state.failures > run.max_failures
            state.reasons[reason] += 1
            state.failed_logs.setdefault(reason, trial_log)
        value = _values_text(frozen.values, run.plan.names)
        seconds = time.monotonic() - item.started
        log.info("trial %d %s%s after %.0f s", item.number, frozen.state.name, value, seconds)
        if alone:
            log.warning(
                "trial %d ran out of GPU memory beside other trials; re-queued to run alone", item.number
            )
        elif failed:
            log.warning("trial %d failed: %s (see %s)", item.number, reason, trial_log)
        self._show(run, event=True)
        state.last_show = time.monotonic()

    def _tend(self, run: Sweep, state: LoopState) -> None:
        """The loop's periodic work: heartbeats of its own trials, other workers' dead trials reaped, the
        status shown, and what the study waits for said when nothing of this sweeper's runs."""
        now = time.monotonic()
        if now - state.last_beat > max(1, run.heartbeat_interval // 2):
            for item in state.running.values():
                record_heartbeat(run.study, item.trial_id)
            state.last_beat = now
        # dead trials of this host are seen at once, stale ones of other hosts after grace_period anyway
        if now - state.last_check > max(1, min(5, run.heartbeat_interval // 2)):
            run.reap(state.running)  # trials of other workers whose process or machine died
            state.last_check = now
        if now - state.last_show > 2:  # intermediate values arrive once an epoch: no need to poll faster
            self._show(run)
            state.last_show = now
        if not state.running and not state.stopping and now - state.last_wait_log > 60:
            run.console.clear()
            run.reap.log_waiting(run.target)  # the study is short only by trials running elsewhere
            state.last_wait_log = now

    def _show(self, run: Sweep, event: bool = False) -> None:
        """The study's status line and its running trials on the console."""
        trials, now = run.study.get_trials(deepcopy=False), time.time()
        views = [trial_view(t, now) for t in trials]
        names, directions = run.plan.names, run.plan.directions
        line = status_line(
            views,
            run.target,
            len(run.slots),
            time.monotonic() - run.started,
            directions[0] == "maximize",
            names=names,
            directions=directions,
        )
        running = running_lines(views, reports_epochs=names is None)
        run.console.show(f"study {run.study.study_name}: {line}", running, event=event)

    def _interrupted(self, run: Sweep, state: LoopState) -> None:
        """After Ctrl-C or SIGTERM: running trials stopped, failed and re-queued; the study's run KILLED."""
        run.console.clear()
        requeue_interrupted(run.study, state.running, run.url)
        if run.tracker:
            run.tracker.close(run.study, "KILLED", time.monotonic() - run.started)
        log.warning(
            "interrupted: %d running trial(s) re-queued; run the same command again to resume",
            len(state.running),
        )

    def _finish(self, run: Sweep, state: LoopState) -> None:
        """Once the trials' loop ends: the follow-ups (when the study holds its n_trials), the study's run
        closed, trials.csv and best.txt; StudyFailed when too many trials failed or the study is short."""
        from optuna.trial import TrialState

        run.console.keep()  # the final state stays on the terminal above what follows
        done = _counted(run.study, TrialState.COMPLETE, TrialState.PRUNED)
        # not expected: the loop ends with the study complete
        short = not state.stopping and done < run.target
        followup: dict[str, Any] = {}
        if not state.stopping and not short:  # the study holds its n_trials: late bloomers, then re-seeds
            followup = followups(run.study, self.config, run.executor, run.slots, run.sweep_dir, run.tracker)
            if followup:
                run.study = fresh(run.study)  # what the follow-ups wrote on finished trials
        if run.tracker:
            status = "FAILED" if state.stopping or short else "FINISHED"
            run.tracker.close(run.study, status, time.monotonic() - run.started, followup=followup)
        write_summary(run.study, run.sweep_dir, followup)
        study, target = run.study, run.target
        if state.stopping:
            raise StudyFailed(_failed_text(state, run.max_failures))
        if short:
            raise StudyFailed(
                f"study {study.study_name!r} holds {done} finished trials of optuna.n_trials={target}; "
                "run the same command again to go on"
            )


def _failed_text(state: LoopState, max_failures: int) -> str:
    """One line: how many trials failed, the most common reason and the log of one trial it failed."""
    reason, count = state.reasons.most_common(1)[0]
    return (
        f"the study stopped: {state.failures} trials failed (more than optuna.max_failures={max_failures}); "
        f"most common reason ({count} of {state.failures}): {reason}; log: {state.failed_logs[reason]}"
    )


def _slot_device(slots: list[dict[str, str]], slot: int) -> str:
    """The device a slot's trial runs on, as scheduling groups slots: its GPU ("cuda:1"); a CPU slot or a
    Slurm job slot (whose GPU is the job's) counts as a device of its own."""
    device = device_label(slots[slot])
    return device if device not in (None, "cpu") else f"slot {slot}"


def _shares_device(slots: list[dict[str, str]], slot: int) -> bool:
    """Whether other slots run trials on the GPU of `slot` (optuna.trials_per_device > 1)."""
    device = _slot_device(slots, slot)
    return sum(_slot_device(slots, s) == device for s in range(len(slots))) > 1


def _free_slot(run: Sweep, state: LoopState) -> int | None:
    """The slot the next trial starts in, None when none may start now: a free one on the GPU with the
    fewest trials running. A trial re-queued to run alone (`run_alone`: it ran out of GPU memory beside
    others) starts only on a GPU with nothing running, and nothing else starts beside it while it runs;
    while the study's next queued trial must run alone and no GPU is idle, no trial starts (they'd keep
    it waiting)."""
    from optuna.trial import TrialState

    taken = {item.slot: item.number for item in state.running.values()}
    free = [s for s in range(len(run.slots)) if s not in taken]
    if not free or not any(_shares_device(run.slots, s) for s in free):
        return free[0] if free else None
    trials = run.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    alone = {t.number for t in trials if t.user_attrs.get("run_alone")}
    # the trial study.ask() takes next: the oldest waiting one
    waiting = [t.number for t in trials if t.state == TrialState.WAITING]
    next_alone = bool(waiting) and min(waiting) in alone
    load = Counter(_slot_device(run.slots, s) for s in taken)
    closed = {_slot_device(run.slots, s) for s, number in taken.items() if number in alone}
    free = [s for s in free if _slot_device(run.slots, s) not in closed]
    if next_alone:
        free = [s for s in free if load[_slot_device(run.slots, s)] == 0]
    return min(free, key=lambda s: (load[_slot_device(run.slots, s)], s), default=None)


def _search_path(cfg: DictConfig) -> list[str]:
    """`hydra.searchpath=[...]` naming the config folders the command added (--config-dir, a searchpath),
    for a trial to compose the same files; [] when it added none."""
    sources = OmegaConf.select(cfg, "hydra.runtime.config_sources") or []
    added = [f"'file://{s.path}'" for s in sources if s.schema == "file" and s.provider != "main"]
    return [f"hydra.searchpath=[{','.join(added)}]"] if added else []


def _cap_to_grid(ocfg: DictConfig, sampler) -> None:
    """optuna.n_trials at most a grid sampler's number of points (each runs once)."""
    size = grid_size(sampler)
    if size is not None and size < int(ocfg.n_trials):
        log.info("optuna.n_trials=%d capped at the grid's %d points", int(ocfg.n_trials), size)
        ocfg.n_trials = size


def _validate_trial(cfg: DictConfig) -> None:
    """What a trial process checks first (bin edges a trial draws may be missing until it draws them)."""
    from agecls.training.validation import validate

    validate(cfg, drawn_later=bool((cfg.get("bins") or {}).get("search")))


def _counted(study, *states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in params.items())


def _values_text(values: list[float] | None, names: list[str] | None) -> str:
    """` value 0.5123` (one objective) or ` values val/macro_f1 0.5123, model/params 12345`; '' for none."""
    if not values:
        return ""
    if names is None or len(values) == 1:
        return f" value {values[0]:.4f}"
    return " values " + ", ".join(f"{n} {objective_value(v)}" for n, v in zip(names, values, strict=True))
