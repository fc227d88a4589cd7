"""The grouped, stratified split and the leak check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agecls.data.records import DataError
from agecls.data.split import LeakError, build_split, check_no_leak, stratum_keys
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
