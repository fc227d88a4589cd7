"""`agecls-train`: one Hydra-configured training run (or, with -m, a sweep of them)."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from agecls.config import flatten
from agecls.data.augment import build_augment
from agecls.data.bins import AgeBins
from agecls.data.datamodule import FaceDataModule
from agecls.data.prepare import PreparedData, frame_targets, prepare_data, subset_labels
from agecls.evaluation.splits import PREFIX, choose_tta, evaluate_splits, metric_prefixes
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES, class_weights
from agecls.tasks.module import FaceClassifier
from agecls.tasks.multitask import YEARS, is_multitask, target_columns, task_class_names
from agecls.tracking import check_manifest, git_commit, recording
from agecls.training.bin_search import InfeasibleBins, check_counts, draw_bins, search_spec
from agecls.training.settings import check_pipeline, resolve_auto
from agecls.training.trainer import build_trainer, prefer_swa, prepare_model, quiet_lightning
from agecls.training.trial import PruningCallback, TrialContext

log = logging.getLogger("agecls.cli.train")


def run_dir_for(cfg: DictConfig) -> Path:
    """Hydra's output folder for this job, or a fresh timestamped one when called without Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    path = Path(cfg.paths.output_dir) / "runs" / stamp
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_datamodule(cfg: DictConfig, prepared: PreparedData) -> tuple[FaceDataModule, dict[str, list[str]]]:
    """The run's datamodule over the persisted split (only `data.subset`'s rows, when set) and the classes
    of every attribute it predicts. Targets: one column per attribute (age: its bin), plus the exact age
    when the age head predicts years (see agecls.tasks.multitask)."""
    bins = AgeBins.from_config(cfg.bins)
    class_names = task_class_names(cfg.task, bins.labels)
    df = prepared.manifest.df
    labels = subset_labels(frame_targets(df, target_columns(cfg.task), bins), df, cfg.data.get("subset"))
    datamodule = FaceDataModule(
        prepared.images,
        labels,
        df["split"].to_numpy(),
        len(next(iter(class_names.values()))),
        batch_size=int(cfg.data.batch_size),
        num_workers=int(cfg.data.num_workers),
        weighted_sampler=bool(cfg.sampler.weighted_sampler),
        train_transform=build_augment(cfg.augment, cfg.data),
        seed=int(cfg.seed),
        pipeline=check_pipeline(cfg),
        image_size=int(cfg.data.image_size),
        channels_last=bool(cfg.trainer.get("channels_last", False)),
    )
    return datamodule, class_names


def build_module(
    cfg: DictConfig, resolved: dict[str, Any], datamodule: FaceDataModule, class_names: dict[str, list[str]]
) -> FaceClassifier:
    """The FaceClassifier of a run: loss class weights per attribute and, for a head predicting years, the
    training split's age mean/std, both from the training rows; and the input normalisation the datamodule
    resolved (kept in the checkpoint: `dataset` statistics need the train split to be estimated again)."""
    train_rows = datamodule.labels[datamodule.indices["train"]]
    train_rows = train_rows.reshape(len(train_rows), -1)
    weights: dict[str, list[float] | None] = {}
    for i, (attr, names) in enumerate(class_names.items()):
        column = train_rows[:, i]
        weights[attr] = class_weights(column[column >= 0], len(names), cfg.sampler.class_weights)
    age_stats = None
    if YEARS in target_columns(cfg.task):
        years = train_rows[:, -1][train_rows[:, -1] >= 0].astype(np.float64)
        age_stats = {"mean": float(years.mean()), "std": float(max(years.std(), 1.0))}
    input_stats = None
    if datamodule.mean is not None:
        input_stats = {"mean": datamodule.mean.tolist(), "std": datamodule.std.tolist()}
    if is_multitask(cfg.task):
        return FaceClassifier(resolved, class_names, weights, age_stats, input_stats)
    (attr,) = class_names
    return FaceClassifier(resolved, class_names[attr], weights[attr], age_stats, input_stats)


