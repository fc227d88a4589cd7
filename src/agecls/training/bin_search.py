"""Optuna search over age-bin edges (`bins=search`): each trial of a study draws its own k contiguous bins.

The edges are suggested inside the trial process, define-by-run, one cut after another: cut i (the first age
of bin i+1) is drawn between the previous cut + `min_width` and the highest value that still leaves room for
the cuts after it, so every draw is ordered and wide enough by construction. Fixed edges (e.g. 18 for a legal
age boundary) are always cuts; the remaining `k - 1 - len(fixed_edges)` are drawn. A draw that still breaks a
constraint (a fixed edge too close to a drawn one, a bin wider than `max_width`, a bin with fewer than
`min_count` training faces) is *infeasible*: the trial ends PRUNED before training, with the reason in its
`infeasible` user attribute, so TPE learns to avoid the region and no compute is spent on it.

Macro-F1 over different bin sets is not comparable (wider, fewer bins are easier): the study's leaderboard
ranks bin sets of the same k, chosen under the same constraints, on validation data only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agecls.data.bins import AgeBins, BinsError

if TYPE_CHECKING:
    import pandas as pd

_KEYS = ("k", "lowest", "highest", "min_width", "max_width", "fixed_edges", "min_count")


class InfeasibleBins(BinsError):
    """Drawn bins that break a constraint of `bins.search`."""


@dataclass(frozen=True)
class EdgeSearch:
    """k bins covering min_age..max_age; cuts (first ages of bins 2..k) lie in lowest..highest.

    min_width / max_width: years a bin must / may span (max_width is not applied to the last, open-ended
    bin); fixed_edges: ages that must start a bin; min_count: training faces each bin needs."""

    k: int
    lowest: int = 1
    highest: int = 80
    min_width: int = 1
    max_width: int | None = None
    fixed_edges: tuple[int, ...] = ()
    min_count: int = 0
    min_age: int = 0
    max_age: int = 116

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> BinsError:
            return BinsError(f"bins.search.{key}: {why}")

        if self.k < 2:
            raise bad("k", f"{self.k}; need at least 2 bins")
        if self.min_width < 1:
            raise bad("min_width", f"{self.min_width}; must be >= 1")
        if self.max_width is not None and self.max_width < self.min_width:
            raise bad("max_width", f"{self.max_width} is below min_width={self.min_width}")
        if not self.min_age < self.lowest <= self.highest <= self.max_age:
            raise bad(
                "lowest/highest",
                f"{self.lowest}..{self.highest}: need {self.min_age} < lowest <= highest <= {self.max_age}",
            )
        if self.min_count < 0:
            raise bad("min_count", f"{self.min_count}; must be >= 0")
        fixed = self.fixed_edges
        if list(fixed) != sorted(set(fixed)):
            raise bad("fixed_edges", f"{list(fixed)} must be sorted and distinct")
        if any(not self.lowest <= e <= self.highest for e in fixed):
            span = f"{self.lowest}..{self.highest}"
            raise bad("fixed_edges", f"{list(fixed)} must lie within lowest..highest ({span})")
        if len(fixed) > self.k - 1:
            raise bad("fixed_edges", f"{len(fixed)} fixed edges leave no room for k={self.k} bins")
        room = self.highest - max(self.lowest, self.min_age + self.min_width)
        if (self.free - 1) * self.min_width > room:
            raise bad(
                "k",
                f"{self.free} cuts at least {self.min_width} years apart do not fit in "
                f"{self.lowest}..{self.highest}",
            )

    @property
    def free(self) -> int:
        """Cuts drawn by the study (k - 1 minus the fixed edges)."""
        return self.k - 1 - len(self.fixed_edges)

    @classmethod
    def from_config(cls, search: Mapping[str, Any], min_age: int = 0, max_age: int = 116) -> EdgeSearch:
        """From the `bins.search` block; unknown keys are an error naming the valid ones."""
        unknown = sorted(set(search) - set(_KEYS))
        if unknown:
            raise BinsError(f"bins.search: unknown key(s) {unknown}; valid: {', '.join(_KEYS)}")
        if "k" not in search:
            raise BinsError("bins.search.k is required (the number of bins to search)")
        values = {k: search[k] for k in _KEYS if k in search and search[k] is not None}
        try:
            kwargs = {
                k: tuple(int(e) for e in v) if k == "fixed_edges" else int(v) for k, v in values.items()
            }
        except (TypeError, ValueError):
            raise BinsError(
                f"bins.search: every value must be an integer (fixed_edges a list of them); got {values}"
            ) from None
        return cls(**kwargs, min_age=min_age, max_age=max_age)

    def suggest(self, trial: Any) -> list[int]:
        """Draw the free cuts with `trial.suggest_int` (params `bins.cut1`..), merged with the fixed edges."""
        cuts: list[int] = []
        start = self.min_age  # first age of the bin the next cut closes
        for i in range(1, self.free + 1):
            low = max(self.lowest, start + self.min_width)
            high = self.highest - (self.free - i) * self.min_width
            if self.max_width is not None and not self.fixed_edges:
                high = min(high, start + self.max_width)
            start = int(trial.suggest_int(f"bins.cut{i}", low, max(low, high)))
            cuts.append(start)
        return sorted(cuts + list(self.fixed_edges))

    def ranges(self, cuts: Sequence[int]) -> list[tuple[int, int]]:
        """Inclusive age ranges of the bins that start at min_age and at every cut; InfeasibleBins if a
        constraint is broken."""
        starts = [self.min_age, *cuts]
        if len(set(starts)) != len(starts) or starts != sorted(starts):
            raise InfeasibleBins(f"cuts {list(cuts)} are not strictly increasing")
        ends = [s - 1 for s in starts[1:]] + [self.max_age]
        ranges = list(zip(starts, ends, strict=True))
        for i, (lo, hi) in enumerate(ranges):
            width = hi - lo + 1
            if width < self.min_width:
                raise InfeasibleBins(f"bin {lo}-{hi} spans {width} years < min_width={self.min_width}")
            last = i == len(ranges) - 1
            if self.max_width is not None and not last and width > self.max_width:
                raise InfeasibleBins(f"bin {lo}-{hi} spans {width} years > max_width={self.max_width}")
        return ranges


def search_spec(bins_cfg: Mapping[str, Any]) -> EdgeSearch | None:
    """The `bins.search` block of a bins config as an EdgeSearch, or None for a fixed bin set."""
    search = bins_cfg.get("search")
    if not search:
        return None
    return EdgeSearch.from_config(
        search, min_age=int(bins_cfg.get("min_age", 0)), max_age=int(bins_cfg.get("max_age", 116))
    )


def draw_bins(bins_cfg: Any, trial: Any | None) -> None:
    """With `bins.search`, fill `bins_cfg.ranges` (in place) with this trial's drawn bins.

    Raises BinsError outside an Optuna trial (there is nothing to draw from) and InfeasibleBins (after
    recording the reason on the trial) when the drawn cuts break a constraint."""
    spec = search_spec(bins_cfg)
    if spec is None:
        return
    if trial is None:
        raise BinsError(
            "bins.search draws bin edges inside an Optuna study (`-m sweep=optuna_bin_edges`); for a single "
            "run pick a bin set (`bins=seed7`) or give `bins.ranges` and drop bins.search"
        )
    cuts = spec.suggest(trial)
    try:
        ranges = spec.ranges(cuts)
    except InfeasibleBins as exc:
        trial.set_user_attr("infeasible", str(exc))
        raise
    bins_cfg.ranges = [[lo, hi] for lo, hi in ranges]
    bins_cfg.name = "search-" + "_".join(str(c) for c in cuts)
    trial.set_user_attr("bins", ",".join(f"{lo}-{hi}" for lo, hi in ranges))


def check_counts(bins: AgeBins, train_labels: np.ndarray, min_count: int) -> None:
    """InfeasibleBins naming every bin with fewer than `min_count` training faces."""
    if min_count <= 0:
        return
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=bins.n)
    short = [f"{label} ({int(n)})" for label, n in zip(bins.labels, counts, strict=True) if n < min_count]
    if short:
        raise InfeasibleBins(f"bins with fewer than min_count={min_count} training faces: {', '.join(short)}")


def check_min_count(bins_cfg: Any, manifest: pd.DataFrame, trial: Any | None) -> None:
    """With `bins.search.min_count`, InfeasibleBins (after recording the reason on the trial) when a bin
    of the run's bins has fewer training faces of `manifest` (a manifest frame) than that."""
    spec = search_spec(bins_cfg)
    if spec is None or spec.min_count <= 0:
        return
    bins = AgeBins.from_config(bins_cfg)
    train_ages = manifest.loc[manifest["split"] == "train", "age"]
    try:
        check_counts(bins, bins.index(train_ages), spec.min_count)
    except InfeasibleBins as exc:
        if trial is not None:
            trial.set_user_attr("infeasible", str(exc))
        raise
