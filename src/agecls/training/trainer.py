"""The lightning.Trainer of a run and its callbacks (best checkpoint, early stopping, SWA or EMA, pruning),
and the model's memory layout and compilation."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, StochasticWeightAveraging
from omegaconf import DictConfig, OmegaConf

from agecls.tasks.module import FaceClassifier
from agecls.tracking import EpochLogger, Recorder
from agecls.training.ema import build_ema
from agecls.training.settings import check_resolved

log = logging.getLogger("agecls.training.train")

# The callbacks group's entries (conf/callbacks/default.yaml).
CALLBACKS = ("checkpoint", "early_stopping", "swa", "ema")
# Trainer-group keys that say how the trainer runs the model rather than lightning.Trainer arguments.
_MODEL_KEYS = ("channels_last", "compile")
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
    """The run's callbacks from the `callbacks` group (best checkpoint, early stopping, SWA or EMA) after
    `extra` (pruning), and the checkpoint callback; ValueError naming a bad entry."""
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
    callbacks: list[L.Callback] = [checkpoint, *(extra or [])]
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
    trainer = L.Trainer(**trainer_cfg, callbacks=callbacks, logger=EpochLogger(rec), default_root_dir=run_dir)
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