def train(cfg: DictConfig, trial: TrialContext | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Train one configured run end to end; return its metrics (objective = best value of cfg.objective).

    With `trial` (an Optuna study's trial), per-epoch validation values are reported to the study and the
    run stops with optuna.TrialPruned when its pruner says so. `run_dir` overrides the output folder (a
    hierarchy's stages each get their own)."""
    quiet_lightning()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic), warn_only=True)
    if run_dir is None:
        run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    draw_bins(cfg.bins, trial.trial if trial is not None else None)  # bins=search: this trial's edges
    for key, value in resolve_auto(cfg).items():
        log.info("%s=auto: %s", key, value)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    tags = {**(cfg.tracking.get("tags") or {}), "seed": cfg.seed, "git_commit": git_commit()}
    tags.update({"task": cfg.task.name, "run_dir": str(run_dir)})
    if trial is not None:
        tags.update(trial.tags(cfg.optuna.get("parent_run_id")))
        trial.trial.set_user_attr("max_epochs", int(cfg.trainer.max_epochs))
        trial.trial.set_user_attr("run_dir", str(run_dir))
    prepared = prepare_data(cfg.data, cfg.paths)
    check_manifest(cfg.tracking, prepared.manifest.hash)
    spec = search_spec(cfg.bins)
    if spec is not None and spec.min_count > 0:
        train_ages = prepared.manifest.df.loc[prepared.manifest.df["split"] == "train", "age"]
        bins = AgeBins.from_config(cfg.bins)
        try:
            check_counts(bins, bins.index(train_ages), spec.min_count)
        except InfeasibleBins as exc:
            if trial is not None:
                trial.trial.set_user_attr("infeasible", str(exc))
            raise
    with recording(cfg.tracking, run_name=cfg.tracking.get("run_name"), tags=tags) as rec:
        rec.params(flatten(resolved))
        rec.artifact(run_dir / "config.yaml", "config")
        if HydraConfig.initialized():
            overrides = run_dir / "overrides.yaml"
            task_overrides = list(HydraConfig.get().overrides.task)
            overrides.write_text(OmegaConf.to_yaml(task_overrides))
            rec.artifact(overrides, "config")
            rec.tags({"overrides": " ".join(task_overrides)[:5000]})

        manifest = prepared.manifest
        rec.tags(
            {
                "data.manifest_hash": manifest.hash,
                "data.root": str(manifest.root),
                "data.rows": len(manifest.df),
            }
        )
        datamodule, class_names = build_datamodule(cfg, prepared)
        sizes = {s: len(datamodule.indices[s]) for s in ("train", "val", "test")}
        rec.params({f"data.n_{s}": n for s, n in sizes.items()})
        log.info("data: %s  rows per split %s  manifest %s", manifest.root, sizes, manifest.hash[:12])
        module = prepare_model(cfg, build_module(cfg, resolved, datamodule, class_names))

        pruning = [PruningCallback(trial, str(cfg.objective.metric))] if trial is not None else []
        trainer, checkpoint = build_trainer(cfg, run_dir, rec, pruning)
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        best = checkpoint.best_model_path
        best_score = float(checkpoint.best_model_score) if best else float("nan")
        if best and cfg.callbacks.swa.enabled:
            best, best_score = prefer_swa(cfg, trainer, module, datamodule, best, best_score, run_dir)
        if not best:
            raise RuntimeError(
                f"no checkpoint was saved in {run_dir / 'checkpoints'}; did training run an epoch?"
            )
        state = torch.load(best, map_location=module.device, weights_only=False)
        module.load_state_dict(state["state_dict"])
        tta = choose_tta(module, datamodule, best, state, rec) if module.tta_auto else None
        if tta is not None and tta["chosen"] == "flip" and str(cfg.objective.metric) == "val/macro_f1":
            best_score = tta["val_macro_f1"]["flip"]  # the objective of the model as it will be used
        fair_attr = "age" if module.multitask else module.objective
        groups = {
            attr: (manifest.df[attr].fillna(-1).to_numpy(dtype=np.int64), names)
            for attr, names in (("gender", GENDER_NAMES), ("ethnicity", ETHNICITY_NAMES))
            if attr != fair_attr
        }
        paths = manifest.df["path"].astype(str).to_numpy()
        reused = {"val": tta.pop("val_predicted")} if tta is not None else None
        reports, fairness = evaluate_splits(
            module, datamodule, class_names, run_dir, rec, groups, paths, predicted=reused
        )

        results: dict[str, Any] = {
            "objective": best_score,
            "best_epoch": int(state["epoch"]) + 1,  # counted from 1, like MLflow steps
            "epochs_trained": int(trainer.current_epoch),
            "fit_seconds": round(fit_seconds, 2),
            "data_sizes": sizes,
        }
        for attr, by_split in reports.items():
            for split, report in by_split.items():
                for prefix in metric_prefixes(PREFIX[split], attr, module.multitask, module.objective):
                    results.update({f"{prefix}/{k}": v for k, v in report.metrics.items()})
        rec.metrics(
            {k: float(results[k]) for k in ("objective", "best_epoch", "epochs_trained", "fit_seconds")}
        )
        confusion = {a: {s: r.confmat.tolist() for s, r in by.items()} for a, by in reports.items()}
        if module.multitask:
            results["class_names"] = class_names
            for split in ("train", "val", "test"):
                results[f"confusion_{split}"] = {a: confusion[a][split] for a in class_names}
        else:
            results["class_names"] = class_names[module.objective]
            for split in ("train", "val", "test"):
                results[f"confusion_{split}"] = confusion[module.objective][split]
        test_table = reports[module.objective]["test"].table
        results["fairness_test"] = fairness["test"].to_dict(orient="records") if "test" in fairness else []
        if tta is not None:
            results["tta"] = tta
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
