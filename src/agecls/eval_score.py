"""What agecls-eval scores and how: the checkpoints (`ckpt`, or an Optuna study's best trials), the input
normalisation each needs, the predictions of one checkpoint or of an ensemble on decoded images, and each
attribute's scores (macro-F1, accuracy, per class, confusion matrix, MAE in years) as the report and the
ensemble block show them.

Heavy imports (torch, the data modules, the ensemble) happen inside the functions, so `agecls-eval --help`
stays fast; `agecls.ensemble` imports this module, never the other way round at import time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from agecls.cli_args import UsageError


class EvalError(ValueError):
    """The checkpoint or the folder cannot be evaluated (exit code 1)."""


def member_checkpoints(cfg: DictConfig) -> tuple[list[Path], dict[str, Any] | None, list[Any]]:
    """The checkpoint files to score: `ckpt` (one path or a list), or the best `ensemble.top_k` trials of
    `ensemble.study`; with, for a study, its description and the picked trials (`ensemble.StudyMember`)."""
    if cfg.ensemble.study not in (None, ""):
        from agecls.ensemble import study_members

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
    from agecls.report import default_tracking

    return default_tracking()[2]


def load_checkpoint(path: Path):
    """The FaceClassifier saved at `path` (on the CPU), or EvalError naming the file."""
    from agecls.module import FaceClassifier

    try:
        return FaceClassifier.load_from_checkpoint(path, map_location="cpu")
    except Exception as exc:
        raise EvalError(
            f"ckpt={path}: not a loadable agecls checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def normalize_stats(run_cfg: DictConfig, images, rows, stored=None) -> tuple[Any, Any] | None:
    """(mean, std) the checkpoint's run normalised with, or None for data.normalize=none.

    `stored` is the checkpoint's `input_stats` (FaceClassifier): what the datamodule resolved, used as is.
    Checkpoints saved before it was kept have None there; their `dataset` statistics are recomputed from
    the training run's own train split (its persisted manifest and cached images, as recorded in the
    checkpoint's config), which fails with EvalError when that data is gone."""
    import numpy as np

    from agecls.data.augment import resolve_normalize

    if stored is not None:
        return np.asarray(stored["mean"], np.float32), np.asarray(stored["std"], np.float32)
    spec = run_cfg.data.get("normalize", "none")
    if spec != "dataset":
        return resolve_normalize(spec, images, rows)
    from agecls.data.prepare import data_lock, resolve_manifest

    try:
        with data_lock(run_cfg.paths.data_dir):
            manifest = resolve_manifest(run_cfg.data, run_cfg.paths)
        from agecls.data.cache import build_cache

        train_images = build_cache(
            [manifest.root / p for p in manifest.df["path"]],
            run_cfg.paths.cache_dir,
            key=manifest.hash,
            size=int(run_cfg.data.image_size) + int(run_cfg.data.get("crop_margin") or 0),
            grayscale=bool(run_cfg.data.grayscale),
        )
    except (ValueError, OSError) as exc:
        raise EvalError(
            "the checkpoint was trained with data.normalize=dataset, whose mean/std come from its train "
            f"split, and that split cannot be read again ({exc})"
        ) from None
    train_rows = np.flatnonzero(manifest.df["split"].to_numpy() == "train")
    return resolve_normalize("dataset", train_images, train_rows)


def score_checkpoints(
    cfg, modules, ckpts, data, transforms, study, picked
) -> tuple[dict[str, dict], dict | None]:
    """`score_attributes` of the checkpoint's (or the ensemble's) predictions on `data` (decoded images,
    labelled rows, targets, their columns), and the report's `ensemble` block (None for one checkpoint).
    `cfg` is the agecls-eval config (eval.device, eval.batch_size, eval.num_workers)."""
    import torch
    from torch.utils.data import DataLoader

    from agecls.data.datamodule import FaceDataset

    images, rows, labels, columns = data
    device = str(cfg.eval.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = modules[0]
    if len(modules) == 1 and study is None:  # a study's best trial alone still reports its ensemble block
        stats = normalize_stats(module.cfg, images, rows, module.input_stats)
        mean, std = stats if stats is not None else (None, None)
        loader = DataLoader(
            FaceDataset(images, rows, labels, transforms.eval, mean, std),
            batch_size=int(cfg.eval.batch_size),
            num_workers=int(cfg.eval.num_workers),
        )
        module.to(device)
        return score_attributes(module.collect(loader), module.class_names), None
    from agecls.ensemble import Member, collect, report_block

    members = []  # one un-normalised loader; each member normalises its batches as its own run did
    for path, member in zip(ckpts, modules, strict=True):
        stats = normalize_stats(member.cfg, images, rows, member.input_stats)
        mean, std = (
            (torch.as_tensor(s, dtype=torch.float32).view(1, -1, 1, 1).to(device) for s in stats)
            if stats is not None
            else (None, None)
        )
        members.append(Member(path, member.to(device), mean, std))
    loader = DataLoader(
        FaceDataset(images, rows, labels, transforms.eval),
        batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.eval.num_workers),
    )
    predicted, per_member, rules = collect(members, loader, columns, device)
    scored = score_attributes(predicted, module.class_names)
    return scored, report_block(ckpts, per_member, module, rules, scored, study, picked)


def score_attributes(predicted: dict[str, dict], class_names: dict[str, list[str]]) -> dict[str, dict]:
    """{attribute: macro_f1, acc, per_class, confusion_matrix, class_names, n_images (faces with the
    attribute), mae (heads predicting years), report (its StageReport)} of FaceClassifier.collect output."""
    from agecls.metrics import stage_report

    scored: dict[str, dict] = {}
    for attr, got in predicted.items():
        known = got["labels"] >= 0
        report = stage_report(got["preds"][known], got["labels"][known], class_names[attr])
        scored[attr] = {
            "class_names": class_names[attr],
            "n_images": int(known.sum()),
            "macro_f1": report.metrics["macro_f1"],
            "acc": report.metrics["acc"],
            "per_class": [
                {
                    "class": str(r["class"]),
                    **{k: _finite(r[k]) for k in ("precision", "recall", "f1")},
                    "support": int(r["support"]),
                }
                for _, r in report.table.iterrows()
            ],
            "confusion_matrix": report.confmat.astype(int).tolist(),  # rows true, columns predicted
            "report": report,
        }
        if "years" in got:
            scored[attr]["mae"] = float((got["years"][known] - got["true_years"][known]).abs().mean())
    return scored
