"""Where a run starts: its output folder, and with `trainer.resume` the run folder, config, checkpoint and
MLflow run it continues."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from agecls.config import flatten
from agecls.errors import UsageError
from agecls.tracking import process_gone, read_run_file, write_run_file
from agecls.training.trainer import LAST_CHECKPOINT

log = logging.getLogger(__name__)
# Keys a resumed run may change: how it resumes, how far it trains, how it shows progress.
RESUME_MAY_CHANGE = ("trainer.resume", "trainer.max_epochs", "trainer.enable_progress_bar")


def run_dir_for(cfg: DictConfig) -> Path:
    """Hydra's output folder for this job, or a fresh timestamped one when called without Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    path = Path(cfg.paths.output_dir) / "runs" / stamp
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_start(cfg: DictConfig, run_dir: Path | None, in_study: bool) -> tuple[DictConfig, Path, Path | None]:
    """The config, run folder and checkpoint a run starts from: `run_dir` when given (a hierarchy's stage),
    else `resume_point`. UsageError for `trainer.resume` on a study's trial or a hierarchy's stage."""
    if cfg.trainer.get("resume") is not None and (in_study or run_dir is not None):
        raise UsageError(
            f"trainer.resume={cfg.trainer.resume}: only a plain run is resumed (a study re-queues its "
            "interrupted trials itself; a hierarchy's stages are not resumed); valid: trainer.resume=null"
        )
    if run_dir is not None:
        return cfg, run_dir, None
    return resume_point(cfg)


def resume_point(cfg: DictConfig) -> tuple[DictConfig, Path, Path | None]:
    """The config, run folder and checkpoint of a run (`trainer.resume`): null, a new run in this command's
    folder; `auto`, this command's folder (hydra.run.dir) continued from its checkpoints/last.ckpt when it
    has one, else started; PATH (a run folder, or a .ckpt in one), that folder continued with its own
    config.yaml. UsageError for a path with no checkpoint or overrides that would change the run."""
    spec = cfg.trainer.get("resume")
    if spec is None or str(spec) == "auto":
        run_dir = run_dir_for(cfg)
        last = run_dir / "checkpoints" / LAST_CHECKPOINT
        if spec is None or not last.is_file():
            if spec is not None:
                log.info(
                    "trainer.resume=auto: %s has no checkpoints/%s yet; a new run", run_dir, LAST_CHECKPOINT
                )
            return cfg, run_dir, None
        check_not_running(run_dir)
        return cfg, run_dir, last
    path = Path(str(spec)).expanduser().resolve()
    valid = f"valid: auto, a run folder holding checkpoints/{LAST_CHECKPOINT}, or a .ckpt file in one"
    if path.is_dir():
        run_dir, last = path, path / "checkpoints" / LAST_CHECKPOINT
    elif path.is_file():
        run_dir, last = (path.parent.parent if path.parent.name == "checkpoints" else path.parent), path
    else:
        raise UsageError(f"trainer.resume={spec}: no such folder or file; {valid}")
    if not last.is_file():
        raise UsageError(
            f"trainer.resume={spec}: {last} does not exist (the run ended no epoch, or ran with "
            f"callbacks.checkpoint.save_last=false); {valid}"
        )
    check_not_running(run_dir)
    saved = saved_config(run_dir, spec)
    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            key = override.split("=", 1)[0].lstrip("+~")
            if key not in RESUME_MAY_CHANGE and not key.startswith("hydra."):
                raise UsageError(
                    f"trainer.resume={spec} continues the run with its own {run_dir / 'config.yaml'}, but "
                    f"the command also sets {override!r}; valid: only {', '.join(RESUME_MAY_CHANGE)} "
                    "(start a new run to change anything else)"
                )
    for key in RESUME_MAY_CHANGE:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    return saved, run_dir, last


def continue_run(cfg: DictConfig, resolved: dict[str, Any], run_dir: Path, last: Path | None) -> str | None:
    """For a resumed run (`last` set): check it is the same run, count the resume in run.json, and return
    the MLflow run it continues (None: a new MLflow run is recorded)."""
    if last is None:
        return None
    if str(cfg.trainer.resume) == "auto":
        check_same_run(resolved, run_dir)
    marker = read_run_file(run_dir)
    resumed_run_id = marker.get("mlflow_run_id") if cfg.tracking.enabled else None
    if cfg.tracking.enabled and resumed_run_id is None:
        log.warning("trainer.resume: %s names no MLflow run; recording a new one", run_dir / "run.json")
    write_run_file(run_dir, resumed_from=str(last), resumes=int(marker.get("resumes", 0)) + 1)
    log.info("resuming %s from %s (MLflow run %s)", run_dir, last, resumed_run_id)
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    return resumed_run_id


def saved_config(run_dir: Path, spec: object) -> DictConfig:
    """The resolved config.yaml a run folder holds; UsageError naming the folder when it has none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UsageError(
            f"trainer.resume={spec}: {run_dir} has no config.yaml; valid: a folder agecls-train ran in"
        )
    return OmegaConf.create(path.read_text())


def check_same_run(resolved: dict[str, Any], run_dir: Path) -> None:
    """UsageError naming the keys where this command's config differs from the run folder's config.yaml:
    `trainer.resume=auto` continues a run only with the command that started it."""
    before = flatten(saved_config(run_dir, "auto"))
    now = flatten(resolved)
    differ = sorted(
        k for k in set(before) | set(now) if k not in RESUME_MAY_CHANGE and before.get(k) != now.get(k)
    )
    if differ:
        shown = ", ".join(f"{k}={now.get(k)!r} (was {before.get(k)!r})" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise UsageError(
            f"trainer.resume=auto: this command's config differs from the one {run_dir} ran with: "
            f"{shown}{more}; valid: the run's own command (only {', '.join(RESUME_MAY_CHANGE)} may change), "
            "or a new hydra.run.dir"
        )


def check_not_running(run_dir: Path) -> dict[str, Any]:
    """The run folder's run.json; UsageError when it says a live process of this host still runs it (two
    processes would write one folder and one MLflow run)."""
    marker = read_run_file(run_dir)
    pid = marker.get("pid")
    if marker.get("status") != "running" or not isinstance(pid, int) or pid == os.getpid():
        return marker
    if marker.get("host") != socket.gethostname():
        log.warning(
            "trainer.resume: %s says host %s still runs it (pid %s); resuming anyway, as this host cannot "
            "check (stop that process if it does)",
            run_dir / "run.json",
            marker.get("host"),
            pid,
        )
        return marker
    if process_gone(pid, str(marker.get("started") or "")) is None:
        raise UsageError(
            f"trainer.resume: {run_dir} is still running (pid {pid} on this host, {run_dir / 'run.json'}); "
            "valid: resume it once that process has stopped"
        )
    return marker
