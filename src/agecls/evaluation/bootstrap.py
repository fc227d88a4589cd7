"""Bootstrap confidence intervals of a split's headline scores (macro-F1, accuracy), vectorised with numpy.

The test rows are resampled with replacement `n` times; each resample is scored from its per-class counts
(one `np.bincount` over all resamples at once) and the interval is the percentile interval of those scores.
Macro-F1 follows `agecls.metrics.stage_report`: a class absent from both the truth and the predictions of a
(re)sample is left out of that sample's average.

`bootstrap_diff` compares two models scored on the same rows (e.g. two runs' test predictions): each resample
scores both on the same drawn rows, so the interval is of the paired difference. It is much narrower than
two separate intervals when the models err on many of the same faces, which is what a side-by-side claim
("A beats B on this test set") needs; overlapping separate intervals do not mean "no difference".
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


def _check(n: int, alpha: float, n_classes: int, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; valid: {', '.join(METRICS)}")
    if n < 1:
        raise ValueError(f"n={n}: the number of resamples must be at least 1")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: must lie strictly between 0 and 1")
    if n_classes < 1:
        raise ValueError(f"n_classes={n_classes}: must be at least 1")


def _resamples(n_rows: int, n: int, seed: int):
    """(n_i, n_rows) row-index arrays drawn with replacement, in chunks of at most _MAX_CELLS cells."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CELLS // n_rows)
    for start in range(0, n, chunk):
        yield rng.integers(0, n_rows, size=(min(chunk, n - start), n_rows))


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
    _check(n, alpha, n_classes, metric)
    p = _as_labels(preds, "preds", n_classes)
    t = _as_labels(target, "target", n_classes)
    if len(p) != len(t):
        raise ValueError(f"preds ({len(p)}) and target ({len(t)}) differ in length")
    if len(t) == 0:
        raise ValueError("cannot bootstrap an empty split")
    point = float(_scores(p[None], t[None], n_classes, metric)[0])
    stats = [_scores(p[rows], t[rows], n_classes, metric) for rows in _resamples(len(t), n, seed)]
    lo, hi = np.quantile(np.concatenate(stats), [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def bootstrap_diff(
    preds_a,
    preds_b,
    target,
    n_classes: int,
    metric: str = "macro_f1",
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """`metric` of model A minus model B on the same rows, with its paired (1 - alpha) percentile bootstrap
    interval: every resample draws one set of rows and scores both models on it.

    Returns {"diff", "lo", "hi", "p_a_not_better"}: the point difference on all rows, the interval, and the
    share of resamples where A scored no better than B (a one-sided bootstrap p-value of "A is better")."""
    _check(n, alpha, n_classes, metric)
    a = _as_labels(preds_a, "preds_a", n_classes)
    b = _as_labels(preds_b, "preds_b", n_classes)
    t = _as_labels(target, "target", n_classes)
    if not len(a) == len(b) == len(t):
        raise ValueError(f"preds_a ({len(a)}), preds_b ({len(b)}) and target ({len(t)}) differ in length")
    if len(t) == 0:
        raise ValueError("cannot bootstrap an empty split")
    diff = float(
        _scores(a[None], t[None], n_classes, metric)[0] - _scores(b[None], t[None], n_classes, metric)[0]
    )
    stats = np.concatenate(
        [
            _scores(a[rows], t[rows], n_classes, metric) - _scores(b[rows], t[rows], n_classes, metric)
            for rows in _resamples(len(t), n, seed)
        ]
    )
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_a_not_better": float((stats <= 0).mean())}
