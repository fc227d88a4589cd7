"""Age-bin validation and the vectorised age -> bin mapping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from agecls.data.bins import NAMED_BINS, AgeBins, BinsError


def test_named_sets_are_valid_and_cover_all_ages():
    sizes = {name: AgeBins(ranges, name).n for name, ranges in NAMED_BINS.items()}
    assert sizes == {"three": 3, "four": 4, "seed7_first": 7, "seed7": 7, "pairs": 31}
    pairs = AgeBins.named("pairs")
    assert pairs.labels[:3] == ["0-2", "3-4", "5-6"] and pairs.labels[-2:] == ["59-60", "61-116"]


def test_labels_and_edges():
    bins = AgeBins.named("seed7")
    assert bins.labels == ["0-2", "3-6", "7-14", "15-30", "31-40", "41-65", "66-116"]
    assert bins.edges.tolist() == [0, 3, 7, 15, 31, 41, 66, 117]


def test_index_is_exact_at_every_edge():
    bins = AgeBins.named("seed7")
    ages = np.array([0, 2, 3, 6, 7, 14, 15, 30, 31, 40, 41, 65, 66, 116])
    assert bins.index(ages).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert bins.index(ages).dtype == np.int64


@pytest.mark.parametrize("name", list(NAMED_BINS))
def test_index_matches_a_plain_loop_for_every_age(name):
    bins = AgeBins.named(name)
    ages = np.arange(0, 117)
    expected = [next(i for i, (lo, hi) in enumerate(bins.ranges) if lo <= a <= hi) for a in ages]
    assert bins.index(ages).tolist() == expected
    assert bins.index(pd.Series(ages, dtype="Int64")).tolist() == expected


@pytest.mark.parametrize(
    ("ages", "message"),
    [
        ([5, 117], r"age\(s\) \[117\] outside 0..116"),
        ([-1, 3], r"age\(s\) \[-1\] outside 0..116"),
        ([2.5], "whole numbers"),
        (pd.Series([3, None], dtype="Int64"), "1 missing age"),
    ],
)
def test_index_rejects_bad_ages(ages, message):
    with pytest.raises(BinsError, match=message):
        AgeBins.named("four").index(ages)


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([[0, 10], [12, 116]], r"gap between \[0, 10\] and \[12, 116\] \(ages 11..11 belong to no bin\)"),
        ([[0, 10], [10, 116]], r"range #1 \[10, 116\] overlaps \[0, 10\]"),
        ([[0, 10], [11, 100]], r"cover 0..100 but must cover 0..116"),
        ([[1, 10], [11, 116]], r"cover 1..116 but must cover 0..116"),
        ([[11, 116], [0, 10]], r"range #1 \[0, 10\] is not sorted"),
        ([[0, 10], [20, 15], [16, 116]], r"range #1 \[20, 15\] has lo > hi"),
        ([[0, 10, 3], [11, 116]], r"age bin #0 \[0, 10, 3\] is not a range"),
        ([], "need at least one range"),
    ],
)
def test_invalid_ranges_name_the_offending_range(ranges, message):
    with pytest.raises(BinsError, match=message):
        AgeBins(ranges, "mine")


def test_from_config_dict_omegaconf_and_strings_round_trip():
    cfg = {"name": "four", "ranges": [[0, 12], [13, 19], [20, 59], [60, 116]]}
    bins = AgeBins.from_config(cfg)
    assert bins == AgeBins.named("four") and bins.name == "four"
    assert AgeBins.from_config(OmegaConf.create(cfg)) == bins
    assert AgeBins.from_config({"ranges": ["0-12", "13-19", "20-59", "60-116"]}) == bins
    assert AgeBins.from_config(bins.to_dict()) == bins
    assert bins.to_dict()["ranges"] == cfg["ranges"]
    with pytest.raises(BinsError, match="needs a 'ranges' list"):
        AgeBins.from_config({"name": "x"})
    with pytest.raises(BinsError, match="unknown bin set 'five'; known: three, four"):
        AgeBins.named("five")


def test_custom_age_span():
    bins = AgeBins([[1, 50], [51, 100]], min_age=1, max_age=100)
    assert bins.index([1, 50, 51, 100]).tolist() == [0, 0, 1, 1]
    with pytest.raises(BinsError, match="outside 1..100"):
        bins.index([0])
