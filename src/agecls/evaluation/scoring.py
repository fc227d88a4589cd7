"""Scoring a loaded checkpoint: the input normalisation its run used, and each attribute's scores (macro-F1,
accuracy, per class, confusion matrix, MAE in years) as agecls-eval's report and the ensemble block show
them. Loading a checkpoint and preprocessing faces for it is `agecls.evaluation.inference`."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig


class EvalError(ValueError):
    """The checkpoint or the folder cannot be evaluated (exit code 1)."""


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


def attribute_report(got: dict[str, Any], class_names: list[str]) -> tuple[Any, float | None]:
    """The StageReport of one attribute's `FaceClassifier.collect` output over the faces that have the
    attribute, and the MAE in years for heads predicting them (else None)."""
    from agecls.metrics import stage_report  # torch: imported on use, so agecls-eval --help stays fast

    known = got["labels"] >= 0
    report = stage_report(got["preds"][known], got["labels"][known], class_names)
    mae = float((got["years"][known] - got["true_years"][known]).abs().mean()) if "years" in got else None
    return report, mae


def score_attributes(predicted: dict[str, dict], class_names: dict[str, list[str]]) -> dict[str, dict]:
    """{attribute: macro_f1, acc, per_class, confusion_matrix, class_names, n_images (faces with the
    attribute), mae (heads predicting years), report (its StageReport)} of FaceClassifier.collect output."""
    scored: dict[str, dict] = {}
    for attr, got in predicted.items():
        known = got["labels"] >= 0
        report, mae = attribute_report(got, class_names[attr])
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
        if mae is not None:
            scored[attr]["mae"] = mae
    return scored
