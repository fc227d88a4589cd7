"""The lightning.Trainer of a run and its callbacks (best and last checkpoint, early stopping, SWA or EMA,
pruning, the random streams a resumed fit continues), the model's memory layout and compilation, and the
fit that chooses the run's checkpoint (`fit_best`)."""

from __future__ import annotations

import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, StochasticWeightAveraging
from omegaconf import DictConfig, OmegaConf

from agecls.evaluation.postfit import Fitted
from agecls.files import atomic_path
from agecls.tasks.module import FaceClassifier
from agecls.tracking import EpochLogger, Recorder
from agecls.training.ema import build_ema
from agecls.training.settings import check_resolved

log = logging.getLogger(__name__)

# The callbacks group's entries (conf/callbacks/default.yaml).
CALLBACKS = ("checkpoint", "early_stopping", "swa", "ema")
# Trainer-group keys that are not lightning.Trainer arguments: how it runs the model, and what it resumes.
_MODEL_KEYS = ("channels_last", "compile", "resume")
# The checkpoint a resumed run continues from: the end of the last epoch (callbacks.checkpoint.save_last).
LAST_CHECKPOINT = "last.ckpt"
_COMPILE_KEYS = ("enabled", "mode", "backend", "dynamic", "fullgraph")


def quiet_lightning() -> None:
    """Silence advice that does not apply to small CPU runs (worker count, logger absence)."""
    for pattern in (
        ".*does not have many workers.*",
        ".*`srun`.*",
        ".*smaller than the logging interval.*",
        ".*isinstance.treespec, LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())


class _NoAdverts(logging.Filter):
    """Drop Lightning's advert for its cloud logger from every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def build_callbacks(
    callbacks_cfg: DictConfig, run_dir: Path, extra: list[L.Callback] | None = None
) -> tuple[list[L.Callback], ModelCheckpoint]:
    """The run's callbacks from the `callbacks` group (best and last checkpoint, early stopping, SWA or EMA),
    the random streams a resumed fit restores, and `extra` (pruning); and the best-checkpoint callback.
    ValueError naming a bad entry."""
    spec = OmegaConf.to_container(callbacks_cfg, resolve=True)
    unknown = sorted(set(spec) - set(CALLBACKS))
    if unknown:
        raise ValueError(f"callbacks.{unknown[0]} is not a callback; valid: {', '.join(CALLBACKS)}")
    ckpt_cfg, stop_cfg, swa_cfg, ema_cfg = (dict(spec.get(k) or {}) for k in CALLBACKS)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=ckpt_cfg["monitor"],
        mode=ckpt_cfg["mode"],
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks: list[L.Callback] = [checkpoint, RandomStreams()]
    if ckpt_cfg.get("save_last", True):
        callbacks.append(LastCheckpoint(run_dir / "checkpoints" / LAST_CHECKPOINT))
    callbacks.extend(extra or [])
    if stop_cfg.pop("enabled", False):
        callbacks.append(EarlyStopping(**stop_cfg))
    ema = build_ema(ema_cfg)
    if ema is not None and swa_cfg.get("enabled"):
        raise ValueError(
            "callbacks.ema.enabled=true and callbacks.swa.enabled=true: two weight averages of one run; "
            "valid: enable one of them"
        )
    if swa_cfg.pop("enabled", False):
        callbacks.append(StochasticWeightAveraging(**swa_cfg))
    if ema is not None:
        callbacks.append(ema)
    return callbacks, checkpoint


class LastCheckpoint(L.Callback):
    """checkpoints/last.ckpt between epochs (as each epoch after the first starts, and as training ends):
    what `trainer.resume` continues from. Through a temporary file, so a kill while saving leaves the
    previous one whole.

    Not ModelCheckpoint(save_last=True): that saves as validation ends, before the epoch's scheduler step
    and train metrics, and a fit resumed from there repeats the epoch's end (its train metrics logged
    twice) without the scheduler step."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._saving = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._saving:
            # Lightning counts the epoch as ready when its start hooks run; saved so, a resumed fit takes it
            # for one interrupted mid-way and skips its scheduler step. Nothing of it has run: not ready.
            progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
            for scope in ("total", "current"):
                progress[scope]["ready"] = progress[scope]["started"]

    def _save(self, trainer: L.Trainer) -> None:
        self._saving = True
        try:
            with atomic_path(self.path) as tmp:
                trainer.save_checkpoint(tmp)
        finally:
            self._saving = False


