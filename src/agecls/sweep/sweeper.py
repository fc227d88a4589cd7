"""agecls's Hydra sweeper for Optuna studies: asynchronous trials, pruning, resume, MLflow parent run.

Why not hydra-optuna-sweeper: 1.3.0 pins optuna<3 and its sqlite storage fails with SQLAlchemy 2; it runs
trials in blocking batches through the launcher and cannot prune. Here the study lives in an RDB storage,
and each trial is its own `python -m agecls.cli.train` process: it reports every epoch's validation value,
is pruned by the study's pruner, and tells the study its outcome. This process only asks for trials and
keeps `n_jobs` (or one per GPU) of them running, starting the next the moment one ends.

Resume: the study's state is the storage. Re-running the same command continues it: finished trials are
kept; a trial left RUNNING by a dead process is failed and re-queued with the same parameters (marked
`requeued_from`): at once when its recorded process ran on this host and is gone, else once its heartbeat is
stale. `n_trials` counts complete and pruned trials only, so nothing is counted twice, and the sweep ends
only when the study holds them (waiting for trials running elsewhere). Several processes (or machines
sharing a PostgreSQL storage) may run the same command at once: they share one study, and each trial's
sampler is seeded from the trial's number (agecls.sweep.sampler), so no two draw the same parameters.

Where trials run: as child processes of this one (Hydra's default launcher), or as submitit jobs when the
command selects a submitit launcher (`hydra/launcher=slurm` submits each trial as a Slurm job with the
launcher's GPU/CPU/memory/time requests; `hydra/launcher=submitit_local` runs them as local submitit jobs).
Either way a trial is the same `python -m agecls.cli.train ... optuna.trial=N` command; see `trial_executor`.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import gc
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf

from agecls.config import CONFIG_DIR
from agecls.errors import UsageError
from agecls.study import (
    fail_trial,
    find_trial,
    fresh,
    heartbeat_ages,
    open_study,
    process_gone,
    process_record,
    record_heartbeat,
    requeue,
    sqlite_lock,
    trial_id,
)
from agecls.sweep.console import (
    StatusConsole,
    objective_value,
    pareto_front,
    running_lines,
    status_line,
    trial_view,
)
from agecls.sweep.followup import check_followups, run_followups
from agecls.sweep.params import present_params
from agecls.sweep.sampler import study_sampler
from agecls.sweep.settings import SETTINGS
from agecls.sweep.stopping import stop_trials
from agecls.sweep.warm_start import enqueue_warm_starts, warm_starts

log = logging.getLogger("agecls.sweep.sweeper")


class SweepError(ValueError):
    """A search-space entry or study setting that cannot be used."""


def check_settings(ocfg: DictConfig) -> None:
    """SweepError naming a key of the `optuna` block that is not a setting, with the closest valid one.

    The schema (agecls.sweep.settings.OptunaSettings) rejects a misspelled key while the config is composed;
    one added past it with Hydra's `+` (`+optuna.n_trails=8`, which inserts a key regardless of the schema)
    is caught here, before the study starts."""
    for key in ocfg:
        if key in SETTINGS:
            continue
        close = difflib.get_close_matches(str(key), SETTINGS, n=1)
        hint = f"did you mean optuna.{close[0]}? " if close else ""
        valid = ", ".join(SETTINGS)
        raise SweepError(f"optuna.{key}: not a setting of an Optuna study; {hint}valid: {valid}")


# Samplers that raise with several objectives (optuna's `_raise_error_if_multi_objective`).
SINGLE_OBJECTIVE_SAMPLERS = ("CmaEsSampler",)


def study_objectives(cfg: DictConfig) -> tuple[list[str] | None, list[str]]:
    """(objective.metrics or None, the directions): several objectives when objective.metrics lists two or
    more, else the one objective.metric in objective.mode's direction."""
    metrics = [str(m) for m in (cfg.objective.get("metrics") or [])]
    if len(metrics) > 1:
        return metrics, [str(d) for d in cfg.objective.directions]
    return None, ["maximize" if str(cfg.objective.mode) == "max" else "minimize"]


