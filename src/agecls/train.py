"""`agecls-train`: one Hydra-configured training run (or, with -m, a sweep of them)."""

from __future__ import annotations

import json
import logging
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from agecls.config import CONFIG_DIR, flatten
from agecls.data.augment import build_augment
from agecls.data.bins import AgeBins
from agecls.data.datamodule import FaceDataModule
from agecls.data.prepare import prepare_data, task_labels
from agecls.metrics import per_class_report, plot_confusion
from agecls.module import FaceClassifier
from agecls.tasks.classification import class_weights, task_classes
from agecls.tracking import EpochMetrics, Recorder, git_commit, recording

log = logging.getLogger("agecls.train")

# Trainer-group keys that configure callbacks rather than lightning.Trainer itself.
_CALLBACK_KEYS = ("early_stopping", "checkpoint")


def run_dir_for(cfg: DictConfig) -> Path:
    """Hydra's output folder for this job, or a fresh timestamped one when called without Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    path = Path(cfg.paths.output_dir) / "runs" / stamp
    path.mkdir(parents=True, exist_ok=True)
    return path


def _quiet_lightning() -> None:
    """Silence advice that does not apply to small CPU runs (worker count, logger absence)."""
    for pattern in (".*does not have many workers.*", ".*LightningModule.log.*no logger.*", ".*`srun`.*"):
        warnings.filterwarnings("ignore", message=pattern)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[L.Callback]) -> tuple[L.Trainer, ModelCheckpoint]:
    """lightning.Trainer from the trainer group, with best-checkpoint and early-stopping callbacks."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    stop_cfg, ckpt_cfg = (trainer_cfg.pop(k) for k in _CALLBACK_KEYS)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=ckpt_cfg["monitor"],
        mode=ckpt_cfg["mode"],
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks: list[L.Callback] = [checkpoint, *extra_callbacks]
    if stop_cfg.pop("enabled"):
        callbacks.append(EarlyStopping(**stop_cfg))
    trainer = L.Trainer(**trainer_cfg, callbacks=callbacks, logger=False, default_root_dir=run_dir)
    return trainer, checkpoint


def _report_stage(stage: str, module: FaceClassifier, class_names: list[str], run_dir: Path, rec: Recorder):
    """Write and record the confusion matrix and per-class table of one evaluated stage."""
    confmat = module.last_confmat[stage].numpy()
    table = per_class_report(confmat, class_names)
    csv_path = run_dir / f"per_class_{stage}.csv"
    table.to_csv(csv_path, index=False)
    png = plot_confusion(confmat, class_names, run_dir / f"confusion_{stage}.png", f"{stage} (best checkpoint)")
    for path in (csv_path, png):
        rec.artifact(path, "evaluation")
    prefix = "best_val" if stage == "val" else stage
    rec.metrics({f"{prefix}/f1_{r['class']}": float(r["f1"]) for _, r in table.iterrows()})
    return confmat.tolist(), table


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one configured run end to end; return its metrics (objective = best value of cfg.objective)."""
    _quiet_lightning()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic), warn_only=True)
    run_dir = run_dir_for(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    tags = {"seed": cfg.seed, "git_commit": git_commit(), "task": cfg.task.name, "run_dir": str(run_dir)}
    with recording(cfg.tracking, run_name=cfg.tracking.get("run_name"), tags=tags) as rec:
        rec.params(flatten(resolved))
        rec.artifact(run_dir / "config.yaml", "config")
        if HydraConfig.initialized():
            overrides = run_dir / "overrides.yaml"
            overrides.write_text(OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))
            rec.artifact(overrides, "config")

        prepared = prepare_data(cfg.data, cfg.paths)
        manifest = prepared.manifest
        rec.tags({"data.manifest_hash": manifest.hash, "data.root": str(manifest.root), "data.rows": len(manifest.df)})
        bins = AgeBins.from_config(cfg.bins)
        class_names = list(task_classes(cfg.task.target, bins.labels))
        datamodule = FaceDataModule(
            prepared.images,
            task_labels(prepared, cfg.task.target, bins),
            manifest.df["split"].to_numpy(),
            len(class_names),
            batch_size=int(cfg.data.batch_size),
            num_workers=int(cfg.data.num_workers),
            weighted_sampler=bool(cfg.sampler.weighted_sampler),
            train_transform=build_augment(cfg.augment),
            seed=int(cfg.seed),
        )
        sizes = {s: len(datamodule.indices[s]) for s in ("train", "val", "test")}
        rec.params({f"data.n_{s}": n for s, n in sizes.items()})
        log.info("data: %s  rows per split %s  manifest %s", manifest.root, sizes, manifest.hash[:12])
        weights = class_weights(datamodule.split_labels("train"), len(class_names), cfg.sampler.class_weights)
        module = FaceClassifier(resolved, class_names, weights)

        trainer, checkpoint = build_trainer(cfg, run_dir, [EpochMetrics(rec)])
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        best = checkpoint.best_model_path
        if not best:
            raise RuntimeError(f"no checkpoint was saved in {run_dir / 'checkpoints'}; did training run an epoch?")
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
        test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]

        results: dict[str, Any] = {
            "objective": float(checkpoint.best_model_score),
            "best_epoch": int(torch.load(best, map_location="cpu", weights_only=False)["epoch"]),
            "epochs_trained": int(trainer.current_epoch),
            "fit_seconds": round(fit_seconds, 2),
            **{f"best_val/{k.split('/', 1)[1]}": float(v) for k, v in val.items()},
            **{k: float(v) for k, v in test.items()},
        }
        rec.metrics({k: float(v) for k, v in results.items()})
        results["class_names"] = class_names
        results["confusion_val"], _ = _report_stage("val", module, class_names, run_dir, rec)
        results["confusion_test"], test_table = _report_stage("test", module, class_names, run_dir, rec)
        results["checkpoint"] = best
        results["run_dir"] = str(run_dir)
        results["mlflow_run_id"] = rec.run_id
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        rec.artifact(run_dir / "results.json", "evaluation")
        if cfg.tracking.get("log_checkpoint"):
            rec.artifact(Path(best), "checkpoints")
    log.info(
        "best epoch %d: val macro-F1 %.4f, test macro-F1 %.4f (%s)",
        results["best_epoch"],
        results["best_val/macro_f1"],
        results["test/macro_f1"],
        run_dir,
    )
    log.info("per-class test F1:\n%s", test_table.to_string(index=False, float_format="%.3f"))
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    """Console entry point; returns the objective so Hydra sweepers can optimise it."""
    return train(cfg)["objective"]


if __name__ == "__main__":
    main()
