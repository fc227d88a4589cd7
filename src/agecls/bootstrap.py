"""Bootstrap confidence intervals of a split's headline scores (macro-F1, accuracy), vectorised with numpy.

The test rows are resampled with replacement `n` times; each resample is scored from its per-class counts
(one `np.bincount` over all resamples at once) and the interval is the percentile interval of those scores.
Macro-F1 follows `agecls.metrics.stage_report`: a class absent from both the truth and the predictions of a
(re)sample is left out of that sample's average.
"""

from __future__ import annotations

import numpy as np

METRICS = ("macro_f1", "acc")
# Resamples scored at once: keeps the (resamples, rows) index array near 40 MB for large splits.
_MAX_CELLS = 5_000_000


def _as_labels(values, name: str, n_classes: int) -> np.ndarray:
    arr = np.asarray(values.cpu() if hasattr(values, "cpu") else values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if len(arr) and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name} holds class indices outside 0..{n_classes - 1}")
    return arr


def _scores(preds: np.ndarray, target: np.ndarray, n_classes: int, metric: str) -> np.ndarray:
    """The metric of each row of (resamples, rows) label arrays."""
    if metric == "acc":
        return (preds == target).mean(axis=1)
    r = preds.shape[0]
    offset = (np.arange(r) * n_classes)[:, None]
    size = r * n_classes
    true = np.bincount((offset + target).ravel(), minlength=size).reshape(r, n_classes)
    pred = np.bincount((offset + preds).ravel(), minlength=size).reshape(r, n_classes)
    tp = np.bincount((offset + target).ravel(), weights=(preds == target).ravel(), minlength=size)
    tp = tp.reshape(r, n_classes)
    denom = true + pred
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def bootstrap_ci(
    preds,
    target,
    n_classes: int,
    metric: str = "macro_f1",
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, lo, hi): `metric` on all rows and its (1 - alpha) percentile bootstrap interval.

    `preds` and `target` are equal-length 1-D class indices (numpy arrays, lists or tensors); `n` resamples
    of the rows are drawn with replacement from a generator seeded with `seed`, so equal inputs give equal
    intervals."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; valid: {', '.join(METRICS)}")
    if n < 1:
        raise ValueError(f"n={n}: the number of resamples must be at least 1")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: must lie strictly between 0 and 1")
    if n_classes < 1:
        raise ValueError(f"n_classes={n_classes}: must be at least 1")
    p = _as_labels(preds, "preds", n_classes)
    t = _as_labels(target, "target", n_classes)
    if len(p) != len(t):
        raise ValueError(f"preds ({len(p)}) and target ({len(t)}) differ in length")
    if len(t) == 0:
        raise ValueError("cannot bootstrap an empty split")
    point = float(_scores(p[None], t[None], n_classes, metric)[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CELLS // len(t))
    stats = []
    for start in range(0, n, chunk):
        rows = rng.integers(0, len(t), size=(min(chunk, n - start), len(t)))
        stats.append(_scores(p[rows], t[rows], n_classes, metric))
    lo, hi = np.quantile(np.concatenate(stats), [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)