def check_several_objectives(cfg: DictConfig) -> None:
    """SweepError when a study of several objectives is given a pruner (optuna's work with one objective)
    or a sampler that works with one objective only; nothing to check for one objective."""
    names, _ = study_objectives(cfg)
    if names is None:
        return
    choices = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    pruner = str(cfg.optuna.pruner.get("_target_", ""))
    if pruner.rsplit(".", 1)[-1] != "NopPruner":
        chosen = choices.get("optuna/pruner")
        # a `_target_` set over the `none` file is named as it was given
        where = (
            f"optuna/pruner={chosen}" if chosen not in (None, "none") else f"optuna.pruner._target_={pruner}"
        )
        raise SweepError(
            f"{where}: optuna's pruners work with one objective, and objective.metrics has {len(names)}; "
            "valid: optuna/pruner=none (trials stop by early stopping: callbacks.early_stopping.*)"
        )
    sampler = str(cfg.optuna.sampler.get("_target_", ""))
    if sampler.rsplit(".", 1)[-1] in SINGLE_OBJECTIVE_SAMPLERS:
        files = sorted((CONFIG_DIR / "optuna" / "sampler").glob("*.yaml"))
        targets = {path.stem: str(OmegaConf.load(path).get("_target_", "")) for path in files}
        valid = [name for name, t in targets.items() if t.rsplit(".", 1)[-1] not in SINGLE_OBJECTIVE_SAMPLERS]
        raise SweepError(
            f"optuna.sampler._target_={sampler}: works with one objective, and objective.metrics has "
            f"{len(names)}; valid: optuna/sampler={', '.join(valid)}"
        )


def distribution(override: Override):
    """Optuna distribution for one Hydra sweep override (choice, range, interval, tag(log, interval))."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweepError(f"{key}: unsupported sweep {override.input_line!r}; use choice(), range(), interval()")


def search_space(
    params: dict[str, str], arguments: list[str], parser: OverridesParser
) -> tuple[dict[str, Any], list[str]]:
    """(distributions, fixed overrides): optuna.params from config, then the command line (which wins)."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    for origin, batch in (("optuna.params", lines), ("command line", list(arguments))):
        for override in parser.parse_overrides(batch):
            key = override.get_key_element()
            if override.is_sweep_override():
                try:
                    space[key] = distribution(override)
                except (ValueError, TypeError) as exc:
                    raise SweepError(f"{origin}: {override.input_line}: {exc}") from None
                fixed.pop(key, None)
            else:
                space.pop(key, None)
                fixed[key] = override.input_line
    return space, list(fixed.values())


def format_value(value: Any) -> str:
    """A sampled value as Hydra override text."""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def followups(study, cfg: DictConfig, executor, slots, sweep_dir: Path, tracker) -> dict[str, Any]:
    """run_followups with the study's MLflow run (`tracker`, None when untracked) ended KILLED when they are
    interrupted, as the trials' loop does: the study's choice waits for the same command to run again."""
    try:
        return run_followups(study, cfg, executor, slots, sweep_dir, tracker.run_id if tracker else None)
    except (KeyboardInterrupt, SystemExit):
        if tracker:
            tracker.client.set_terminated(tracker.run_id, status="KILLED")
        raise


# -- where trials run -----------------------------------------------------------------------------------
class TrialHandle(Protocol):
    """One started trial: a local process or a submitit job."""

    def done(self) -> bool: ...

    def signal(self, sig: int) -> None: ...

    def wait(self, timeout: float) -> None: ...


class TrialExecutor(Protocol):
    """Starts trial commands; `slots()` is one environment per trial that may run at once."""

    kind: str

    def slots(self) -> list[dict[str, str]]: ...

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, name: str) -> TrialHandle: ...


