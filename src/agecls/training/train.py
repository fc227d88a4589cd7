"""One training run as a pipeline: settle the config, prepare the data, build the datamodule and model,
fit, hand the chosen checkpoint to agecls.evaluation.postfit for scoring, return the results."""

from __future__ import annotations

import logging
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
from agecls.data.datamodule import FaceDataModule, group_weights, labelled_rows
from agecls.data.faces.framing import manifest_framing
from agecls.data.manifest import Manifest
from agecls.data.prepare import PreparedData, frame_labels, frame_targets, prepare_data, subset_labels
from agecls.evaluation.postfit import score_fit
from agecls.tasks.classification import class_weights
from agecls.tasks.module import FaceClassifier
from agecls.tasks.multitask import YEARS, is_multitask, target_columns, task_class_names
from agecls.tracking import Recorder, check_manifest, end_dead_runs, recording
from agecls.training.bin_search import check_min_count, draw_bins
from agecls.training.resume import continue_run, run_start
from agecls.training.settings import check_pipeline, resolve_auto
from agecls.training.trainer import build_trainer, fit_best, prepare_model, quiet_lightning
from agecls.training.trial import NoTrial, TrialContext
from agecls.training.validation import validate

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, prepared: PreparedData) -> tuple[FaceDataModule, dict[str, list[str]]]:
    """The run's datamodule over the persisted split (only `data.subset`'s rows, when set) and the classes
    of every attribute it predicts. Targets: one column per attribute (age: its bin), plus the exact age
    when the age head predicts years (see agecls.tasks.multitask).

    A weighted sampler over `sampler.groups` other than the class alone, or with `sampler.power` below 1,
    draws each training face with weight 1 / size**power of its group (group sizes over the training
    rows): `target` is the task's class (its primary attribute), `age` the age bin, `gender` and
    `ethnicity` the manifest's; faces with an unknown value form their own group."""
    bins = AgeBins.from_config(cfg.bins)
    class_names = task_class_names(cfg.task, bins.labels)
    df = prepared.manifest.df
    labels = subset_labels(frame_targets(df, target_columns(cfg.task), bins), df, cfg.data.get("subset"))
    weights = None
    groups = list(cfg.sampler.get("groups") or ["target"])
    power = float(cfg.sampler.get("power", 1.0))
    if cfg.sampler.weighted_sampler and (groups != ["target"] or power != 1.0):
        primary = labels if labels.ndim == 1 else labels[:, 0]
        codes = np.stack([primary if g == "target" else frame_labels(df, g, bins) for g in groups], axis=1)
        train = labelled_rows(labels, df["split"].to_numpy(), "train")
        weights = np.zeros(len(labels))
        weights[train] = group_weights(codes[train], power)
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
        sampling_weights=weights,
    )
    return datamodule, class_names


