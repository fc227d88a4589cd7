"""The trial side of an Optuna study: one `agecls-train` process reports per-epoch values, may be pruned,
and tells the study its outcome. The sweeper (agecls.sweep.sweeper) only asks for trials and launches them."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from agecls.study import (
    attach_trial,
    device_label,
    find_trial,
    open_study,
    process_record,
    record_heartbeat,
    trial_id,
)
from agecls.tracking import overrides_run_name, trial_run_name

log = logging.getLogger(__name__)


class TrialNotRunning(RuntimeError):
    """The trial this process was started for is not RUNNING: already finished (failed as stale, or
    re-queued), or not a trial of the study at all."""


@dataclass
class TrialContext:
    """This process's trial of a study (set by the sweeper as `optuna.trial=<number>`).

    While it lives, the process records the trial's heartbeat itself (as well as the sweeper that started
    it), so a trial whose sweeper died keeps its trial alive, and a trial whose process or job died goes
    stale and is failed and re-queued by the next sweeper that opens the study."""

    study: Any
    trial: Any
    number: int
    requeued: dict[str, Any] = field(default_factory=dict)  # requeued_from, requeue_reason: a re-run trial
    device: str = "cpu"  # what this process was given: "cuda:1", "cpu", a Slurm job's GPU or shard
    warm_start: str | None = None  # its label when the trial was enqueued (optuna.enqueue / enqueue_from)
    # objective.metrics of a study with several objectives (empty: one objective, objective.metric)
    metrics: list[str] = field(default_factory=list)
    objectives: dict[str, float] = field(default_factory=dict)  # the run's, set by record_objectives
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TrialContext | None:
        number = cfg.get("optuna", {}).get("trial")
        if number is None:
            return None
        import optuna

        # The trial's own draws (define-by-run, e.g. bins=search) use the configured sampler, seeded per trial
        seed = int(cfg.seed) * 100_003 + int(number)
        study = open_study(cfg.optuna, with_sampler=True, sampler_seed=seed)
        frozen = find_trial(study, int(number))
        if frozen is None:
            raise TrialNotRunning(f"optuna.trial={number}: study {study.study_name!r} has no trial {number}")
        if frozen.state != optuna.trial.TrialState.RUNNING:
            state = frozen.state.name
            raise TrialNotRunning(
                f"optuna.trial={number}: trial {number} of study {study.study_name!r} is {state}, not "
                "RUNNING (failed as stale or cancelled while its job was queued); nothing to run"
            )
        marks = ("requeued_from", "requeue_reason", "run_alone")
        requeued = {k: frozen.user_attrs[k] for k in marks if k in frozen.user_attrs}
        metrics = [str(m) for m in (cfg.get("objective", {}).get("metrics") or [])]
        ctx = cls(
            study=study,
            trial=attach_trial(study, frozen),
            number=int(number),
            requeued=requeued,
            warm_start=frozen.user_attrs.get("warm_start"),
            metrics=metrics if len(metrics) > 1 else [],
            device=_own_device(),
        )
        # This process, as a sweeper on the same host can check it: if it dies without telling, that sweeper
        # fails and re-queues the trial at once instead of waiting for its heartbeat to go stale.
        try:
            ctx.trial.set_user_attr("process", process_record())
        except RuntimeError as exc:  # UpdateFinishedTrialError: failed by a sweeper meanwhile
            raise TrialNotRunning(
                f"optuna.trial={number}: finished while this process started: {exc}"
            ) from None
        # The seed is recorded with the trial (MLflow has it as the param `seed` and tag `seed`):
        # re-running the trial's config.yaml reproduces it (docs/SWEEPS.md, "Re-running a trial").
        ctx.trial.set_user_attr("seed", int(cfg.seed))
        if "device" not in frozen.user_attrs:  # a Slurm job: only the job sees which GPU Slurm gave it
            ctx.trial.set_user_attr("device", ctx.device)
        ctx.start_heartbeat(int(cfg.optuna.heartbeat_interval))
        return ctx

    def start_heartbeat(self, interval: int) -> None:
        """Record the trial's heartbeat every interval/2 seconds from a daemon thread until it is told."""
        storage_id = trial_id(self.trial)
        period = max(1, interval // 2)

        def beat() -> None:
            while not self._stop.wait(period):
                try:
                    record_heartbeat(self.study, storage_id)
                except Exception as exc:  # noqa: BLE001 - a busy storage must not kill the run
                    log.warning("trial %d: heartbeat not recorded: %s", self.number, exc)

        record_heartbeat(self.study, storage_id)
        threading.Thread(target=beat, name=f"optuna-heartbeat-{self.number}", daemon=True).start()

    def stop_heartbeat(self) -> None:
        """Stop recording the trial's heartbeat (it goes stale after `optuna.grace_period` unless told)."""
        self._stop.set()

    def _tell(self, *args: Any, **kwargs: Any) -> None:
        self.stop_heartbeat()
        self.study.tell(self.number, *args, skip_if_finished=True, **kwargs)

    def start_run(self, cfg: DictConfig, run_dir: Path) -> dict[str, str]:
        """Record the run's folder and epoch budget with the trial; returns the MLflow tags naming it."""
        tags = self.tags(cfg.optuna.get("parent_run_id"))
        self.trial.set_user_attr("max_epochs", int(cfg.trainer.max_epochs))
        self.trial.set_user_attr("run_dir", str(run_dir))
        return tags

    def run_name(self, cfg: DictConfig) -> str:
        """The MLflow run's name: one per trial, even when the study's command gives one."""
        return trial_run_name(self.number, self.trial.params, cfg.tracking.get("run_name"))

    def pruning_callbacks(self, cfg: DictConfig) -> list[L.Callback]:
        """The callback reporting each epoch to the study's pruner; none for a study with several objectives
        (optuna's pruners work with one: such a study stops trials by early stopping only)."""
        if self.multi_objective:
            return []
        report = str(cfg.optuna.get("report") or "best")
        # a warm start is the study's known floor: it runs to the end unless optuna.prune_warm_starts
        keep = bool(self.warm_start and not cfg.optuna.get("prune_warm_starts", False))
        return [PruningCallback(self, str(cfg.objective.metric), report, keep)]

    @property
    def in_study(self) -> bool:
        """A trial's run: resumed only by its study, and every objective.metrics value must be computed."""
        return True

    def tags(self, parent_run_id: str | None) -> dict[str, str]:
        tags = {
            "optuna.study": self.study.study_name,
            "optuna.trial": str(self.number),
            "device": self.device,
        }
        tags.update({f"optuna.{k}": str(v) for k, v in self.requeued.items()})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id  # shows the run nested under its study in MLflow
        return tags

    @property
    def multi_objective(self) -> bool:
        """Whether the study has several objectives: the trial tells their values and reports no epochs
        (optuna's pruners work with one objective)."""
        return bool(self.metrics)

    def record_objectives(self, values: dict[str, float]) -> None:
        """The run's objectives ({name: value}, agecls.evaluation.objectives), told with `complete`."""
        self.objectives = dict(values)

    def complete(self, value: float, attrs: dict[str, Any]) -> None:
        """Set the user attrs (and `objectives`), then tell the study `value`, or with several objectives
        their values in objective.metrics order. A missing objective fails the trial (ValueError)."""
        for key, val in attrs.items():
            self.trial.set_user_attr(key, val)
        if self.objectives:
            self.trial.set_user_attr("objectives", self.objectives)
        if not self.multi_objective:
            self._tell(value)
            return
        missing = [m for m in self.metrics if m not in self.objectives]
        if missing:
            error = ValueError(f"objective.metrics: {', '.join(missing)} not computed for this run")
            self.failed(error)
            raise error
        self._tell([float(self.objectives[m]) for m in self.metrics])

    def pruned(self) -> None:
        import optuna

        self._tell(state=optuna.trial.TrialState.PRUNED)

    def failed(self, error: BaseException) -> None:
        import optuna

        self.trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
        if out_of_gpu_memory(error):  # the sweeper re-queues it to run alone when its device was shared
            self.trial.set_user_attr("out_of_memory", True)
        self._tell(state=optuna.trial.TrialState.FAIL)


def _own_device() -> str:
    """This process's device as its environment names it (agecls.study.device_label); where it names
    none, CUDA's first device when there is one, else the CPU."""
    named = device_label(os.environ)
    if named is not None:
        return named
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def out_of_gpu_memory(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from or during, is CUDA running out of memory
    (torch.cuda.OutOfMemoryError, or the RuntimeError older code paths raise with CUDA's message)."""
    import torch

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class NoTrial:
    """A run outside any study, with `TrialContext`'s run-side methods: nothing to report or record."""

    trial = None
    in_study = False

    def start_run(self, cfg: DictConfig, run_dir: Path) -> dict[str, str]:
        return {}

    def run_name(self, cfg: DictConfig) -> str:
        """`tracking.run_name`, else one made of the command's overrides."""
        given = cfg.tracking.get("run_name")
        if given:
            return given
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        return overrides_run_name(overrides, fallback=f"{cfg.task.name} defaults")

    def pruning_callbacks(self, cfg: DictConfig) -> list[L.Callback]:
        return []

    def record_objectives(self, values: dict[str, float]) -> None:
        pass


# What a trial reports to the pruner after each epoch (`optuna.report`).
REPORTS = ("best", "last")


class PruningCallback(L.Callback):
    """Report the monitored validation value every epoch (`report`: best: the best so far; last: that
    epoch's); stop the run when the study's pruner says so.

    A pruned run first finishes the epoch it was pruned at (its scheduler step, checkpoints/last.ckpt at
    the end of training), then raises optuna.TrialPruned: so the pruned run can be continued later from
    that very epoch (`optuna.check_pruned`).

    With `keep` (a warm start, unless optuna.prune_warm_starts) the pruner is still asked at every epoch, so
    the trial's values take their place in its rungs for the other trials, but the trial runs to the end;
    the first epoch the pruner would have cut it is recorded as the trial's user attr `pruner_would_cut_at`.
    """

    def __init__(self, ctx: TrialContext, monitor: str, report: str = "best", keep: bool = False) -> None:
        if report not in REPORTS:
            raise ValueError(f"optuna.report={report!r}; valid: {', '.join(REPORTS)}")
        self.ctx, self.monitor, self.report, self.keep = ctx, monitor, report, keep
        self.pruned_at: int | None = None
        self.would_cut_at: int | None = None
        self.best: float | None = None

    def _reported(self, value: float) -> float:
        """The value to report for this epoch. Validation scores of short runs swing by points from epoch
        to epoch: with `best`, one lucky or unlucky epoch does not decide a rung, and a trial is judged on
        what its checkpoint selection would keep."""
        if self.report == "last":
            return value
        import optuna

        maximize = self.ctx.study.direction == optuna.study.StudyDirection.MAXIMIZE
        if value == value and (self.best is None or (value > self.best if maximize else value < self.best)):
            self.best = value  # NaN (a diverged epoch) is never a best
        return value if self.best is None else self.best

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == "fit"  # not a validate() after fit (e.g. scoring SWA weights)
        if trainer.sanity_checking or not fitting or self.monitor not in trainer.callback_metrics:
            return
        if self.pruned_at is not None:
            return
        epoch = trainer.current_epoch + 1
        self.ctx.trial.report(self._reported(float(trainer.callback_metrics[self.monitor])), epoch)
        # The last epoch: the budget is spent and pruning saves nothing. A rung there (successive halving's
        # rungs can land on trainer.max_epochs) would turn a finished trial PRUNED and keep its value out
        # of the study's choice; it completes instead.
        if 0 < int(trainer.max_epochs or 0) <= epoch:
            return
        if self.ctx.trial.should_prune():
            import optuna

            if self.keep:
                if self.would_cut_at is None:
                    self.would_cut_at = epoch
                    self.ctx.trial.set_user_attr("pruner_would_cut_at", epoch)
                    log.info(
                        "trial %d: a warm start, kept (the pruner would have cut it after epoch %d)",
                        self.ctx.number,
                        epoch,
                    )
                return
            self.pruned_at = epoch
            log.info("trial %d pruned after epoch %d", self.ctx.number, epoch)
            epoch_ends = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", True))
            if epoch_ends and epoch >= int(trainer.fit_loop.min_epochs or 0):
                trainer.should_stop = True  # the epoch ends as usual; on_train_end raises
                return
            # mid-epoch validation (val_check_interval < 1) or min_epochs not reached: stop right here;
            # checkpoints/last.ckpt then holds the start of this epoch
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after LastCheckpoint's on_train_end (an earlier callback): last.ckpt holds the pruned epoch
        if self.pruned_at is not None:
            import optuna

            raise optuna.TrialPruned(f"pruned after epoch {self.pruned_at}")