@dataclass
class ProcessHandle:
    process: subprocess.Popen

    def done(self) -> bool:
        return self.process.poll() is not None

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=max(0.1, timeout))


class SubprocessExecutor:
    """Trials as child processes of the sweeper: `optuna.n_jobs` on CPU, or one per GPU (`optuna.devices`)."""

    kind = "subprocess"

    def __init__(self, ocfg: DictConfig) -> None:
        self.ocfg = ocfg

    def slots(self) -> list[dict[str, str]]:
        """One environment per concurrent trial: a GPU each when CUDA is there, else CPU threads shared."""
        devices = self.ocfg.get("devices")
        gpus: list[str] = []
        if devices == "auto":
            try:
                import torch

                gpus = [str(i) for i in range(torch.cuda.device_count())]
            except ImportError:  # pragma: no cover - torch is a dependency
                gpus = []
        elif devices is not None:
            gpus = [str(d) for d in devices]
        if gpus:
            return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
        n_jobs = _n_jobs(self.ocfg)
        threads = str(max(1, (os.cpu_count() or 1) // n_jobs))
        return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads} for _ in range(n_jobs)]

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, name: str) -> ProcessHandle:
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        return ProcessHandle(proc)


@dataclass
class JobHandle:
    job: Any  # submitit.Job
    cancelled: bool = False
    # A job that ends without writing its result (killed, lost node, time limit) is seen only through the
    # cluster's accounting (sacct), which submitit polls at most every 10 minutes on its own: force a poll
    # (one sacct call for every job) at most this often.
    force_every_s: ClassVar[float] = 60.0
    _last_forced: ClassVar[float] = 0.0

    def done(self) -> bool:
        now = time.monotonic()
        force = now - JobHandle._last_forced > self.force_every_s
        if force:
            JobHandle._last_forced = now
        try:
            return bool(self.job.done(force_check=force))
        except Exception as exc:  # noqa: BLE001 - a flaky sacct must not stop the study
            log.warning("job %s: state unknown (%s); still waiting", self.job.job_id, exc)
            return False

    def signal(self, sig: int) -> None:
        """Cancel the job (scancel on Slurm; SIGINT to submitit's local controller). A local job still alive
        at a later call gets `sig` itself: a controller started with SIGINT ignored (a background job of a
        non-interactive shell) passes SIGTERM on to its task, and SIGKILL ends it."""
        if self.done():
            return
        if not self.cancelled:
            self.job.cancel(check=False)
            self.cancelled = True
            return
        process = getattr(self.job, "_process", None)  # submitit's LocalJob: the controller process
        if process is not None and process.poll() is None:
            process.send_signal(sig)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.done() and time.monotonic() < deadline:
            time.sleep(0.25)