def build_module(
    cfg: DictConfig,
    resolved: dict[str, Any],
    datamodule: FaceDataModule,
    class_names: dict[str, list[str]],
    framing: dict[str, dict[str, Any]] | None = None,
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
        return FaceClassifier(resolved, class_names, weights, age_stats, input_stats, framing)
    (attr,) = class_names
    return FaceClassifier(resolved, class_names[attr], weights[attr], age_stats, input_stats, framing)


def train(
    cfg: DictConfig,
    trial: TrialContext | None = None,
    run_dir: Path | None = None,
    *,
    validated: list[str] | None = None,
) -> dict[str, Any]:
    """Train one configured run end to end; return its metrics (objective = best value of cfg.objective).

    With `trial` (an Optuna study's trial), per-epoch validation values are reported to the study and the
    run stops with optuna.TrialPruned when its pruner says so. `run_dir` overrides the output folder (a
    hierarchy's stages each get their own).

    With `trainer.resume` (see `resume.resume_point`) the run continues from its last epoch's checkpoint,
    in its own folder and MLflow run. `validated`: validate(cfg)'s warnings when the caller has validated
    this very config (agecls-train, before Hydra starts), so it is not validated twice."""
    quiet_lightning()
    job = trial or NoTrial()
    cfg, run_dir, last = run_start(cfg, run_dir, job.in_study)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic), warn_only=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    draw_bins(cfg.bins, job.trial)  # bins=search: this trial's edges
    resolved = settle(cfg, validated if last is None else None)  # a resumed run has its saved config
    if not job.in_study:  # a study's sweeper ends its dead runs, once, not each trial (a store-wide search)
        end_dead_runs(cfg.tracking)  # before a resume: the run it continues may be one of them
    resumed_run_id = continue_run(cfg, resolved, run_dir, last)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    tags = {**(cfg.tracking.get("tags") or {}), "seed": cfg.seed, "task": cfg.task.name}
    tags.update({"run_dir": str(run_dir), **job.start_run(cfg, run_dir)})
    prepared = prepare_data(cfg.data, cfg.paths)
    manifest = prepared.manifest
    check_manifest(cfg.tracking, manifest.hash)
    check_min_count(cfg.bins, manifest.df, job.trial)
    with recording(cfg.tracking, job.run_name(cfg), tags, run_id=resumed_run_id, run_dir=run_dir) as rec:
        record_inputs(rec, resolved, run_dir, manifest)
        datamodule, class_names = build_datamodule(cfg, prepared)
        sizes = {s: len(datamodule.indices[s]) for s in ("train", "val", "test")}
        rec.params({f"data.n_{s}": n for s, n in sizes.items()})
        log.info("data: %s  rows per split %s  manifest %s", manifest.root, sizes, manifest.hash[:12])
        framing = manifest_framing(cfg.data, cfg.paths.cache_dir, manifest)
        module = prepare_model(cfg, build_module(cfg, resolved, datamodule, class_names, framing))
        trainer, checkpoint = build_trainer(cfg, run_dir, rec, job.pruning_callbacks(cfg))
        fitted = fit_best(cfg, trainer, checkpoint, module, datamodule, run_dir, last)
        results, test_table = score_fit(
            cfg, module, datamodule, class_names, manifest.df, run_dir, rec, fitted, job.in_study
        )
        job.record_objectives(results["objectives"])
    log.info(
        "best epoch %d: val macro-F1 %.4f, test macro-F1 %.4f (%s)",
        results["best_epoch"],
        results["best_val/macro_f1"],
        results["test/macro_f1"],
        run_dir,
    )
    log.info("per-class test F1:\n%s", test_table.to_string(index=False, float_format="%.3f"))
    return results


def settle(cfg: DictConfig, validated: list[str] | None = None) -> dict[str, Any]:
    """Check every configured value (warnings logged; `validated`: the warnings of a check already made) and
    resolve the `auto` ones in place, before any data is prepared or an MLflow run opens; returns the
    resolved config as plain containers."""
    for warning in validate(cfg) if validated is None else validated:
        log.warning(warning)
    for key, value in resolve_auto(cfg).items():
        log.info("%s=auto: %s", key, value)
    return OmegaConf.to_container(cfg, resolve=True)


def record_inputs(rec: Recorder, resolved: dict[str, Any], run_dir: Path, manifest: Manifest) -> None:
    """Record what the run was given: its config (params, config.yaml), the command's overrides and the
    manifest it trains on."""
    rec.params(flatten(resolved))
    rec.artifact(run_dir / "config.yaml", "config")
    if HydraConfig.initialized():
        overrides = run_dir / "overrides.yaml"
        task_overrides = list(HydraConfig.get().overrides.task)
        overrides.write_text(OmegaConf.to_yaml(task_overrides))
        rec.artifact(overrides, "config")
        rec.tags({"overrides": " ".join(task_overrides)[:5000]})
    rec.tags(
        {"data.manifest_hash": manifest.hash, "data.root": str(manifest.root), "data.rows": len(manifest.df)}
    )
