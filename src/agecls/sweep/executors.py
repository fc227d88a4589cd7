"""Where a study's trials run (`trial_executor`): child processes of the sweeper (CPU or one GPU each), or
submitit jobs when `hydra.launcher` is a submitit launcher; either way the same agecls.cli.train command."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from omegaconf import DictConfig, OmegaConf

from agecls.sweep.checks import SweepError

log = logging.getLogger(__name__)


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

    def prepare(self) -> None: ...

    def ready(self) -> None: ...

    def wait_any(self, timeout: float) -> None: ...


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
    """Trials as child processes of the sweeper: `optuna.n_jobs` on CPU, or one per GPU (`optuna.devices`).
    With `optuna.trial_start=template` (the default) each trial is forked from a pre-imported template
    process (agecls.sweep.template); with `fresh`, or if the template fails, it is a new interpreter."""

    kind = "subprocess"

    def __init__(self, ocfg: DictConfig) -> None:
        self.ocfg = ocfg
        start = str(ocfg.get("trial_start", "template"))
        if start not in ("template", "fresh"):
            raise SweepError(f"optuna.trial_start={start!r}; valid: template, fresh")
        self.use_template = start == "template"
        self.template: Any = None
        self._said_ready = False

    def slots(self) -> list[dict[str, str]]:
        """One environment per concurrent trial: `optuna.trials_per_device` per GPU when CUDA is there, else
        CPU threads shared. A GPU's slots are spread (0, 1, 0, 1): the first trials each get a GPU of
        their own."""
        per_device = trials_per_device(self.ocfg)  # checked on CPU too, where it changes nothing
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
            return [{"CUDA_VISIBLE_DEVICES": g} for _ in range(per_device) for g in gpus]
        n_jobs = job_slots(self.ocfg)
        threads = str(max(1, (os.cpu_count() or 1) // n_jobs))
        return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads} for _ in range(n_jobs)]

    def prepare(self) -> None:
        """Start the trial template now, so that it imports while the sweeper opens the study."""
        if self.use_template and self.template is None:
            from agecls.sweep.template import Template

            self.template = Template()
            atexit.register(self.template.close)

    def ready(self) -> None:
        """Wait until the template can fork trials (a trial asked for before would wait in the study)."""
        from agecls.sweep.template import TemplateGone

        if self.template is not None:
            try:
                self._say_ready()
            except TemplateGone as exc:
                self._fall_back(exc)

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, name: str) -> TrialHandle:
        from agecls.sweep.template import TemplateGone, is_module_command

        if self.use_template and is_module_command(cmd):
            try:
                self.prepare()
                self._say_ready()
                log_path.write_text("")
                return self.template.start(cmd, env, log_path)
            except TemplateGone as exc:
                self._fall_back(exc)
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        return ProcessHandle(proc)

    def wait_any(self, timeout: float) -> None:
        """Sleep until a trial of the template ends, at most `timeout` seconds."""
        if self.template is not None:
            self.template.wait_any(timeout)
        else:
            time.sleep(timeout)

    def _fall_back(self, exc: Exception) -> None:
        log.warning("%s; trials start as fresh processes from now on", exc)
        self.use_template, self.template = False, None

    def _say_ready(self) -> None:
        if not self._said_ready:
            imported = self.template.wait_ready()
            waited = time.monotonic() - self.template.started
            log.info(
                "trial template ready (imports %.1f s, %.1f s after it started): trials fork from it",
                imported,
                waited,
            )
            self._said_ready = True


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


def submitit_parameters(
    launcher: dict[str, Any], trials_per_device: int = 1
) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(cluster, folder, executor init kwargs, update_parameters kwargs) from a `hydra.launcher` block of
    hydra-submitit-launcher (submitit_slurm/submitit_local, or agecls's `slurm`), mapped as that plugin
    maps them: its shared keys keep their names, cluster-specific ones get the cluster's prefix. With
    `trials_per_device` > 1 a Slurm job asks for one GPU shard instead of its GPU (`shard_parameters`)."""
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
    if cluster == "slurm" and trials_per_device > 1:
        params = shard_parameters(params, trials_per_device)
    return cluster, folder, init, params


# How a Slurm job asks for whole GPUs (update_parameters keys); a job sharing a GPU asks for none of them.
GPU_REQUESTS = ("gpus_per_node", "slurm_gpus_per_task", "slurm_gres")
PER_GPU = ("slurm_cpus_per_gpu", "slurm_mem_per_gpu")  # sizes per allocated GPU: none with a shard
# Set in a trial's environment by the sweeper for a trial re-queued to run alone (it ran out of GPU memory
# beside other trials): its Slurm job asks for the launcher's whole GPU, which Slurm gives only once no
# shard of it is allocated.
RUN_ALONE_ENV = "AGECLS_RUN_ALONE"


