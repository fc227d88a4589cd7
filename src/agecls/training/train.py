"""`agecls-train`: one Hydra-configured training run (or, with -m, a sweep of them)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from agecls.config import flatten
from agecls.data.augment import build_augment
from agecls.data.bins import AgeBins
from agecls.data.datamodule import FaceDataModule, group_weights, labelled_rows
from agecls.data.prepare import PreparedData, frame_labels, frame_targets, prepare_data, subset_labels
from agecls.errors import UsageError
from agecls.evaluation.objectives import compute_objectives, missing_objectives
from agecls.evaluation.splits import PREFIX, choose_tta, evaluate_splits, metric_prefixes
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES, class_weights
from agecls.tasks.module import FaceClassifier
from agecls.tasks.multitask import YEARS, is_multitask, target_columns, task_class_names
from agecls.tracking import (
    check_manifest,
    end_dead_runs,
    overrides_run_name,
    process_gone,
    read_run_file,
    recording,
    trial_run_name,
    write_run_file,
)
from agecls.training.bin_search import InfeasibleBins, check_counts, draw_bins, search_spec
from agecls.training.settings import check_pipeline, resolve_auto, validate
from agecls.training.trainer import (
    LAST_CHECKPOINT,
    build_trainer,
    prefer_swa,
    prepare_model,
    quiet_lightning,
)
from agecls.training.trial import PruningCallback, TrialContext

log = logging.getLogger("agecls.cli.train")
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


def run_objectives(
    cfg: DictConfig,
    module: FaceClassifier,
    results: dict[str, Any],
    fairness_val: pd.DataFrame | None,
    best_score: float,
    strict: bool = False,
) -> dict[str, float]:
    """The run's objectives (agecls.evaluation.objectives) on validation at the selected checkpoint.
    `val/macro_f1` is the single objective's value when that is objective.metric (flip TTA included, as
    chosen), else the evaluated validation macro-F1. When objective.metrics names one that cannot be computed
    for this run (e.g. a gap over a validation split with faces of one group only): UsageError if `strict`
    (a trial, which must tell every value), else a warning."""
    wanted = [str(m) for m in (cfg.objective.get("metrics") or [])]
    macro_f1 = best_score if str(cfg.objective.metric) == "val/macro_f1" else results["best_val/macro_f1"]
    values = compute_objectives(
        macro_f1=macro_f1,
        fairness=fairness_val,
        module=module,
        fit_seconds=float(results["fit_seconds"]),
        image_size=int(cfg.data.image_size),
        channels=1 if cfg.data.get("grayscale", True) else 3,
        channels_last=bool(cfg.trainer.get("channels_last", False)),
        wanted=wanted,
    )
    why = missing_objectives(values, wanted, fairness_val)
    if why and strict:
        raise UsageError(f"objective.metrics: {why}")
    if why:
        log.warning("objective.metrics: %s", why)
    return values


def train(cfg: DictConfig, trial: TrialContext | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Train one configured run end to end; return its metrics (objective = best value of cfg.objective).

    With `trial` (an Optuna study's trial), per-epoch validation values are reported to the study and the
    run stops with optuna.TrialPruned when its pruner says so. `run_dir` overrides the output folder (a
    hierarchy's stages each get their own).

    With `trainer.resume` (see `resume_point`) the run continues from its last epoch's checkpoint, in its
    own folder and MLflow run."""
    quiet_lightning()
    last = None
    if cfg.trainer.get("resume") is not None:
        if trial is not None or run_dir is not None:
            raise UsageError(
                f"trainer.resume={cfg.trainer.resume}: only a plain run is resumed (a study re-queues its "
                "interrupted trials itself; a hierarchy's stages are not resumed); valid: trainer.resume=null"
            )
        cfg, run_dir, last = resume_point(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic), warn_only=True)
    if run_dir is None:
        run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    draw_bins(cfg.bins, trial.trial if trial is not None else None)  # bins=search: this trial's edges
    for warning in validate(cfg):  # every value, before any data is prepared or an MLflow run opens
        log.warning(warning)
    for key, value in resolve_auto(cfg).items():
        log.info("%s=auto: %s", key, value)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    end_dead_runs(cfg.tracking)  # before a resume: the run it continues may be one of them
    resumed_run_id = None
    if last is not None:
        if str(cfg.trainer.resume) == "auto":
            check_same_run(resolved, run_dir)
        marker = read_run_file(run_dir)
        resumed_run_id = marker.get("mlflow_run_id") if cfg.tracking.enabled else None
        if cfg.tracking.enabled and resumed_run_id is None:
            log.warning("trainer.resume: %s names no MLflow run; recording a new one", run_dir / "run.json")
        write_run_file(run_dir, resumed_from=str(last), resumes=int(marker.get("resumes", 0)) + 1)
        log.info("resuming %s from %s (MLflow run %s)", run_dir, last, resumed_run_id)
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    tags = {**(cfg.tracking.get("tags") or {}), "seed": cfg.seed}
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
    run_name = cfg.tracking.get("run_name")
    if trial is not None:  # one name per trial, even when the study's command gives one
        run_name = trial_run_name(trial.number, trial.trial.params, run_name)
    elif not run_name:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        run_name = overrides_run_name(overrides, fallback=f"{cfg.task.name} defaults")
    with recording(cfg.tracking, run_name, tags, run_id=resumed_run_id, run_dir=run_dir) as rec:
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

        report = str(cfg.optuna.get("report") or "best")
        # optuna's pruners work with one objective: a study with several stops trials by early stopping only
        prune = trial is not None and not trial.multi_objective
        # a warm start is the study's known floor: it runs to the end unless optuna.prune_warm_starts
        keep = bool(trial is not None and trial.warm_start and not cfg.optuna.get("prune_warm_starts", False))
        pruning = [PruningCallback(trial, str(cfg.objective.metric), report, keep)] if prune else []
        trainer, checkpoint = build_trainer(cfg, run_dir, rec, pruning)
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
        objectives = run_objectives(cfg, module, results, fairness.get("val"), best_score, trial is not None)
        results["objectives"] = objectives
        rec.metrics({f"objectives/{k}": v for k, v in objectives.items()})
        if trial is not None:
            trial.record_objectives(objectives)
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
