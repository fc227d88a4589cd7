"""Age bins: validated contiguous inclusive integer ranges and a vectorised age -> bin id mapping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


class BinsError(ValueError):
    """An age-bin definition (or an age to map) is invalid."""


def _pairs() -> list[tuple[int, int]]:
    return [(0, 2)] + [(lo, lo + 1) for lo in range(3, 61, 2)] + [(61, 116)]


# The bin sets of the dissertation (SEED_NOTES "Age bins tried"); conf/bins/*.yaml mirrors them.
NAMED_BINS: dict[str, list[tuple[int, int]]] = {
    # The text gives the 3-bin F1 (84.31%) but not its edges: child / adult / senior is our assumption.
    "three": [(0, 19), (20, 59), (60, 116)],
    "four": [(0, 12), (13, 19), (20, 59), (60, 116)],
    "seed7_first": [(0, 2), (3, 9), (10, 16), (17, 25), (26, 45), (46, 60), (61, 116)],
    "seed7": [(0, 2), (3, 6), (7, 14), (15, 30), (31, 40), (41, 65), (66, 116)],
    # Pairs of years for analysis; the text says "1-2, 3-4, ..., 61-116", widened to start at 0.
    "pairs": _pairs(),
}


def _as_range(item: Any, position: int) -> tuple[int, int]:
    """[lo, hi], (lo, hi) or "lo-hi" -> (lo, hi)."""
    if isinstance(item, str):
        parts = item.split("-")
    elif isinstance(item, Sequence) or hasattr(item, "__iter__"):
        parts = list(item)
    else:
        parts = [item]
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise BinsError(
            f"age bin #{position} {item!r} is not a range [lo, hi] or 'lo-hi' of integers"
        ) from None
    return lo, hi


class AgeBins:
    """Contiguous, sorted, inclusive age ranges covering `min_age..max_age`; `.index(ages)` gives bin ids."""

    def __init__(
        self,
        ranges: Sequence[Any],
        name: str | None = None,
        *,
        min_age: int = 0,
        max_age: int = 116,
    ) -> None:
        if ranges is None or len(ranges) == 0:
            raise BinsError(f"age bins {name or ''}: need at least one range [lo, hi]")
        parsed = [_as_range(r, i) for i, r in enumerate(ranges)]
        label = f"age bins {name!r}" if name else "age bins"
        for i, (lo, hi) in enumerate(parsed):
            if lo > hi:
                raise BinsError(f"{label}: range #{i} [{lo}, {hi}] has lo > hi")
            if i == 0:
                continue
            prev_lo, prev_hi = parsed[i - 1]
            if lo < prev_lo:
                raise BinsError(
                    f"{label}: range #{i} [{lo}, {hi}] is not sorted (comes after [{prev_lo}, {prev_hi}])"
                )
            if lo <= prev_hi:
                raise BinsError(f"{label}: range #{i} [{lo}, {hi}] overlaps [{prev_lo}, {prev_hi}]")
            if lo > prev_hi + 1:
                raise BinsError(
                    f"{label}: gap between [{prev_lo}, {prev_hi}] and [{lo}, {hi}] "
                    f"(ages {prev_hi + 1}..{lo - 1} belong to no bin)"
                )
        if parsed[0][0] != min_age or parsed[-1][1] != max_age:
            raise BinsError(
                f"{label} cover {parsed[0][0]}..{parsed[-1][1]} but must cover {min_age}..{max_age} "
                f"(first range {list(parsed[0])}, last range {list(parsed[-1])})"
            )
        self.ranges: tuple[tuple[int, int], ...] = tuple(parsed)
        self.name = name
        self.min_age = min_age
        self.max_age = max_age

    @property
    def n(self) -> int:
        return len(self.ranges)

    @property
    def labels(self) -> list[str]:
        return [f"{lo}-{hi}" for lo, hi in self.ranges]

    @property
    def edges(self) -> np.ndarray:
        """Bin boundaries: the first age of every bin, then max_age + 1 (n + 1 values)."""
        return np.array([lo for lo, _ in self.ranges] + [self.ranges[-1][1] + 1], dtype=np.int64)

    def index(self, ages: np.ndarray | pd.Series | Sequence[int]) -> np.ndarray:
        """Bin id (int64) of every age; raises BinsError for missing, non-integer or out-of-range ages."""
        if isinstance(ages, pd.Series):
            if ages.isna().any():
                raise BinsError(f"{int(ages.isna().sum())} missing age(s) cannot be binned")
            ages = ages.to_numpy(dtype=np.float64)
        arr = np.asarray(ages)
        if arr.dtype.kind not in "iuf":
            try:
                arr = arr.astype(np.float64)
            except (TypeError, ValueError):
                raise BinsError(f"ages must be numbers, got dtype {arr.dtype}") from None
        if arr.dtype.kind == "f":
            bad = ~np.isfinite(arr) | (arr != np.floor(arr))
            if bad.any():
                raise BinsError(f"ages must be whole numbers; got {arr[bad][:5].tolist()}")
        outside = (arr < self.min_age) | (arr > self.max_age)
        if outside.any():
            raise BinsError(
                f"age(s) {np.unique(arr[outside])[:10].astype(np.int64).tolist()} outside "
                f"{self.min_age}..{self.max_age} covered by {self.name or 'these bins'}"
            )
        return np.searchsorted(self.edges, arr.astype(np.int64), side="right").astype(np.int64) - 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AgeBins:
        """From `{"name": ..., "ranges": [[lo, hi], ...]}` (dict or DictConfig); min/max_age optional."""
        if "ranges" not in cfg:
            raise BinsError(f"bins config needs a 'ranges' list of [lo, hi]; got keys {sorted(cfg.keys())}")
        if cfg["ranges"] is None and cfg.get("search"):
            raise BinsError(
                "bins=search has no ranges of its own: each trial of an Optuna study draws them "
                "(`-m sweep=optuna_bin_edges`); for a single run pick a bin set such as bins=seed7"
            )
        return cls(
            list(cfg["ranges"]),
            cfg.get("name"),
            min_age=int(cfg.get("min_age", 0)),
            max_age=int(cfg.get("max_age", 116)),
        )

    @classmethod
    def named(cls, name: str) -> AgeBins:
        """One of NAMED_BINS by name."""
        if name not in NAMED_BINS:
            raise BinsError(f"unknown bin set {name!r}; known: {', '.join(NAMED_BINS)}")
        return cls(NAMED_BINS[name], name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ranges": [[lo, hi] for lo, hi in self.ranges],
            "min_age": self.min_age,
            "max_age": self.max_age,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AgeBins) and (self.ranges, self.min_age, self.max_age) == (
            other.ranges,
            other.min_age,
            other.max_age,
        )

    def __hash__(self) -> int:
        return hash((self.ranges, self.min_age, self.max_age))

    def __repr__(self) -> str:
        return f"AgeBins({', '.join(self.labels)}{f', name={self.name!r}' if self.name else ''})"