def _gpus_asked(params: dict[str, Any]) -> int:
    """How many GPUs a job of these parameters asks for (0: none)."""
    counts = [int(params.get(key) or 0) for key in ("gpus_per_node", "slurm_gpus_per_task")]
    for item in str(params.get("slurm_gres") or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            counts.append(int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1)
    return max(counts, default=0)


def shard_parameters(params: dict[str, Any], trials_per_device: int) -> dict[str, Any]:
    """A Slurm job's parameters for a trial that shares its GPU: `--gres=shard:1` instead of the launcher's
    GPU. At most the cluster's shards per GPU (its gres.conf) share one; optuna.n_jobs is how many jobs
    are in flight. SweepError for a launcher asking for more than one GPU per job or sizing by GPU
    (cpus_per_gpu, mem_per_gpu): such a trial is no share of one GPU."""
    asked = _gpus_asked(params)
    if asked > 1:
        raise SweepError(
            f"optuna.trials_per_device={trials_per_device} shares one GPU between trial jobs, but "
            f"hydra.launcher asks for {asked} GPUs per job; ask for one or set optuna.trials_per_device=1"
        )
    sized = [key.removeprefix("slurm_") for key in PER_GPU if params.get(key) is not None]
    if sized:
        raise SweepError(
            f"optuna.trials_per_device={trials_per_device}: a trial job gets a GPU shard, not a GPU, so "
            f"hydra.launcher.{sized[0]} cannot size it; use cpus_per_task / mem_gb (or trials_per_device=1)"
        )
    return {**params, **dict.fromkeys(GPU_REQUESTS), "slurm_gres": "shard:1"}


class SubmititExecutor:
    """Trials as submitit jobs (Slurm, or submitit's local executor): `optuna.n_jobs` jobs submitted at once,
    each running the trial command through `run_trial_job`; the job's resources come from `hydra.launcher`,
    with `optuna.trials_per_device` > 1 on Slurm a GPU shard instead of a GPU (`shard_parameters`)."""

    def __init__(self, launcher: dict[str, Any], ocfg: DictConfig) -> None:
        import submitit

        per_device = trials_per_device(ocfg)
        self.kind, folder, init, self.params = submitit_parameters(launcher, per_device)
        self.folder = folder
        self.executor = submitit.AutoExecutor(folder=folder, cluster=self.kind, **init)
        self.executor.update_parameters(**self.params)
        # a trial re-queued to run alone (RUN_ALONE_ENV) gets the launcher's own GPU request: an executor of
        # its own, as submitit's update_parameters cannot unset the shard (it takes None as "not given")
        self.alone = self.executor
        if per_device > 1:
            self.alone = submitit.AutoExecutor(folder=folder, cluster=self.kind, **init)
            self.alone.update_parameters(**submitit_parameters(launcher)[3])
        self.n_jobs = job_slots(ocfg)

    def slots(self) -> list[dict[str, str]]:
        """GPUs are the job's own (Slurm sets CUDA_VISIBLE_DEVICES); CPU threads follow cpus_per_task."""
        cpus = self.params.get("cpus_per_task")
        return [{"OMP_NUM_THREADS": str(cpus)} if cpus else {} for _ in range(self.n_jobs)]

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, name: str) -> JobHandle:
        executor = self.alone if env.get(RUN_ALONE_ENV) == "1" else self.executor
        executor.update_parameters(name=name)
        job = executor.submit(run_trial_job, cmd, env, str(log_path), os.getcwd())
        log.info("%s: submitted as %s job %s", name, self.kind, job.job_id)
        handle = JobHandle(job)
        if not _JOB_HANDLES:
            atexit.register(_release_jobs)
        _JOB_HANDLES.append(handle)
        return handle

    def prepare(self) -> None:
        pass  # each job starts its own interpreter on its node

    def ready(self) -> None:
        pass

    def wait_any(self, timeout: float) -> None:
        time.sleep(timeout)  # a job's end is seen by polling the cluster


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


def job_slots(ocfg: DictConfig) -> int:
    """`optuna.n_jobs`, checked: trials at once on CPU, or jobs submitted at once."""
    value = ocfg.n_jobs
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"optuna.n_jobs={value!r}; valid: an integer >= 1 (trials at once)")
    return value


def trials_per_device(ocfg: DictConfig) -> int:
    value = ocfg.get("trials_per_device", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"optuna.trials_per_device={value!r}; valid: an integer >= 1 (trials sharing a GPU)")
    return value


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
    """A trial this sweeper started: its handle, number, storage id, parameters and slot."""

    handle: TrialHandle
    number: int
    trial_id: int
    params: dict[str, Any]
    slot: int
    started: float = field(default_factory=time.monotonic)
