"""`agecls-train`: one Hydra-configured training run (or, with -m, a sweep of them)."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, StochasticWeightAveraging
from omegaconf import DictConfig, OmegaConf, open_dict

from agecls.batch_augment import TTA_CHOICES
from agecls.bin_search import InfeasibleBins, check_counts, draw_bins, search_spec
from agecls.config import CONFIG_DIR, flatten
from agecls.data.augment import build_augment
from agecls.data.bins import AgeBins
from agecls.data.datamodule import FaceDataModule
from agecls.data.prepare import PreparedData, frame_targets, prepare_data
from agecls.ema import build_ema
from agecls.hierarchical import run_hierarchy, subset_labels
from agecls.metrics import StageReport, plot_confusion, stage_report
from agecls.module import FaceClassifier
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES, class_weights
from agecls.tasks.multitask import YEARS, is_multitask, target_columns, task_class_names
from agecls.tracking import EpochLogger, Recorder, check_manifest, git_commit, recording
from agecls.trial import PruningCallback, TrialContext

log = logging.getLogger("agecls.train")

# Trainer-group keys that configure callbacks rather than lightning.Trainer itself.
_CALLBACK_KEYS = ("early_stopping", "checkpoint", "swa", "ema")
# Trainer-group keys that configure the model's memory layout and compilation (see `prepare_model`).
_MODEL_KEYS = ("channels_last", "compile")
_COMPILE_KEYS = ("enabled", "mode", "backend", "dynamic", "fullgraph")
# Metric-name prefix of each split's scores with the best checkpoint (val's per-epoch values are `val/`).
_PREFIX = {"train": "best_train", "val": "best_val", "test": "test"}


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


def build_trainer(
    cfg: DictConfig, run_dir: Path, rec: Recorder, extra_callbacks: list[L.Callback] | None = None
) -> tuple[L.Trainer, ModelCheckpoint]:
    """lightning.Trainer from the trainer group, with best-checkpoint and early-stopping callbacks,
    logging each epoch's metrics to `rec`."""
    resolve_auto(cfg)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    stop_cfg, ckpt_cfg, swa_cfg, ema_cfg = (trainer_cfg.pop(k, None) or {} for k in _CALLBACK_KEYS)
    for key in _MODEL_KEYS:
        trainer_cfg.pop(key, None)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=ckpt_cfg["monitor"],
        mode=ckpt_cfg["mode"],
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks: list[L.Callback] = [checkpoint, *(extra_callbacks or [])]
    if stop_cfg.pop("enabled"):
        callbacks.append(EarlyStopping(**stop_cfg))
    ema = build_ema(ema_cfg)
    if ema is not None and swa_cfg.get("enabled"):
        raise ValueError(
            "trainer.ema.enabled=true and trainer.swa.enabled=true: two weight averages of one run; "
            "valid: enable one of them"
        )
    if swa_cfg.pop("enabled", False):
        callbacks.append(StochasticWeightAveraging(**swa_cfg))
    if ema is not None:
        callbacks.append(ema)
    trainer = L.Trainer(**trainer_cfg, callbacks=callbacks, logger=EpochLogger(rec), default_root_dir=run_dir)
    return trainer, checkpoint


def prepare_model(cfg: DictConfig, module: FaceClassifier) -> FaceClassifier:
    """Apply `trainer.channels_last` (the module's weights in channels-last memory; the datamodule hands it
    channels-last batches) and `trainer.compile` (torch.compile of the network, in place: `module.model`
    keeps its parameters and state_dict keys, so checkpoints load without it)."""
    resolve_auto(cfg)
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


def _several_devices(cfg: DictConfig) -> bool:
    devices = cfg.trainer.get("devices", 1)
    return (isinstance(devices, int) and devices > 1) or (
        not isinstance(devices, int) and str(devices) != "1"
    )


def _on_cuda(cfg: DictConfig) -> bool:
    """Whether this run trains on a CUDA GPU (trainer.accelerator auto, gpu or cuda, and CUDA present)."""
    return (
        str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    )