def submitit_parameters(launcher: dict[str, Any]) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(cluster, folder, executor init kwargs, update_parameters kwargs) from a `hydra.launcher` block of
    hydra-submitit-launcher (submitit_slurm/submitit_local, or agecls's `slurm`), mapped as that plugin
    maps them: its shared keys keep their names, cluster-specific ones get the cluster's prefix."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    target = str(launcher.get("_target_", ""))
    if target.endswith(".SlurmLauncher"):
        cluster = "slurm"
    elif target.endswith(".LocalLauncher"):
        cluster = "local"
    else:
        raise SweepError(f"hydra.launcher._target_={target!r} is not a submitit launcher")
    shared = set(BaseQueueConf.__dataclass_fields__)
    folder = str(launcher["submitit_folder"])
    init = {}
    if "max_num_timeout" in launcher:
        init[f"{cluster}_max_num_timeout"] = launcher["max_num_timeout"]
    params = {
        (key if key in shared else f"{cluster}_{key}"): value
        for key, value in launcher.items()
        if key not in {"_target_", "submitit_folder", "max_num_timeout", "array_parallelism"}
    }
    return cluster, folder, init, params


class SubmititExecutor:
    """Trials as submitit jobs (Slurm, or submitit's local executor): `optuna.n_jobs` jobs submitted at once,
    each running the trial command through `run_trial_job`; the job's resources come from `hydra.launcher`."""

    def __init__(self, launcher: dict[str, Any], ocfg: DictConfig) -> None:
        import submitit

        self.kind, folder, init, self.params = submitit_parameters(launcher)
        self.folder = folder
        self.executor = submitit.AutoExecutor(folder=folder, cluster=self.kind, **init)
        self.executor.update_parameters(**self.params)
        self.n_jobs = _n_jobs(ocfg)

    def slots(self) -> list[dict[str, str]]:
        """GPUs are the job's own (Slurm sets CUDA_VISIBLE_DEVICES); CPU threads follow cpus_per_task."""
        cpus = self.params.get("cpus_per_task")
        return [{"OMP_NUM_THREADS": str(cpus)} if cpus else {} for _ in range(self.n_jobs)]

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, name: str) -> JobHandle:
        self.executor.update_parameters(name=name)
        job = self.executor.submit(run_trial_job, cmd, env, str(log_path), os.getcwd())
        log.info("%s: submitted as %s job %s", name, self.kind, job.job_id)
        handle = JobHandle(job)
        if not _JOB_HANDLES:
            atexit.register(_release_jobs)
        _JOB_HANDLES.append(handle)
        return handle


_JOB_HANDLES: list[JobHandle] = []


def _release_jobs() -> None:
    """Let submitit's job objects be finalised while the interpreter is intact (their __del__ fails
    noisily when it runs during shutdown)."""
    for handle in _JOB_HANDLES:
        handle.job = None
    _JOB_HANDLES.clear()
    gc.collect()


def trial_executor(cfg: DictConfig) -> TrialExecutor:
    """Where this study's trials run: submitit jobs when `hydra.launcher` is a submitit launcher
    (`hydra/launcher=slurm|submitit_slurm|submitit_local`), else child processes of the sweeper."""
    launcher = cfg.get("hydra", {}).get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if "hydra_submitit_launcher" in target:
        resolved = OmegaConf.to_container(launcher, resolve=True)
        assert isinstance(resolved, dict)
        return SubmititExecutor(resolved, cfg.optuna)
    return SubprocessExecutor(cfg.optuna)


