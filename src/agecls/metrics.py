"""Scores of one evaluated split (torchmetrics), per-class tables and confusion-matrix figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


@dataclass
class StageReport:
    """Headline scores, confusion matrix (rows true, columns predicted) and per-class table of one split."""

    metrics: dict[str, float]
    confmat: np.ndarray
    table: pd.DataFrame


def stage_report(preds: torch.Tensor, target: torch.Tensor, class_names: list[str]) -> StageReport:
    """Macro-F1 (classes absent from both truth and predictions are left out), accuracy, per-class P/R/F1."""
    n = len(class_names)
    preds, target = torch.as_tensor(preds).long(), torch.as_tensor(target).long()
    if preds.shape != target.shape or preds.ndim != 1:
        raise ValueError(
            f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must be equal 1-D shapes"
        )
    if len(target) == 0:
        raise ValueError("cannot score an empty split")
    per_class = {
        "precision": multiclass_precision(preds, target, n, average=None),
        "recall": multiclass_recall(preds, target, n, average=None),
        "f1": multiclass_f1_score(preds, target, n, average=None),
    }
    confmat = multiclass_confusion_matrix(preds, target, n).numpy()
    table = pd.DataFrame({"class": class_names, **{k: v.numpy() for k, v in per_class.items()}})
    table["support"] = confmat.sum(axis=1).astype(int)
    metrics = {
        "macro_f1": float(multiclass_f1_score(preds, target, n, average="macro")),
        "acc": float(multiclass_accuracy(preds, target, n, average="micro")),
    }
    return StageReport(metrics=metrics, confmat=confmat, table=table)


def row_normalised(confmat: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix as shares of its true class (rows without samples stay zero)."""
    cm = np.asarray(confmat, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def save_figure(fig, path: Path, dpi: int = 110, tight: bool = True) -> Path:
    """Lay out (`tight`: matplotlib's tight layout; else the figure's own), write (creating the folder) and
    close a matplotlib figure."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion(confmat: np.ndarray, class_names: list[str], path: Path, title: str) -> Path:
    """Write a row-normalised confusion matrix with counts as a PNG."""
    return plot_confusions({title: confmat}, class_names, path)


def plot_confusions(confmats: dict[str, np.ndarray], class_names: list[str], path: Path) -> Path:
    """Write row-normalised confusion matrices with counts side by side, one panel per title (e.g. a run's
    train, val and test splits), as one PNG: one figure to draw rather than one per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(4.0, 0.55 * n + 2)
    fig, axes = plt.subplots(1, len(confmats), figsize=(size * len(confmats), size * 0.9), squeeze=False)
    for ax, (title, confmat) in zip(axes[0], confmats.items(), strict=True):
        image = _draw_confusion(ax, np.asarray(confmat, dtype=np.float64), class_names, title)
    # a fixed layout: matplotlib's tight or constrained layout would double the time of drawing it
    fig.subplots_adjust(left=0.3 / len(confmats), right=0.9, bottom=0.22, top=0.9, wspace=0.4)
    fig.colorbar(image, cax=fig.add_axes((0.92, 0.22, 0.012, 0.68)), label="share of true class")
    return save_figure(fig, path, tight=False)


def _draw_confusion(ax, cm: np.ndarray, class_names: list[str], title: str):
    norm = row_normalised(cm)
    n = len(class_names)
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                colour = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8, color=colour)
    return image