def resolve_auto(cfg: DictConfig) -> dict[str, str]:
    """Replace the `auto` values of data.pipeline, trainer.precision and trainer.channels_last in `cfg` by
    what this machine runs, so the saved config, MLflow params and checkpoint record the real setting; and
    trainer.early_stopping.enabled by what the scheduler allows (off under a whole-run schedule).

    On a CUDA GPU: the device pipeline (when there is one device and every augment.train step has a device
    version; else the loader pipeline), bf16-mixed precision (when the GPU supports bf16, else 32-true) and
    channels_last. Anywhere else: the loader pipeline, 32-true, contiguous memory. Returns {key: reason} for
    the keys it resolved."""
    cuda = _on_cuda(cfg)
    why: dict[str, str] = {}
    with open_dict(cfg):
        if str(cfg.data.get("pipeline", "auto")) == "auto":
            pipeline, reason = ("device", "a CUDA GPU") if cuda else ("loader", "no CUDA GPU")
            if cuda and _several_devices(cfg):
                pipeline, reason = "loader", f"trainer.devices={cfg.trainer.devices}"
            if pipeline == "device":
                from agecls.data.device_augment import translate_pipeline

                try:
                    translate_pipeline(build_augment(cfg.augment, cfg.data).train)
                except ValueError as exc:
                    pipeline, reason = (
                        "loader",
                        str(exc).split(" has no device version")[0] + " has no device version",
                    )
            cfg.data.pipeline = pipeline
            why["data.pipeline"] = f"{pipeline} ({reason})"
        if str(cfg.trainer.get("precision", "auto")) == "auto":
            bf16 = cuda and torch.cuda.is_bf16_supported()
            cfg.trainer.precision = "bf16-mixed" if bf16 else "32-true"
            why["trainer.precision"] = f"{cfg.trainer.precision} ({'a bf16 GPU' if bf16 else 'no bf16 GPU'})"
        if cfg.trainer.get("channels_last", False) not in (True, False, "auto"):
            raise ValueError(f"trainer.channels_last={cfg.trainer.channels_last!r}; valid: true, false, auto")
        if str(cfg.trainer.get("channels_last", False)) == "auto":
            cfg.trainer.channels_last = cuda
            why["trainer.channels_last"] = f"{str(cuda).lower()} ({'a CUDA GPU' if cuda else 'no CUDA GPU'})"
        stop = cfg.trainer.get("early_stopping")
        enabled = None if stop is None else stop.get("enabled")
        if stop is not None and enabled not in (True, False, "auto"):
            raise ValueError(f"trainer.early_stopping.enabled={enabled!r}; valid: true, false, auto")
        if enabled == "auto":
            scheduler = cfg.get("scheduler") or {}
            planned = sorted(scheduler.get("from_trainer") or {})
            stop.enabled = not planned
            name = scheduler.get("name", "none")
            why["trainer.early_stopping.enabled"] = (
                f"false (scheduler={name} plans the whole run: {', '.join(planned)} from the trainer)"
                if planned
                else f"true (scheduler={name} does not plan the run's length)"
            )
    return why


def check_pipeline(cfg: DictConfig) -> str:
    """`data.pipeline` (after resolve_auto), checked against the trainer: the device pipeline stages the
    cache on one device, so it needs trainer.devices=1."""
    resolve_auto(cfg)
    pipeline = str(cfg.data.get("pipeline", "loader"))
    if pipeline not in ("loader", "device"):
        raise ValueError(f"data.pipeline={pipeline!r}; valid: auto, loader, device")
    devices = cfg.trainer.get("devices", 1)
    if pipeline == "device" and _several_devices(cfg):
        raise ValueError(
            f"data.pipeline=device stages the image cache on one device, but trainer.devices={devices}; "
            f"valid: trainer.devices=1, or data.pipeline=loader for several devices"
        )
    return pipeline


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