def _n_jobs(ocfg: DictConfig) -> int:
    n_jobs = int(ocfg.n_jobs)
    if n_jobs < 1:
        raise SweepError(f"optuna.n_jobs={n_jobs}; must be >= 1")
    return n_jobs


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: SIGTERM this process when its parent dies (a cancelled job's wrapper is SIGKILLed)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_trial_job(cmd: list[str], env: dict[str, str], log_path: str, cwd: str) -> int:
    """Body of a submitit job: run one trial command, its output in `log_path`; returns its exit code.

    SIGINT/SIGTERM (a cancelled job) are passed on to the trial, which then stops as an interrupted run;
    if this wrapper is killed outright, the trial gets SIGTERM (Linux) rather than running on orphaned."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def forward(signum, frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"trial command exited with {code}; see {log_path}")
    return code


@dataclass
class Running:
    handle: TrialHandle
    number: int
    trial_id: int
    params: dict[str, Any]
    slot: int
    started: float = field(default_factory=time.monotonic)


class StudyRunner:
    """Runs one study for the Hydra sweeper `hydra/sweeper=agecls_optuna` (hydra_plugins.agecls_sweeper);
    settings are the `optuna` block of the composed train config."""

    def __init__(self, config: DictConfig, hydra_context: HydraContext) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _command(
        self, fixed: list[str], params: dict[str, Any], number: int, parent: str | None, run_dir: Path
    ):
        cfg = self.config
        cmd = [sys.executable, "-m", "agecls.cli.train", "--config-name", str(cfg.hydra.job.config_name)]
        # a trial's output goes to a file, where a progress bar is noise; first, so the command line can
        # still turn it on
        cmd.append("trainer.enable_progress_bar=false")
        cmd += [line for line in fixed if not line.startswith("hydra.sweep")]
        cmd += [f"{k}={format_value(v)}" for k, v in params.items()]
        cmd += [f"optuna.trial={number}", f"hydra.run.dir={run_dir}"]
        if parent:
            cmd.append(f"optuna.parent_run_id={parent}")
        return cmd

    # -- main loop --------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        from agecls.sweep.study_tracking import StudyRun

        assert self.config is not None and self.hydra_context is not None
        cfg, ocfg = self.config, self.config.optuna
        # registering the best model downloads its artifacts: no progress bar between the status lines
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        try:  # a study setting that cannot work stops here, as one line, before the study opens
            check_settings(ocfg)
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
            first = warm_starts(ocfg, space)
            # an existing study with other objectives is refused here, before anything is asked of it
            study = open_study(
                ocfg, directions=directions, metric_names=names, sampler=study_sampler(ocfg.sampler)
            )
        except (SweepError, UsageError) as exc:
            print(f"agecls-train: error: {exc}", file=sys.stderr)
            sys.exit(2)
        url = str(ocfg.storage)
        if left_out:
            log.info(
                "optuna.params: %s left out (optuna.optional_params not in this config)", ", ".join(left_out)
            )
        enqueue_warm_starts(study, first)
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")
        executor = trial_executor(cfg)
        slots = executor.slots()
        target, max_failures = int(ocfg.n_trials), int(ocfg.max_failures)
        tracker = StudyRun.open(cfg, study.study_name) if cfg.tracking.enabled else None
        parent = tracker.run_id if tracker else None
        log.info(
            "study %r (%s, %s): %d trials wanted, %d %s slot(s), space %s",
            study.study_name,
            ocfg.storage,
            ", ".join(f"{n} {d}" for n, d in zip(names, directions, strict=True)) if names else directions[0],
            target,
            len(slots),
            executor.kind,
            ", ".join(space),
        )
        running: dict[int, Running] = {}
        failures, stopping, last_beat, last_wait_log = 0, False, 0.0, 0.0
        # dead trials of this host are seen at once, stale ones of other hosts after grace_period anyway
        check_every = max(1, min(5, int(ocfg.heartbeat_interval) // 2))
        started = time.monotonic()
        console, last_show = StatusConsole(), 0.0

        def show(event: bool = False) -> None:
            trials, now = study.get_trials(deepcopy=False), time.time()
            views = [trial_view(t, now) for t in trials]
            line = status_line(
                views,
                target,
                len(slots),
                time.monotonic() - started,
                directions[0] == "maximize",
                names=names,
                directions=directions,
            )
            running = running_lines(views, reports_epochs=names is None)
            console.show(f"study {study.study_name}: {line}", running, event=event)

        def counted(*states: TrialState) -> int:
            return len(study.get_trials(deepcopy=False, states=states))

        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        reap = Reaper(study, url, int(ocfg.retries), int(ocfg.grace_period), tracker)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            reap(running)  # before asking: a crashed run's trials are re-queued, not counted as running
            last_check = time.monotonic()
            while True:
                free = [s for s in range(len(slots)) if s not in {r.slot for r in running.values()}]
                if free and not stopping and counted(*finished, TrialState.RUNNING) < target:
                    trial = study.ask(space)
                    if _surplus(study, trial.number, target, url):
                        continue  # another worker asked at the same moment and filled the study first
                    record_heartbeat(study, trial_id(trial))
                    # who asked: a sweeper on this host that finds it RUNNING with this process gone (and
                    # no trial process recorded yet) fails and re-queues it at once
                    trial.set_user_attr("sweeper", process_record())
                    run_dir = sweep_dir / f"trial-{trial.number:04d}"
                    run_dir.mkdir(parents=True, exist_ok=True)
                    cmd = self._command(fixed, trial.params, trial.number, parent, run_dir)
                    name = f"{study.study_name}-trial-{trial.number:04d}"
                    handle = executor.start(cmd, slots[free[0]], run_dir / "process.log", name)
                    item = Running(handle, trial.number, trial_id(trial), trial.params, free[0])
                    running[trial.number] = item
                    console.clear()
                    log.info(
                        "trial %d started (slot %d): %s; log %s",
                        trial.number,
                        free[0],
                        _show(trial.params),
                        run_dir / "process.log",
                    )
                    show(event=True)
                    continue
                if not running and (stopping or counted(*finished) >= target):
                    break
                for number, item in list(running.items()):
                    if not item.handle.done():
                        continue
                    del running[number]
                    console.clear()
                    frozen = _current(study, number)
                    if frozen.state == TrialState.RUNNING:
                        # died without telling (killed, out of memory, a lost node or cancelled job):
                        # failed and re-queued as a stale trial is (optuna.retries)
                        why = "its process or job ended without telling the study (killed?)"
                        _fail_and_requeue(study, frozen, int(ocfg.retries), reason=why, url=url)
                        frozen = _current(study, number)
                        if tracker:
                            tracker.end_orphan_runs(study)  # its MLflow run could not end itself
                    if frozen.state == TrialState.FAIL:
                        failures += 1
                        stopping = stopping or failures > max_failures
                    value = _values_text(frozen.values, names)
                    seconds = time.monotonic() - item.started
                    log.info("trial %d %s%s after %.0f s", number, frozen.state.name, value, seconds)
                    if frozen.state == TrialState.FAIL:
                        log.warning(
                            "trial %d failed: %s (see %s)",
                            number,
                            frozen.user_attrs.get("error") or frozen.user_attrs.get("failed_because"),
                            sweep_dir / f"trial-{number:04d}" / "process.log",
                        )
                    show(event=True)
                    last_show = time.monotonic()
                now = time.monotonic()
                if now - last_beat > max(1, int(ocfg.heartbeat_interval) // 2):
                    for item in running.values():
                        record_heartbeat(study, item.trial_id)
                    last_beat = now
                if now - last_check > check_every:
                    reap(running)  # trials of other workers whose process or machine died
                    last_check = now
                if now - last_show > 2:  # intermediate values arrive once an epoch: no need to poll faster
                    show()
                    last_show = now
                if not running and not stopping and now - last_wait_log > 60:
                    console.clear()
                    reap.log_waiting(target)  # the study is short only by trials running elsewhere
                    last_wait_log = now
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.clear()
            self._interrupt(study, running, url)
            if tracker:
                tracker.close(study, "KILLED", time.monotonic() - started)
            log.warning(
                "interrupted: %d running trial(s) re-queued; run the same command again to resume",
                len(running),
            )
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        console.keep()  # the final state stays on the terminal above what follows
        done = counted(*finished)
        short = not stopping and done < target  # not expected: the loop ends with the study complete
        followup: dict[str, Any] = {}
        if not stopping and not short:  # the study holds its n_trials: late bloomers, then re-seeds
            followup = followups(study, cfg, executor, slots, sweep_dir, tracker)
            if followup:
                study = fresh(study)  # what the follow-ups wrote on finished trials
        if tracker:
            status = "FAILED" if stopping or short else "FINISHED"
            tracker.close(study, status, time.monotonic() - started, followup=followup)
        _write_summary(study, sweep_dir, followup)
        if stopping:
            raise SweepError(
                f"{failures} trials failed (optuna.max_failures={max_failures}); see {sweep_dir}"
            )
        if short:
            raise SweepError(
                f"study {study.study_name!r} holds {done} finished trials of optuna.n_trials={target}; "
                "run the same command again to go on"
            )
        return []

    def _interrupt(self, study, running: dict[int, Running], url: str) -> None:
        """Stop running trials, fail them in the study and re-queue their parameters."""
        stop_trials([item.handle for item in running.values()])
        for item in running.values():
            failed = fail_trial(study, item.number, "interrupted: the sweeper was stopped", url)
            if failed is not None:
                # failed.params also holds what the trial drew itself (bins.cut1.. of bins=search)
                requeue(study, failed, None, "interrupted: the sweeper was stopped")


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
            if reason and _fail_and_requeue(self.study, frozen, self.retries, reason=reason, url=self.url):
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


def _surplus(study, number: int, target: int, url: str) -> bool:
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


def _fail_and_requeue(
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


def _current(study, number: int):
    """Trial `number` (one this sweeper asked for, so it exists) as the storage holds it now."""
    frozen = find_trial(study, number)
    if frozen is None:  # pragma: no cover - the study lost a trial this sweeper asked for
        raise SweepError(f"study {study.study_name!r} has no trial {number}")
    return frozen


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _show(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in params.items())


def _values_text(values: list[float] | None, names: list[str] | None) -> str:
    """` value 0.5123` (one objective) or ` values val/macro_f1 0.5123, model/params 12345`; '' for none."""
    if not values:
        return ""
    if names is None or len(values) == 1:
        return f" value {values[0]:.4f}"
    return " values " + ", ".join(f"{n} {objective_value(v)}" for n, v in zip(names, values, strict=True))


def _write_summary(study, sweep_dir: Path, followup: dict[str, Any] | None = None) -> None:
    """The study's trials as CSV (one `values_<objective>` column per objective when there are several),
    and the best trial (several objectives: the Pareto front's trials, each with its objectives; re-seeded
    top trials: the one chosen by its mean over seeds), in the sweep folder."""
    frame = study.trials_dataframe()
    frame.to_csv(sweep_dir / "trials.csv", index=False)
    if len(study.directions) > 1:
        _write_front(study, sweep_dir)
        return
    try:
        best = study.best_trial
    except ValueError:
        log.warning("no trial of study %r completed", study.study_name)
        return
    chosen = (followup or {}).get("chosen_trial")
    if chosen is not None and find_trial(study, int(chosen)) is not None:
        best = find_trial(study, int(chosen))
        mean, std = best.user_attrs.get("seed_mean"), best.user_attrs.get("seed_std")
        seeds = "" if mean is None else f", mean over seeds {mean:.4f} ± {std:.4f}"
        pick = (followup or {}).get("best_seed") or {}
        text = (
            f"chosen trial {best.number}: value {best.value:.4f}{seeds} (chosen by its mean over seeds); "
            f"its best seed on validation: {pick.get('seed')} ({pick.get('value')}, {pick.get('run_dir')})\n"
        )
    else:
        text = f"best trial {best.number}: value {best.value:.4f}\n"
    text += "".join(f"  {k}={format_value(v)}\n" for k, v in best.params.items())
    (sweep_dir / "best.txt").write_text(text)
    log.info("%s", text.rstrip())


def _write_front(study, sweep_dir: Path) -> None:
    """best.txt of a study with several objectives: its Pareto front, by trial number, each trial with its
    objectives and parameters."""
    from optuna.trial import TrialState

    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    directions = [d.name.lower() for d in study.directions]
    views = [trial_view(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    front = pareto_front(views, directions)
    if not front:
        log.warning("no trial of study %r completed", study.study_name)
        return
    shown = ", ".join(f"{n} ({d})" for n, d in zip(names, directions, strict=True))
    lines = [f"Pareto front: {len(front)} of {len(views)} complete trials; objectives {shown}"]
    for trial in front:
        values = ", ".join(
            f"{n} {objective_value(v)}" for n, v in zip(names, trial.values or (), strict=True)
        )
        lines.append(f"trial {trial.number}: {values}")
        lines += [f"  {k}={format_value(v)}" for k, v in trial.params.items()]
    text = "\n".join(lines) + "\n"
    (sweep_dir / "best.txt").write_text(text)
    log.info("%s", text.rstrip())
