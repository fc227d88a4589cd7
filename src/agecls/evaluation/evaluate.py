"""`agecls-eval`: score a trained checkpoint, or an ensemble of them, on every labelled image of a folder
(no split).

    agecls-eval ckpt=PATH data.root=DIR [eval.out=FILE] [eval.batch_size=N] [tracking.experiment=NAME]
    agecls-eval ckpt=[A,B,C] data.root=DIR                        (an ensemble: mean class probabilities)
    agecls-eval ensemble.study=NAME ensemble.top_k=3 data.root=DIR (the study's 3 best trials' checkpoints)

The checkpoint alone defines the evaluation: its hyperparameters hold the training run's resolved config
(task, bins, class names, image size, colour mode, crop margin, normalisation), so the folder is decoded and
scored exactly as that run's test split was. An ensemble's members must agree on all of that but the
weights (`agecls.evaluation.ensemble`). Its keys and their defaults: conf/eval.yaml (`agecls.cli.eval`).

This module is the command: its keys, decoding the folder and assembling the report. Which checkpoints
are scored and how (loading, normalisation, predictions, per-attribute scores) is `evaluation.scoring`; what
is written (the JSON file, the MLflow run) is `agecls.evaluation.record`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from agecls.config import default_paths
from agecls.errors import UsageError
from agecls.evaluation.ensemble import Member, collect, report_block, study_members
from agecls.evaluation.inference import Preprocess, load_checkpoint
from agecls.evaluation.record import (
    check_store,
    run_metrics,
    run_params,
    run_tags,
    tracking_config,
    write_atomic,
)
from agecls.evaluation.scoring import EvalError, score_attributes
from agecls.tracking import default_tracking


def member_checkpoints(cfg: DictConfig) -> tuple[list[Path], dict[str, Any] | None, list[Any]]:
    """The checkpoint files to score: `ckpt` (one path or a list), or the best `ensemble.top_k` trials of
    `ensemble.study`; with, for a study, its description and the picked trials (`ensemble.StudyMember`)."""
    if cfg.ensemble.study not in (None, ""):
        storage = str(cfg.ensemble.storage or default_storage())
        picked = study_members(storage, str(cfg.ensemble.study), int(cfg.ensemble.top_k))
        study = {"name": str(cfg.ensemble.study), "storage": storage, "top_k": int(cfg.ensemble.top_k)}
        return [m.checkpoint for m in picked], study, picked
    given = list(cfg.ckpt) if isinstance(cfg.ckpt, ListConfig) else [cfg.ckpt]
    paths = [Path(str(c)).expanduser() for c in given]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"ckpt={path}: no such checkpoint file")
    return paths, None, []


def default_storage() -> str:
    """optuna.storage as agecls-train composes it (AGECLS_OUTPUT_DIR or the default outputs/)."""
    return default_tracking()[2]


def score_checkpoints(
    cfg: DictConfig,
    modules: list[Any],
    ckpts: list[Path],
    data: tuple[Any, Any, Any, Any],
    study: dict[str, Any] | None,
    picked: list[Any],
) -> tuple[dict[str, dict], dict | None]:
    """`score_attributes` of the checkpoint's (or the ensemble's) predictions on `data` (decoded images,
    labelled rows, targets, their columns), and the report's `ensemble` block (None for one checkpoint).
    Faces reach each model as its `Preprocess` makes them. `cfg` is the agecls-eval config (eval.device,
    eval.batch_size, eval.num_workers)."""
    import torch
    from torch.utils.data import DataLoader

    images, rows, labels, columns = data
    device = str(cfg.eval.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = modules[0]
    preprocess = Preprocess.of(module)
    if len(modules) == 1 and study is None:  # a study's best trial alone still reports its ensemble block
        loader = DataLoader(
            preprocess.dataset(images, rows, labels),
            batch_size=int(cfg.eval.batch_size),
            num_workers=int(cfg.eval.num_workers),
        )
        module.to(device)
        return score_attributes(module.collect(loader), module.class_names), None
    members = []  # one un-normalised loader; each member normalises its batches as its own run did
    for path, member in zip(ckpts, modules, strict=True):
        mean, std = (s if s is None else s.to(device) for s in Preprocess.of(member).stats())
        members.append(Member(path, member.to(device), mean, std))
    loader = DataLoader(  # the members share image size, crop margin and colour mode (check_members)
        preprocess.dataset(images, rows, labels, normalize=False),
        batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.eval.num_workers),
    )
    predicted, per_member, rules = collect(members, loader, columns, device)
    scored = score_attributes(predicted, module.class_names)
    return scored, report_block(ckpts, per_member, module, rules, scored, study, picked)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt` (or the ensemble of checkpoints it lists or `cfg.ensemble` names) on every
    labelled image of `cfg.data.root` (a parse_args config); return the report, also written to eval.out
    and recorded in MLflow as configured."""
    started = time.perf_counter()
    folder = Path(str(cfg.data.root)).expanduser()
    ckpts, study, picked = member_checkpoints(cfg)
    if not folder.is_dir():
        raise UsageError(f"data.root={folder}: no such folder")

    import numpy as np

    from agecls.data.bins import AgeBins
    from agecls.data.cache import build_cache
    from agecls.data.prepare import frame_targets
    from agecls.data.records import folder_fingerprint, scan_folder
    from agecls.metrics import plot_confusion
    from agecls.tracking import recording

    modules = [load_checkpoint(path) for path in ckpts]
    if cfg.eval.get("tta") is not None:
        for m in modules:
            try:
                m.tta = str(cfg.eval.tta)
            except ValueError as exc:
                raise UsageError(str(exc).replace("augment.tta", "eval.tta")) from None
    if len(modules) > 1:
        from agecls.evaluation.ensemble import check_members

        check_members(ckpts, modules)
    module = modules[0]  # every member predicts and reads images as this one does
    run_cfg = module.cfg
    target = str(run_cfg.task.target)  # `multitask` for a multitask checkpoint
    size = int(run_cfg.data.image_size) + int(run_cfg.data.get("crop_margin") or 0)
    grayscale = bool(run_cfg.data.grayscale)
    paths = default_paths()
    tracking = tracking_config(run_cfg, cfg, paths)
    check_store(tracking)

    scan = scan_folder(folder, check_images=bool(cfg.eval.check_images))
    records = scan.records
    bins = AgeBins.from_config(run_cfg.bins) if "age" in module.attributes else None
    columns = max((m.columns for m in modules), key=len)  # exact age too when any member's head reads it
    labels = frame_targets(records, list(columns), bins)
    labelled = labels >= 0 if labels.ndim == 1 else (labels[:, : len(module.attributes)] >= 0).any(axis=1)
    rows = np.flatnonzero(labelled)
    if len(rows) == 0:
        raise EvalError(f"data.root={folder}: none of its {len(records)} valid images has a {target} label")

    cache_dir = Path(str(cfg.paths.cache_dir or paths.cache_dir))
    fingerprint = folder_fingerprint(folder)["sha256"]
    images = build_cache(
        [folder / p for p in records["path"]],
        cache_dir,
        key=f"eval-{fingerprint[:24]}",  # the folder's names and sizes; size and mode are in the file name
        size=size,
        grayscale=grayscale,
    )
    scored, ensemble = score_checkpoints(cfg, modules, ckpts, (images, rows, labels, columns), study, picked)
    headline = scored[module.objective]
    report = headline.pop("report")
    class_names = headline["class_names"]

    result: dict[str, Any] = {
        # an ensemble: the list of its members' checkpoints
        "checkpoint": str(ckpts[0].resolve()) if ensemble is None else [str(p.resolve()) for p in ckpts],
        "folder": str(folder.resolve()),
        "task": target,
        "class_names": class_names,
        "n_images": len(rows),
        "n_rejected": len(scan.rejected),
        "n_unlabelled": int(len(records) - len(rows)),
        **{k: headline[k] for k in ("macro_f1", "acc", "per_class", "confusion_matrix")},
        "rejected": scan.rejected.head(100).to_dict(orient="records"),
        "image_size": int(run_cfg.data.image_size),
        "grayscale": grayscale,
        "tta": modules[0].tta if len({m.tta for m in modules}) == 1 else [m.tta for m in modules],
        "bins": bins.to_dict() if bins is not None else None,
        "folder_fingerprint": fingerprint,
        "mlflow_run_id": None,
    }
    if "mae" in headline:  # an age head predicting years: mean absolute error in years
        result["mae"] = headline["mae"]
    if module.multitask:  # every attribute's scores; the top-level ones are the objective attribute's
        result["objective_attribute"] = module.objective
        result["attributes"] = {a: {k: v for k, v in d.items() if k != "report"} for a, d in scored.items()}
    if ensemble is not None:
        result["ensemble"] = ensemble

    tags = run_tags(result, modules, ckpts, study, picked)
    default_name = (
        f"eval {folder.name}" if ensemble is None else f"eval ensemble of {len(ckpts)} {folder.name}"
    )
    run_name = tracking.get("run_name") or default_name
    with recording(tracking, run_name=run_name, tags=tags) as rec, tempfile.TemporaryDirectory() as tmp:
        result["mlflow_run_id"] = rec.run_id
        result["seconds"] = round(time.perf_counter() - started, 2)
        text = json.dumps(result, indent=2) + "\n"
        if cfg.eval.out:
            write_atomic(Path(str(cfg.eval.out)).expanduser(), text)
        if rec.enabled:
            rec.params(run_params(result, cfg, study))
            rec.metrics(run_metrics(result))
            report_file = Path(tmp) / "eval.json"
            report_file.write_text(text)
            rec.artifact(report_file, "evaluation")
            png = plot_confusion(report.confmat, class_names, Path(tmp) / "confusion_eval.png", folder.name)
            rec.artifact(png, "evaluation")
    return result
