"""A grouped, stratified, seeded train/val/test split and a leak check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from agecls.data.records import DataError
from agecls.errors import UsageError

SPLITS = ("train", "val", "test")
DERIVED_KEYS = ("age5",)


class LeakError(DataError):
    """The same file path or the same image content appears in more than one split."""


class EmptySplitError(DataError, UsageError):
    """Too few faces for the split ratios: train, val or test would hold no row (a usage error: exit 2)."""


def validate_ratios(ratios: Sequence[float]) -> np.ndarray:
    """Three non-negative numbers summing to 1 (train, val, test) as a float array."""
    try:
        arr = np.asarray([float(r) for r in ratios], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"split ratios must be three numbers (train, val, test), got {ratios!r}") from None
    if arr.shape != (3,) or (arr < 0).any() or not np.isfinite(arr).all() or abs(arr.sum() - 1.0) > 1e-6:
        raise DataError(
            "split ratios must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {list(ratios)!r}"
        )
    return arr


def stratum_keys(records: pd.DataFrame, stratify: Sequence[str]) -> pd.Series:
    """One string key per row from the stratify columns; "age5" = min(age // 5, 20); NA is its own value."""
    if isinstance(stratify, str):
        stratify = (stratify,)
    parts = []
    for key in stratify:
        if key == "age5":
            if "age" not in records.columns:
                raise DataError("stratify key 'age5' needs an 'age' column")
            col = (records["age"] // 5).clip(upper=20)
        elif key in records.columns:
            col = records[key]
        else:
            raise DataError(
                f"unknown stratify key {key!r}; valid: {', '.join(DERIVED_KEYS)} "
                f"or a column of {list(records.columns)}"
            )
        parts.append(col.astype("string").fillna("NA"))
    if not parts:
        return pd.Series("all", index=records.index)
    out = parts[0]
    for part in parts[1:]:
        out = out + "|" + part
    return out


def _allocate(n: int, ratios: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Largest-remainder counts summing to n; leftovers favour the splits that are globally short (carry)."""
    exact = ratios * n
    counts = np.floor(exact).astype(np.int64)
    leftover = n - int(counts.sum())
    if leftover > 0:
        priority = np.where(ratios > 0, (exact - counts) + carry, -np.inf)
        order = np.lexsort((np.arange(3), -priority))
        counts[order[:leftover]] += 1
    carry += exact - counts
    return counts


def build_split(
    records: pd.DataFrame,
    *,
    ratios: Sequence[float] = (0.6, 0.2, 0.2),
    stratify: Sequence[str] = ("age5",),
    seed: int = 42,
    group_col: str | None = "sha1",
) -> pd.Series:
    """'train'/'val'/'test' per row (aligned to records.index); rows sharing `group_col` land in one split.

    Within every stratum, groups are shuffled with `seed` and cut at largest-remainder row targets, so every
    stratum is within about one sample (or one group) of the ratios; the result does not depend on row order.
    """
    ratio_arr = validate_ratios(ratios)
    if len(records) == 0:
        return pd.Series([], index=records.index, dtype=object, name="split")
    keys = stratum_keys(records, stratify)
    if group_col is None:
        groups = pd.Series(np.arange(len(records)).astype(str), index=records.index)
    elif group_col in records.columns:
        if records[group_col].isna().any():
            raise DataError(f"group column {group_col!r} has missing values; every row needs one")
        groups = records[group_col].astype(str)
    else:
        raise DataError(f"group column {group_col!r} not in records columns {list(records.columns)}")

    frame = pd.DataFrame({"group": groups.to_numpy(), "key": keys.to_numpy()})
    # A group (its copies may disagree on labels) takes its smallest stratum key; its size counts to targets.
    per_group = frame.groupby("group", sort=True).agg(key=("key", "min"), size=("key", "size"))
    rng = np.random.default_rng(seed)
    carry = np.zeros(3)
    assignment: dict[str, str] = {}
    for _, stratum in per_group.groupby("key", sort=True):
        order = stratum.iloc[rng.permutation(len(stratum))]
        sizes = order["size"].to_numpy()
        targets = _allocate(int(sizes.sum()), ratio_arr, carry)
        bounds = np.cumsum(targets)
        mid = np.cumsum(sizes) - sizes / 2.0  # a group goes where its middle row falls
        split_id = np.minimum(np.searchsorted(bounds, mid, side="right"), 2)
        assignment.update(zip(order.index, np.asarray(SPLITS)[split_id], strict=True))
    return pd.Series(groups.map(assignment).to_numpy(), index=records.index, dtype=object, name="split")


def min_rows(ratios: Sequence[float], *, stratified: bool = False) -> int:
    """The fewest distinct rows from which on `build_split` fills every split with a positive ratio: in one
    stratum, or (stratified) whichever strata the rows fall in.

    Each stratum's cut carries its remainders to the next, so the totals depend only on the strata sizes in
    key order; every layout is followed (a handful of states per total) up to a horizon past which even the
    smallest share holds two rows.
    """
    arr = validate_ratios(ratios)
    positive = arr > 0
    horizon = 2 * int(np.ceil(1.0 / arr[positive].min())) + 10

    def empty(counts: np.ndarray) -> bool:
        return bool((counts[positive] == 0).any())

    bad = [n for n in range(1, horizon + 1) if empty(_allocate(n, arr, np.zeros(3)))]
    one_stratum = (bad[-1] if bad else 0) + 1
    if not stratified or horizon > 400:  # horizon^2 cuts: a share under 1/195 gets the one-stratum count
        return one_stratum
    states: list[dict[tuple[int, ...], np.ndarray]] = [{} for _ in range(horizon + 1)]
    states[0][(0, 0, 0)] = np.zeros(3)  # split counts so far -> the remainders carried on
    for total in range(horizon):
        for counts, carry in states[total].items():
            for size in range(1, horizon - total + 1):
                after = carry.copy()
                added = _allocate(size, arr, after)
                states[total + size].setdefault(tuple(int(c) for c in np.add(counts, added)), after)
    bad = [n for n in range(1, horizon + 1) if any(empty(np.asarray(c)) for c in states[n])]
    return (bad[-1] if bad else 0) + 1


def check_filled(
    records: pd.DataFrame,
    split: pd.Series,
    *,
    ratios: Sequence[float],
    stratify: Sequence[str] = (),
    group_col: str | None = "sha1",
    where: str = "data",
) -> None:
    """EmptySplitError when train, val or test of `split` (build_split's answer for `records`) has no row,
    naming how many faces would fill all three; `where` starts the message (e.g. "data.root=/x")."""
    arr = validate_ratios(ratios)
    shown = "/".join(f"{r:g}" for r in arr)
    zero = [name for name, r in zip(SPLITS, arr, strict=True) if r == 0]
    if zero:
        raise EmptySplitError(
            f"{where}: ratios {shown} give {' and '.join(zero)} no share, and training needs rows in "
            "train, val and test; set data.split.ratios to three positive numbers summing to 1"
        )
    counts = split.value_counts()
    empty = [name for name in SPLITS if int(counts.get(name, 0)) == 0]
    if not empty:
        return
    n = len(split)
    # build_split keeps the rows of one group (copies of one image) together: they count once
    n_distinct = n if group_col is None else int(records[group_col].nunique())
    stratify = [stratify] if isinstance(stratify, str) else list(stratify)
    need = min_rows(arr, stratified=bool(stratify))
    # the strata matter when fewer rows fill every split in one stratum but not in every layout of strata
    strata = (
        f" (so that every split gets one whichever strata of data.split.stratify=[{','.join(stratify)}] "
        "they fall in)"
        if stratify and min_rows(arr) < need
        else ""
    )
    if n_distinct == n:
        raise EmptySplitError(
            f"{where}: {n} usable faces cannot fill train/val/test at ratios {shown}; "
            f"at least {need} are needed{strata}"
        )
    copies = f"{n} usable faces ({n_distinct} distinct images; copies of one image stay in one split)"
    if n_distinct >= need:  # enough images, but a large group of copies took a whole share
        raise EmptySplitError(
            f"{where}: {copies} left {' and '.join(empty)} empty at ratios {shown}; add distinct faces, or "
            "keep one copy of each image (data.duplicates.dedupe=true, data.duplicates.conflicts=drop)"
        )
    raise EmptySplitError(
        f"{where}: {copies} cannot fill train/val/test at ratios {shown}; "
        f"at least {need} distinct images are needed{strata}"
    )


def check_no_leak(
    df: pd.DataFrame, *, split_col: str = "split", path_col: str = "path", hash_col: str | None = "sha1"
) -> None:
    """Raise LeakError listing every path or content hash found in more than one split."""
    if split_col not in df.columns:
        raise DataError(f"no split column {split_col!r} in columns {list(df.columns)}")
    problems: list[str] = []
    for col, what in ((path_col, "path"), (hash_col, "content hash")):
        if col is None or col not in df.columns:
            continue
        n_splits = df.groupby(col, sort=True)[split_col].nunique()
        leaked = n_splits[n_splits > 1].index
        if len(leaked) == 0:
            continue
        rows = df[df[col].isin(leaked)]
        examples: list[Any] = []
        for value, group in list(rows.groupby(col, sort=True))[:10]:
            names = group[path_col] if path_col in group.columns else group.index
            where = ", ".join(f"{p} ({s})" for p, s in zip(names, group[split_col], strict=True))
            examples.append(f"  {what} {value}: {where}")
        more = f"\n  ... and {len(leaked) - 10} more" if len(leaked) > 10 else ""
        problems.append(f"{len(leaked)} {what}(s) in more than one split:\n" + "\n".join(examples) + more)
    if problems:
        raise LeakError("split leaks between train/val/test:\n" + "\n".join(problems))
