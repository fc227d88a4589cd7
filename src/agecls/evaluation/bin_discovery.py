"""Bin discovery: the best grouping of fine age classes into k contiguous bins, from a confusion matrix.

Merging contiguous fine classes merges their confusion-matrix rows and columns. For a merged bin b made of
the fine classes i..j, its F1 on the *same predictions* is

    F1_b = 2 * TP_b / (true_b + predicted_b)

with TP_b the sum of C[r, c] for r, c in i..j, true_b the rows i..j summed over all columns and predicted_b
the columns i..j summed over all rows. None of these depend on how the other classes are grouped, so the
expected macro-F1 of a grouping is the mean of independent per-segment scores, and the best grouping into k
segments is an exact dynamic programme over segment ends (O(k n^2) for n fine classes; one pass gives
every k). Constraints (minimum true count, maximum width in years, fixed edges) make segments infeasible.

"Expected" because it rescores the fine model's predictions: a model trained on the merged bins will
differ. And macro-F1 over different bin sets is not comparable (fewer, wider bins score higher by
construction), so the table over k shows what each extra bin costs, it does not pick k.

Pure numpy; no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Range = tuple[int, int]


class DiscoveryError(ValueError):
    """Invalid input or infeasible request; the message names the offending key."""


@dataclass(frozen=True)
class Constraints:
    """min_count: true samples each bin needs (>= 0); max_width: most years a bin may span (a single fine
    class is always allowed, it cannot be split); fixed_edges: ages that must start a bin."""

    min_count: int = 1
    max_width: int | None = None
    fixed_edges: tuple[int, ...] = ()

    def describe(self) -> str:
        parts = [f"min_count={self.min_count}"]
        if self.max_width is not None:
            parts.append(f"max_width={self.max_width}")
        if self.fixed_edges:
            parts.append(f"fixed_edges={list(self.fixed_edges)}")
        return ", ".join(parts)


@dataclass
class Grouping:
    """k contiguous bins: fine-index segments [(start, end) inclusive], their age ranges and scores."""

    segments: list[tuple[int, int]]
    ranges: list[Range]
    f1: list[float]
    support: list[int]

    @property
    def k(self) -> int:
        return len(self.segments)

    @property
    def macro_f1(self) -> float:
        return float(np.mean(self.f1))

    @property
    def labels(self) -> list[str]:
        return [f"{lo}-{hi}" for lo, hi in self.ranges]


@dataclass
class Discovery:
    """Result of `discover`: the chosen grouping and the best expected macro-F1 for every k (NaN: none)."""

    best: Grouping
    by_k: dict[int, Grouping | None] = field(default_factory=dict)

    def tradeoff(self) -> list[tuple[int, float]]:
        return [(k, g.macro_f1 if g is not None else float("nan")) for k, g in sorted(self.by_k.items())]


def check_confusion(
    confusion: Sequence[Sequence[float]] | np.ndarray, n_classes: int | None = None
) -> np.ndarray:
    """A square, finite, non-negative confusion matrix (rows true, columns predicted) as float64."""
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise DiscoveryError(f"confusion matrix must be square and non-empty, got shape {cm.shape}")
    if n_classes is not None and cm.shape[0] != n_classes:
        raise DiscoveryError(
            f"confusion matrix is {cm.shape[0]}x{cm.shape[0]} but there are {n_classes} classes"
        )
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise DiscoveryError("confusion matrix must hold finite, non-negative counts")
    return cm


class SegmentScores:
    """Per-segment F1 and true counts of a fine confusion matrix, from prefix sums (O(1) per segment)."""

    def __init__(self, confusion: np.ndarray) -> None:
        cm = check_confusion(confusion)
        self.n = cm.shape[0]
        self.confusion = cm
        self._p2 = np.zeros((self.n + 1, self.n + 1))
        self._p2[1:, 1:] = cm.cumsum(0).cumsum(1)
        self._rows = np.concatenate([[0.0], cm.sum(1).cumsum()])
        self._cols = np.concatenate([[0.0], cm.sum(0).cumsum()])

    def true_count(self, i: int, j: int) -> float:
        """Samples whose true class is in i..j (inclusive)."""
        return float(self._rows[j + 1] - self._rows[i])

    def f1(self, i: int, j: int) -> float:
        """F1 of the merged bin i..j; 0 when it has neither true nor predicted samples."""
        p = self._p2
        tp = p[j + 1, j + 1] - p[i, j + 1] - p[j + 1, i] + p[i, i]
        denom = (self._rows[j + 1] - self._rows[i]) + (self._cols[j + 1] - self._cols[i])
        return float(2.0 * tp / denom) if denom > 0 else 0.0


def parse_fine_ranges(class_names: Sequence[str]) -> list[Range]:
    """'lo-hi' class names (an age task's bins) -> sorted, contiguous ranges; DiscoveryError otherwise."""
    ranges: list[Range] = []
    for name in class_names:
        parts = str(name).split("-")
        try:
            if len(parts) != 2:
                raise ValueError
            lo, hi = int(parts[0]), int(parts[1])
        except ValueError:
            raise DiscoveryError(
                f"class names {list(class_names)[:6]}... are not age ranges 'lo-hi': the run was not trained "
                "on age bins (train it with task=age bins=pairs)"
            ) from None
        ranges.append((lo, hi))
    for (lo0, hi0), (lo1, hi1) in zip(ranges, ranges[1:], strict=False):
        if lo1 != hi0 + 1 or lo0 > hi0 or lo1 > hi1:
            raise DiscoveryError(f"fine classes {lo0}-{hi0} and {lo1}-{hi1} are not contiguous ranges")
    return ranges


def _feasible(scores: SegmentScores, fine: Sequence[Range], constraints: Constraints) -> np.ndarray:
    """ok[i, j]: segment i..j (inclusive) satisfies every constraint."""
    n = len(fine)
    starts = {lo: idx for idx, (lo, _) in enumerate(fine)}
    first, last = fine[0][0], fine[-1][1]
    edge_idx = []
    for age in constraints.fixed_edges:
        if age <= first or age > last:
            continue  # the outer edges (first age, last age + 1) are always edges
        if age not in starts:
            below = max(lo for lo, _ in fine if lo < age)
            above = min((lo for lo, _ in fine if lo > age), default=last + 1)
            raise DiscoveryError(
                f"fixed_edges: {age} is not a boundary of the fine classes (a bin can start at {below} or "
                f"{above}, not inside {below}-{above - 1})"
            )
        edge_idx.append(starts[age])
    ok = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(i, n):
            if any(i < e <= j for e in edge_idx):
                break  # a fixed edge inside: longer segments contain it too
            if scores.true_count(i, j) < constraints.min_count:
                continue
            width = fine[j][1] - fine[i][0] + 1
            if constraints.max_width is not None and j > i and width > constraints.max_width:
                break  # wider only grows
            ok[i, j] = True
    return ok


def check_constraints(constraints: Constraints, fine: Sequence[Range]) -> None:
    if int(constraints.min_count) < 0:
        raise DiscoveryError(f"min_count must be >= 0, got {constraints.min_count}")
    if constraints.max_width is not None and int(constraints.max_width) < 1:
        raise DiscoveryError(f"max_width must be >= 1 year, got {constraints.max_width}")
    first, last = fine[0][0], fine[-1][1]
    for age in constraints.fixed_edges:
        if not first <= age <= last + 1:
            raise DiscoveryError(
                f"fixed_edges: {age} is outside the ages {first}..{last} of the fine classes"
            )


def grouping_from_segments(
    scores: SegmentScores, fine: Sequence[Range], segments: Sequence[tuple[int, int]]
) -> Grouping:
    return Grouping(
        segments=[(int(i), int(j)) for i, j in segments],
        ranges=[(fine[i][0], fine[j][1]) for i, j in segments],
        f1=[scores.f1(i, j) for i, j in segments],
        support=[int(round(scores.true_count(i, j))) for i, j in segments],
    )


def discover(
    confusion: Sequence[Sequence[float]] | np.ndarray,
    fine: Sequence[Range],
    k: int,
    constraints: Constraints | None = None,
) -> Discovery:
    """The grouping of the fine classes into k contiguous bins with the highest expected macro-F1 (exact),
    and the best grouping for every k from 1 to n under the same constraints (None where infeasible).
    Ties are broken deterministically (the earliest start of the last bin wins at every step)."""
    constraints = constraints or Constraints()
    fine = [(int(lo), int(hi)) for lo, hi in fine]
    cm = check_confusion(confusion, len(fine))
    n = len(fine)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise DiscoveryError(f"k must be a whole number of bins, got {k!r}")
    if k < 1 or k > n:
        raise DiscoveryError(f"k={k} must be between 1 and the number of fine classes ({n})")
    check_constraints(constraints, fine)
    scores = SegmentScores(cm)
    ok = _feasible(scores, fine, constraints)
    seg = np.full((n, n), -np.inf)
    for i in range(n):
        for j in range(i, n):
            if ok[i, j]:
                seg[i, j] = scores.f1(i, j)
    # best[m, e]: highest sum of F1 over m segments covering fine classes 0..e-1; arg[m, e]: last start.
    best = np.full((n + 1, n + 1), -np.inf)
    arg = np.full((n + 1, n + 1), -1, dtype=np.int64)
    best[0, 0] = 0.0
    for m in range(1, n + 1):
        for e in range(m, n + 1):
            cand = best[m - 1, :e] + seg[:e, e - 1]  # start s of the last segment s..e-1
            s = int(np.argmax(cand))
            if np.isfinite(cand[s]):
                best[m, e], arg[m, e] = cand[s], s
    by_k: dict[int, Grouping | None] = {}
    for m in range(1, n + 1):
        if not np.isfinite(best[m, n]):
            by_k[m] = None
            continue
        segments, e = [], n
        for mm in range(m, 0, -1):
            s = int(arg[mm, e])
            segments.append((s, e - 1))
            e = s
        by_k[m] = grouping_from_segments(scores, fine, segments[::-1])
    if by_k[k] is None:
        possible = [m for m, g in by_k.items() if g is not None]
        hint = (
            f"feasible k under these constraints: {_spans(possible)}"
            if possible
            else "no k is feasible under these constraints"
        )
        raise DiscoveryError(
            f"no grouping of the {n} fine classes into k={k} bins satisfies {constraints.describe()} ({hint})"
        )
    return Discovery(best=by_k[k], by_k=by_k)


def _spans(values: list[int]) -> str:
    """[2, 3, 4, 7] -> '2..4, 7'."""
    out, start = [], None
    for idx, v in enumerate(values):
        if start is None:
            start = v
        if idx + 1 == len(values) or values[idx + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}..{v}")
            start = None
    return ", ".join(out)


def score_ranges(
    confusion: Sequence[Sequence[float]] | np.ndarray, fine: Sequence[Range], ranges: Sequence[Range]
) -> Grouping:
    """Expected per-bin F1 of a given bin set on the fine matrix; its edges must be fine-class edges."""
    fine = [(int(lo), int(hi)) for lo, hi in fine]
    scores = SegmentScores(check_confusion(confusion, len(fine)))
    starts = {lo: i for i, (lo, _) in enumerate(fine)}
    ends = {hi: i for i, (_, hi) in enumerate(fine)}
    segments = []
    for lo, hi in ranges:
        if lo not in starts or hi not in ends:
            raise DiscoveryError(
                f"bin {lo}-{hi} does not fall on fine-class edges ({', '.join(f'{a}-{b}' for a, b in fine)})"
            )
        segments.append((starts[lo], ends[hi]))
    if (
        segments[0][0] != 0
        or segments[-1][1] != len(fine) - 1
        or any(b[0] != a[1] + 1 for a, b in zip(segments, segments[1:], strict=False))
    ):
        raise DiscoveryError("bins must be contiguous and cover every fine class")
    return grouping_from_segments(scores, fine, segments)


def merge_confusion(confusion: np.ndarray, segments: Sequence[tuple[int, int]]) -> np.ndarray:
    """The k x k confusion matrix of a grouping (rows and columns of each segment summed)."""
    cm = check_confusion(confusion)
    ids = np.concatenate([np.full(j - i + 1, b) for b, (i, j) in enumerate(segments)])
    if len(ids) != cm.shape[0]:
        raise DiscoveryError("segments must cover every fine class exactly once")
    k = len(segments)
    merged = np.zeros((k, k))
    np.add.at(merged, (ids[:, None], ids[None, :]), cm)
    return merged