def choose_tta(
    module: FaceClassifier, datamodule: FaceDataModule, best: str, state: dict, rec: Recorder
) -> dict:
    """`augment.tta=auto`: score the loaded best checkpoint on validation without and with flip TTA (macro-F1
    of the objective attribute) and keep the better (a tie keeps `none`, half the inference cost). The
    choice is set on `module` and written into the checkpoint's config (atomically), so every later reader
    of the checkpoint uses it. Returns {"chosen", "val_macro_f1": {mode: score}, "val_predicted": the chosen
    mode's `module.collect` of validation (so `evaluate_splits` need not predict it a third time)}."""
    loader = datamodule.eval_dataloader("val")
    names = module.class_names[module.objective]
    scores, predicted = {}, {}
    for mode in TTA_CHOICES:
        module.tta = mode
        predicted[mode] = module.collect(loader)
        got = predicted[mode][module.objective]
        known = got["labels"] >= 0
        scores[mode] = float(
            stage_report(got["preds"][known], got["labels"][known], names).metrics["macro_f1"]
        )
    chosen = "flip" if scores["flip"] > scores["none"] else "none"
    module.tta = chosen
    state["hyper_parameters"]["cfg"]["augment"]["tta"] = chosen
    tmp = Path(best).with_name(f".{Path(best).name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, best)
    log.info("augment.tta=auto: validation macro-F1 %s; chose %s", scores, chosen)
    rec.tags({"augment.tta_chosen": chosen})
    rec.metrics({f"tta_val/{mode}/macro_f1": score for mode, score in scores.items()})
    return {"chosen": chosen, "val_macro_f1": scores, "val_predicted": predicted[chosen]}


def subgroup_scores(
    preds: torch.Tensor,
    labels: torch.Tensor,
    groups: dict[str, tuple[np.ndarray, tuple[str, ...]]],
    class_names,
) -> pd.DataFrame:
    """Macro-F1 and accuracy of the task within each value of other attributes (e.g. age F1 by gender)."""
    rows = []
    for attr, (codes, names) in groups.items():
        for code, name in enumerate(names):
            mask = torch.from_numpy(codes == code)
            if int(mask.sum()) == 0:
                continue
            scores = stage_report(preds[mask], labels[mask], class_names).metrics
            rows.append({"attribute": attr, "group": name, "n": int(mask.sum()), **scores})
    return pd.DataFrame(rows, columns=["attribute", "group", "n", "macro_f1", "acc"])


def _write_report(report: StageReport, names: list[str], run_dir: Path, split: str, suffix: str, rec) -> None:
    """per_class_{split}{suffix}.csv and confusion_{split}{suffix}.png of one attribute, recorded."""
    csv_path = run_dir / f"per_class_{split}{suffix}.csv"
    report.table.to_csv(csv_path, index=False)
    title = f"{split}{suffix.replace('_', ' ')} (best checkpoint)"
    png = plot_confusion(report.confmat, names, run_dir / f"confusion_{split}{suffix}.png", title)
    for path in (csv_path, png):
        rec.artifact(path, "evaluation")


def evaluate_splits(
    module: FaceClassifier,
    datamodule: FaceDataModule,
    class_names: dict[str, list[str]],
    run_dir: Path,
    rec: Recorder,
    groups: dict[str, tuple[np.ndarray, tuple[str, ...]]] | None = None,
    paths: np.ndarray | None = None,
    predicted: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None,
) -> tuple[dict[str, dict[str, StageReport]], dict[str, pd.DataFrame]]:
    """Score the loaded (best) model on train, val and test, per attribute ({attribute: {split: report}};
    report.metrics holds macro_f1, acc and, for heads predicting years, mae); write and record tables and
    confusion plots (multitask: one per attribute, named `..._{split}_{attribute}`), and each face's
    prediction on val and test (`predictions_{split}.csv`, see `prediction_table`; `paths`: the manifest's
    image path per row).

    `groups` (attribute -> (code per manifest row, -1 if unknown; group names)) adds the fairness view of
    the age task (a single task: its target): its macro-F1 within each group, on val and test. `predicted`
    ({split: `module.collect` output}) reuses predictions already made by the same model and TTA mode."""
    multi = module.multitask
    fair_attr = "age" if multi else module.objective
    reports: dict[str, dict[str, StageReport]] = {a: {} for a in class_names}
    fairness: dict[str, pd.DataFrame] = {}
    for split in ("train", "val", "test"):
        made = (predicted or {}).get(split) or module.collect(datamodule.eval_dataloader(split))
        if split != "train":
            table = prediction_table(made, datamodule.indices[split], paths, module.multitask, class_names)
            table.to_csv(run_dir / f"predictions_{split}.csv", index=False)
            rec.artifact(run_dir / f"predictions_{split}.csv", "evaluation")
        for attr, names in class_names.items():
            got = made[attr]
            known = got["labels"] >= 0
            preds, labels = got["preds"][known], got["labels"][known]
            report = stage_report(preds, labels, names)
            if "years" in got:
                report.metrics["mae"] = float((got["years"][known] - got["true_years"][known]).abs().mean())
            _write_report(report, names, run_dir, split, f"_{attr}" if multi else "", rec)
            prefixes = _metric_prefixes(_PREFIX[split], attr, multi, module.objective)
            for prefix in prefixes:
                rec.metrics({f"{prefix}/{k}": v for k, v in report.metrics.items()})
                rec.metrics({f"{prefix}/f1_{r['class']}": float(r["f1"]) for _, r in report.table.iterrows()})
            reports[attr][split] = report
            if groups and split != "train" and attr == fair_attr:
                rows = datamodule.indices[split][known.numpy()]
                table = subgroup_scores(
                    preds, labels, {a: (c[rows], n) for a, (c, n) in groups.items()}, names
                )
                table.to_csv(run_dir / f"fairness_{split}.csv", index=False)
                rec.artifact(run_dir / f"fairness_{split}.csv", "evaluation")
                rec.metrics(
                    {
                        f"{prefixes[0]}/macro_f1_by_{r.attribute}/{r.group}": float(r.macro_f1)
                        for r in table.itertuples()
                    }
                )
                fairness[split] = table
    return reports, fairness


def prediction_table(
    predicted: dict[str, dict[str, torch.Tensor]],
    rows: np.ndarray,
    paths: np.ndarray | None,
    multi: bool,
    class_names: dict[str, list[str]],
) -> pd.DataFrame:
    """One line per face of a split: `row` (its manifest row), `path`, and per attribute the true and the
    predicted class index (`label`, `pred`; multitask: `label_<attribute>`, ...; -1: the face lacks that
    label), `years`/`pred_years` for heads predicting exact age, and the class probabilities (`p_<class>`;
    multitask `p_<attribute>_<class>`; `FaceClassifier.predict_proba`'s, rounded to 5 decimals). Two runs
    on the same split list the same rows in the same order, so their predictions can be compared face by
    face (paired bootstrap) or averaged (an ensemble); `class_names` gives the classes' order."""
    columns: dict[str, Any] = {"row": rows}
    if paths is not None:
        columns["path"] = paths[rows]
    for attr, got in predicted.items():
        suffix = f"_{attr}" if multi else ""
        columns[f"label{suffix}"] = got["labels"].numpy()
        columns[f"pred{suffix}"] = got["preds"].numpy()
        if "years" in got:
            columns[f"years{suffix}"] = got["true_years"].numpy()
            columns[f"pred_years{suffix}"] = got["years"].double().numpy().round(2)
        proba = got["proba"].double().numpy().round(5)
        for k, name in enumerate(class_names[attr]):
            columns[f"p{suffix}_{name}"] = proba[:, k]
    return pd.DataFrame(columns)


def _metric_prefixes(prefix: str, attr: str, multi: bool, objective: str) -> list[str]:
    """Where an attribute's scores are recorded: `prefix` (single task), `prefix/attr` (multitask), and
    also `prefix` for the multitask objective attribute."""
    if not multi:
        return [prefix]
    return [f"{prefix}/{attr}", prefix] if attr == objective else [f"{prefix}/{attr}"]


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
    _quiet_lightning()
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
        if best and cfg.trainer.get("swa", {}).get("enabled"):
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
                for prefix in _metric_prefixes(_PREFIX[split], attr, module.multitask, module.objective):
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


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns the objective so Hydra sweepers can optimise it.

    As a trial of an Optuna study (`optuna.trial` set by agecls's sweeper) it also tells the study the
    outcome: COMPLETE with the objective, PRUNED, or FAIL with the error (the run's exception is re-raised).
    """
    trial = TrialContext.from_cfg(cfg)
    if cfg.get("hierarchy") and cfg.hierarchy.get("by"):
        if trial is not None:
            from agecls.hierarchical import HierarchyError

            raise HierarchyError("hierarchy=... runs are not yet supported as Optuna trials; use a grid (-m)")
        return run_hierarchy(cfg, run_dir_for(cfg))["objective"]
    if trial is None:
        return train(cfg)["objective"]
    import optuna

    try:
        results = train(cfg, trial)
    except (optuna.TrialPruned, InfeasibleBins) as exc:
        if isinstance(exc, InfeasibleBins):
            log.warning("trial %d: infeasible bins, pruned before training: %s", trial.number, exc)
        trial.pruned()
        return None
    except Exception as exc:
        trial.failed(exc)
        raise
    attrs = {
        k: results[k] for k in ("mlflow_run_id", "run_dir", "checkpoint", "best_epoch", "epochs_trained")
    }
    attrs.update({k: results[k] for k in ("test/macro_f1", "fit_seconds") if k in results})
    trial.complete(results["objective"], attrs)
    return results["objective"]


if __name__ == "__main__":
    main()