class RandomStreams(L.Callback):
    """Saves the global random streams (torch CPU and CUDA, numpy, python) in every checkpoint and restores
    them when a fit resumes from one, so dropout and anything else drawing from them continue as in the
    uninterrupted run. Lightning checkpoints hold none of them. Plain lists and tensors, so the states load
    under torch.load(weights_only=True) as well."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state_dict and torch.cuda.is_available():
            cuda = state_dict["cuda"]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:
                log.warning(
                    "the checkpoint's CUDA random streams are for %d devices, this machine has %d: not "
                    "restored (a resumed run draws other dropout masks than the uninterrupted one)",
                    len(cuda),
                    torch.cuda.device_count(),
                )


def build_trainer(
    cfg: DictConfig, run_dir: Path, rec: Recorder, extra_callbacks: list[L.Callback] | None = None
) -> tuple[L.Trainer, ModelCheckpoint]:
    """lightning.Trainer from the trainer group with the callbacks group's callbacks, logging each epoch's
    metrics to `rec`; and its best-checkpoint callback. `cfg` is resolved (`resolve_auto`)."""
    check_resolved(cfg)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in _MODEL_KEYS:
        trainer_cfg.pop(key, None)
    callbacks, checkpoint = build_callbacks(cfg.callbacks, run_dir, extra_callbacks)
    logger = EpochLogger(rec, console=not trainer_cfg.get("enable_progress_bar", True))
    trainer = L.Trainer(**trainer_cfg, callbacks=callbacks, logger=logger, default_root_dir=run_dir)
    return trainer, checkpoint


def prepare_model(cfg: DictConfig, module: FaceClassifier) -> FaceClassifier:
    """Apply `trainer.channels_last` (the module's weights in channels-last memory; the datamodule hands it
    channels-last batches) and `trainer.compile` (torch.compile of the network, in place: `module.model`
    keeps its parameters and state_dict keys, so checkpoints load without it). `cfg` is resolved."""
    check_resolved(cfg)
    if cfg.trainer.get("channels_last"):
        module.to(memory_format=torch.channels_last)
    opts = cfg.trainer.get("compile") or {}
    unknown = sorted(set(opts) - set(_COMPILE_KEYS))
    if unknown:
        raise ValueError(f"trainer.compile.{unknown[0]} is not a key; valid: {', '.join(_COMPILE_KEYS)}")
    if opts.get("enabled"):
        kwargs = {k: opts[k] for k in _COMPILE_KEYS[1:] if opts.get(k) is not None}
        if kwargs.get("backend", "inductor") not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(
                f"trainer.compile.backend={kwargs['backend']!r}; valid: "
                f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}"
            )
        module.model.compile(**kwargs)
    return module


def fit_best(
    cfg: DictConfig,
    trainer: L.Trainer,
    checkpoint: ModelCheckpoint,
    module: FaceClassifier,
    datamodule: L.LightningDataModule,
    run_dir: Path,
    last: Path | None = None,
) -> Fitted:
    """Fit `module` (from `last`, a resumed run's checkpoint) and choose its checkpoint: the best epoch's,
    or the SWA weights when they beat it. RuntimeError when no checkpoint was saved."""
    started = time.perf_counter()
    # weights_only=False: the run's own checkpoint, whose hyperparameters hold its config
    trainer.fit(module, datamodule=datamodule, ckpt_path=last, weights_only=False if last else None)
    fit_seconds = time.perf_counter() - started
    best = checkpoint.best_model_path
    best_score = float(checkpoint.best_model_score) if best else float("nan")
    if best and cfg.callbacks.swa.enabled:
        best, best_score = prefer_swa(cfg, trainer, module, datamodule, best, best_score, run_dir)
    if not best:
        raise RuntimeError(
            f"no checkpoint was saved in {run_dir / 'checkpoints'}; did training run an epoch?"
        )
    return Fitted(best, best_score, int(trainer.current_epoch), fit_seconds)


def prefer_swa(cfg, trainer, module, datamodule, best: str, best_score: float, run_dir: Path):
    """After a fit with stochastic weight averaging, the module holds the averaged weights: score them on
    validation and keep them (checkpoints/swa.ckpt) when they beat the best epoch's checkpoint."""
    metric, higher = str(cfg.objective.metric), str(cfg.objective.mode) == "max"
    scores = trainer.validate(module, datamodule=datamodule, verbose=False)
    swa_score = float(scores[0][metric]) if scores and metric in scores[0] else float("nan")
    log.info("SWA weights: %s %.4f (best epoch's checkpoint %.4f)", metric, swa_score, best_score)
    if swa_score == swa_score and (swa_score > best_score if higher else swa_score < best_score):
        path = run_dir / "checkpoints" / "swa.ckpt"
        trainer.save_checkpoint(path)
        return str(path), swa_score
    return best, best_score
