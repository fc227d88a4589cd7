"""The grouped, stratified split and the leak check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agecls.data.records import DataError
from agecls.data.split import (
    EmptySplitError,
    LeakError,
    build_split,
    check_filled,
    check_no_leak,
    min_rows,
    stratum_keys,
)
from data_helpers import fake_records


def test_same_seed_same_split_other_seed_other_split():
    records = fake_records(2000, dup_every=7)
    a, b = build_split(records, seed=42), build_split(records, seed=42)
    assert a.equals(b)
    assert (a != build_split(records, seed=1)).mean() > 0.3


def test_split_does_not_depend_on_row_order():
    records = fake_records(1500, dup_every=5)
    shuffled = records.sample(frac=1.0, random_state=3)
    a = build_split(records)
    b = build_split(shuffled)
    assert b.reindex(a.index).equals(a)
    assert b.index.equals(shuffled.index)


@pytest.mark.parametrize("ratios", [(0.6, 0.2, 0.2), (0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)])
def test_overall_proportions_are_near_exact(ratios):
    records = fake_records(3000)
    counts = (
        build_split(records, ratios=ratios).value_counts().reindex(["train", "val", "test"], fill_value=0)
    )
    target = np.asarray(ratios) * len(records)
    assert np.abs(counts.to_numpy() - target).max() <= 1.0
    assert counts.sum() == len(records)


def test_every_age5_stratum_is_within_one_sample_of_its_target():
    records = fake_records(3000)
    split = build_split(records)
    age5 = (records["age"] // 5).clip(upper=20)
    table = pd.crosstab(age5, split).reindex(columns=["train", "val", "test"], fill_value=0)
    target = np.outer(table.sum(axis=1), [0.6, 0.2, 0.2])
    assert np.abs(table.to_numpy() - target).max() < 1.0


def test_groups_never_straddle_splits_and_stay_close_to_target():
    records = fake_records(3000, dup_every=3)  # one row in three is a copy of the previous one
    split = build_split(records)
    per_group = split.groupby(records["sha1"]).nunique()
    assert per_group.max() == 1
    check_no_leak(records.assign(split=split))
    age5 = (records["age"] // 5).clip(upper=20)
    table = pd.crosstab(age5, split).reindex(columns=["train", "val", "test"], fill_value=0)
    target = np.outer(table.sum(axis=1), [0.6, 0.2, 0.2])
    assert np.abs(table.to_numpy() - target).max() <= 2.0  # at most one group of 2 away


def test_stratify_on_gender_and_ethnicity_keeps_missing_as_own_stratum():
    records = fake_records(3000)
    keys = stratum_keys(records, ("gender", "ethnicity"))
    assert keys[records["ethnicity"].isna()].str.endswith("|NA").all()
    split = build_split(records, stratify=("gender", "ethnicity"))
    missing = split[records["ethnicity"].isna()].value_counts()
    n_missing = int(records["ethnicity"].isna().sum())
    assert abs(missing["train"] - 0.6 * n_missing) <= 2


def test_no_grouping_and_no_stratification():
    records = fake_records(500, dup_every=2).drop(columns="sha1")
    split = build_split(records, stratify=(), group_col=None)
    assert split.value_counts().to_dict() == {"train": 300, "val": 100, "test": 100}


@pytest.mark.parametrize(
    "ratios", [(0.6, 0.2), (0.6, 0.3, 0.2), (1.2, -0.1, -0.1), ("a", 0, 1), (0.7, 0.3, float("nan"))]
)
def test_invalid_ratios_are_rejected(ratios):
    with pytest.raises(DataError, match="split ratios must be three"):
        build_split(fake_records(50), ratios=ratios)


def test_unknown_stratify_key_and_group_column():
    with pytest.raises(DataError, match=r"unknown stratify key 'age10'; valid: age5 or a column of \['path'"):
        build_split(fake_records(50), stratify=("age10",))
    with pytest.raises(DataError, match="group column 'md5' not in records columns"):
        build_split(fake_records(50), group_col="md5")


def test_leak_check_catches_a_planted_content_leak():
    records = fake_records(200)
    df = records.assign(split=build_split(records))
    check_no_leak(df)
    a, b = df.index[df["split"] == "train"][0], df.index[df["split"] == "test"][0]
    df.loc[b, "sha1"] = df.loc[a, "sha1"]
    with pytest.raises(LeakError) as err:
        check_no_leak(df)
    message = str(err.value)
    assert "1 content hash(s) in more than one split" in message
    assert f"{df.loc[a, 'path']} (train)" in message and f"{df.loc[b, 'path']} (test)" in message


def test_leak_check_catches_a_path_in_two_splits():
    df = pd.DataFrame({"path": ["a.jpg", "a.jpg", "b.jpg"], "split": ["train", "val", "val"]})
    with pytest.raises(
        LeakError, match=r"1 path\(s\) in more than one split:\n  path a.jpg: a.jpg \(train\)"
    ):
        check_no_leak(df)


@pytest.mark.parametrize(
    ("ratios", "one_stratum", "any_strata"),
    [
        ((0.6, 0.2, 0.2), 4, 4),
        ((0.7, 0.15, 0.15), 5, 6),
        ((0.8, 0.1, 0.1), 7, 9),
    ],
)
def test_min_rows_is_where_build_split_starts_to_fill_every_split(ratios, one_stratum, any_strata):
    assert (min_rows(ratios), min_rows(ratios, stratified=True)) == (one_stratum, any_strata)
    flat = [
        build_split(fake_records(n), ratios=ratios, stratify=()).nunique() for n in range(1, one_stratum + 4)
    ]
    assert flat.index(3) + 1 == one_stratum and set(flat[one_stratum - 1 :]) == {3}

    # two strata (k faces at age 20, the rest at 40): every layout of any_strata faces fills, and one of
    # any_strata - 1 faces does not (even where one stratum of them would)
    def filled(n: int, k: int) -> bool:
        ages = pd.DataFrame({"age": [20] * k + [40] * (n - k), "sha1": [f"{i:040x}" for i in range(n)]})
        return build_split(ages, ratios=ratios).nunique() == 3

    n = any_strata
    assert all(filled(n, k) for k in range(1, n))
    assert not all(filled(n - 1, k) for k in range(1, n - 1))


def test_check_filled_names_the_faces_needed():
    assert (min_rows((0.9, 0.05, 0.05)), min_rows((0.9, 0.05, 0.05), stratified=True)) == (14, 17)
    three = pd.DataFrame({"age": [20, 40, 41], "sha1": ["a", "b", "c"]})
    split = build_split(three, ratios=(0.5, 0.25, 0.25))
    assert sorted(split) == ["train", "train", "val"]  # ages 40 and 41 share a stratum: test stays empty
    with pytest.raises(EmptySplitError) as refused:
        check_filled(three, split, ratios=(0.5, 0.25, 0.25), stratify=("age5",), where="data.root=/x")
    assert str(refused.value) == (
        "data.root=/x: 3 usable faces cannot fill train/val/test at ratios 0.5/0.25/0.25; at least 4 are "
        "needed (so that every split gets one whichever strata of data.split.stratify=[age5] they fall in)"
    )
    check_filled(three, build_split(three, ratios=(0.5, 0.25, 0.25), stratify=()), ratios=(0.5, 0.25, 0.25))
    with pytest.raises(
        EmptySplitError, match=r"^data: ratios 1/0/0 give val and test no share, and training"
    ):
        check_filled(three, pd.Series(["train"] * 3), ratios=(1, 0, 0))
    copies = pd.DataFrame({"age": [20] * 6, "sha1": ["a", "a", "a", "b", "c", "d"]})
    with pytest.raises(
        EmptySplitError,
        match=r": 6 usable faces \(4 distinct images; copies of one image stay "
        r"in one split\) left test empty at ratios 0.6/0.2/0.2; add distinct faces",
    ):
        check_filled(copies, pd.Series(["train"] * 5 + ["val"]), ratios=(0.6, 0.2, 0.2))
    with pytest.raises(
        EmptySplitError, match=r"\(2 distinct images; .* at least 4 distinct images are needed$"
    ):
        check_filled(copies[:4], pd.Series(["train"] * 4), ratios=(0.6, 0.2, 0.2))
    assert issubclass(EmptySplitError, DataError) and EmptySplitError("x").exit_code == 2
