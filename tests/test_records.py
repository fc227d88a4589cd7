"""Labels from names, the validated folder scan and the duplicate policy."""

from __future__ import annotations

import hashlib
import os
import time

import pandas as pd
import pytest

from agecls.data.records import (
    DataError,
    LabelError,
    ParsedName,
    apply_duplicate_policy,
    folder_fingerprint,
    parse_utkface_name,
    scan_folder,
)
from agecls.data.split import build_split, check_no_leak
from data_helpers import (
    AGREE,
    CONFLICT,
    DEFECTS,
    REAL_SKIP_REASON,
    jpeg_bytes,
    real_utkface_root,
    utk_name,
    valid_names,
    write_defect_folder,
    write_nested_folder,
)

LOOP_REASON = "looping link: it leads back to itself (too many levels of symbolic links)"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("25_0_1_20170116220224657.jpg.chip.jpg", (25, 0, 1)),
        ("39_1_20170116174525125.jpg.chip.jpg", (39, 1, None)),
        ("24_0_1_20170116220224657 .jpg.chip.jpg", (24, 0, 1)),
        ("55_0_0_20170116232725357jpg.chip.jpg", (55, 0, 0)),
        ("1_1_4_20161221193011223.jpg", (1, 1, 4)),
        ("116_0_3_20170116000000000.png", (116, 0, 3)),
        ("0_1_2_20170116000000000.JPG", (0, 1, 2)),
        ("some/dir/7_0_2_20170116000000000.jpg.chip.jpg", (7, 0, 2)),
    ],
)
def test_parse_accepts_real_name_variants(name, expected):
    assert parse_utkface_name(name) == ParsedName(*expected)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("face.jpg", "unparseable name"),
        ("1_0_0.jpg", "unparseable name"),
        ("25_0.jpg.chip.jpg", "unparseable name"),
        ("a_0_0_20170116000000000.jpg", "unparseable name"),
        ("25_0_1_20170116220224657.gif", "unparseable name"),
        ("117_0_1_20170116220224657.jpg", "age 117 out of range 0..116"),
        ("25_3_1_20170116220224657.jpg", "gender 3 out of range 0..1"),
        ("25_0_5_20170116220224657.jpg", "race 5 out of range 0..4"),
    ],
)
def test_parse_rejects_with_reason(name, reason):
    with pytest.raises(LabelError) as err:
        parse_utkface_name(name)
    assert str(err.value) == reason


@pytest.fixture
def defect_folder(tmp_path):
    return write_defect_folder(tmp_path / "utk")


def test_scan_rejects_every_defect_with_its_reason(defect_folder):
    scan = scan_folder(defect_folder)
    expected = {n: r for n, r in DEFECTS.items() if r is not None}
    assert dict(zip(scan.rejected["path"], scan.rejected["reason"], strict=True)) == expected
    assert list(scan.records["path"]) == valid_names(defect_folder)
    assert ".agecls_synthetic.json" not in set(scan.records["path"]) | set(scan.rejected["path"])


def test_scan_records_labels_types_and_hashes(defect_folder):
    rec = scan_folder(defect_folder).records.set_index("path")
    assert list(rec.columns) == ["age", "gender", "ethnicity", "sha1"]
    assert all(str(rec[c].dtype) == "Int64" for c in ("age", "gender", "ethnicity"))
    assert pd.isna(rec.loc["39_1_20170116174525125.jpg.chip.jpg", "ethnicity"])
    assert rec.loc["24_0_1_20170116220224657 .jpg.chip.jpg", ["age", "gender", "ethnicity"]].tolist() == [
        24,
        0,
        1,
    ]
    assert int(rec["ethnicity"].isna().sum()) == 1
    for name in ("40_0_0_20170116000000003.jpg.chip.jpg", "41_1_1_20170116000000004.jpg.chip.jpg"):
        assert rec.loc[name, "sha1"] == hashlib.sha1((defect_folder / name).read_bytes()).hexdigest()
    assert rec.loc[AGREE[0], "sha1"] == rec.loc[AGREE[1], "sha1"]


def test_scan_without_image_check_only_rejects_names(defect_folder):
    scan = scan_folder(defect_folder, check_images=False, workers=1)
    assert set(scan.rejected["reason"]) == {
        "unparseable name",
        "age 130 out of range 0..116",
        "gender 2 out of range 0..1",
        "race 7 out of range 0..4",
        "empty file",
        "unsupported suffix '.txt' (expected one of .jpg, .jpeg, .png)",
    }
    assert "26_1_0_20170116000000009.jpg.chip.jpg" in set(scan.records["path"])  # truncated, not decoded


def test_scan_is_the_same_with_one_or_more_workers(defect_folder):
    one, two = scan_folder(defect_folder, workers=1), scan_folder(defect_folder, workers=3)
    pd.testing.assert_frame_equal(one.records, two.records)
    pd.testing.assert_frame_equal(one.rejected, two.rejected)


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    with pytest.raises(DataError, match=r"empty holds no files"):
        scan_folder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "face.jpg").write_bytes(b"x")
    with pytest.raises(
        DataError, match=r"bad holds 1 files but no valid image \(first rejection: 'face.jpg'"
    ):
        scan_folder(bad)


def test_sub_folders_are_scanned_with_paths_relative_to_the_root(tmp_path):
    root = write_nested_folder(tmp_path / "faces")
    scan = scan_folder(root, workers=1)
    assert list(scan.records["path"]) == [
        utk_name(20, 0, 1, 1),
        utk_name(21, 1, 2, 2),
        f"part1/{utk_name(30, 0, 0, 3)}",
        f"part1/{utk_name(31, 1, 3, 4)}",
        f"part2/{utk_name(30, 0, 0, 3)}",
        f"part2/{utk_name(31, 1, 3, 7)}",
        f"part2/deep/{utk_name(40, 0, 4, 5)}",
    ]
    assert scan.rejected.empty and scan.skipped_folders == ()
    assert list(scan.records["age"]) == [20, 21, 30, 31, 30, 31, 40]
    # the same name in two folders stays twice; the same bytes are one face for the duplicate policy
    kept, report = apply_duplicate_policy(scan.records)
    assert len(kept) == 6 and report.removed == [
        {"path": f"part2/{utk_name(31, 1, 3, 7)}", "reason": f"duplicate of part1/{utk_name(31, 1, 3, 4)}"}
    ]
    fingerprint = folder_fingerprint(root)
    assert fingerprint["n_files"] == 7 and fingerprint != folder_fingerprint(root, recursive=False)
    (root / "part2" / "deep" / utk_name(40, 0, 4, 5)).write_bytes(jpeg_bytes(5) + b"\0")
    assert folder_fingerprint(root)["sha256"] != fingerprint["sha256"]  # a size change deep down is seen


def test_without_recursion_sub_folders_are_listed_as_skipped(tmp_path):
    root = write_nested_folder(tmp_path / "faces")
    scan = scan_folder(root, recursive=False)
    assert list(scan.records["path"]) == [utk_name(20, 0, 1, 1), utk_name(21, 1, 2, 2)]
    assert scan.skipped_folders == ("part1", "part2")
    only_subs = tmp_path / "only_subs"
    (only_subs / "a").mkdir(parents=True)
    (only_subs / "a" / utk_name(20, 0, 1, 1)).write_bytes(jpeg_bytes(1))
    with pytest.raises(DataError, match=r"holds no files .*; its 1 sub-folder\(s\) are not scanned "):
        scan_folder(only_subs, recursive=False)
    assert len(scan_folder(only_subs).records) == 1


def test_broken_and_looping_links_are_rejected_rows(tmp_path):
    root = write_nested_folder(tmp_path / "faces")
    loop, dangling = utk_name(22, 0, 0, 90), utk_name(23, 1, 0, 91)
    os.symlink(loop, root / loop)  # points to itself
    os.symlink("gone.jpg", root / "part1" / dangling)
    os.symlink("..", root / "part2" / "up")  # a folder link back to the root: walked once only
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / utk_name(60, 1, 1, 92)).write_bytes(jpeg_bytes(92))
    os.symlink(outside, root / "linked")
    scan = scan_folder(root, workers=1)
    assert scan.rejected.values.tolist() == [
        [loop, LOOP_REASON],
        [f"part1/{dangling}", "broken link: its target gone.jpg does not exist"],
        ["part2/up/", "linked folder already scanned (a link loop or a second way in)"],
    ]
    assert len(scan.records) == 8 and f"linked/{utk_name(60, 1, 1, 92)}" in set(scan.records["path"])
    assert folder_fingerprint(root)["n_files"] == 8


def test_duplicate_policy_default_keeps_one_of_agreeing_and_drops_conflicts(defect_folder):
    records = scan_folder(defect_folder).records
    out, report = apply_duplicate_policy(records)
    paths = set(out["path"])
    assert AGREE[0] in paths and AGREE[1] not in paths
    assert not paths & set(CONFLICT)
    assert (report.n_groups, report.n_files, report.n_conflicting, report.rows_removed) == (2, 4, 1, 3)
    assert report.conflicts[0]["paths"] == list(CONFLICT)
    assert report.conflicts[0]["labels"] == [[60, 0, 0], [62, 1, 0]]
    assert len(out) == len(records) - 3
    assert {r["reason"] for r in report.removed} == {
        f"duplicate of {AGREE[0]}",
        "conflicting labels in identical files",
    }


@pytest.mark.parametrize(
    ("dedupe", "conflicts", "kept", "removed"),
    [
        (True, "first", {AGREE[0], CONFLICT[0]}, 2),
        (True, "keep", {AGREE[0], *CONFLICT}, 1),
        (False, "drop", set(AGREE), 2),
        (False, "keep", {*AGREE, *CONFLICT}, 0),
        (False, "first", {*AGREE, *CONFLICT}, 0),
    ],
)
def test_duplicate_policies(defect_folder, dedupe, conflicts, kept, removed):
    records = scan_folder(defect_folder).records
    out, report = apply_duplicate_policy(records, dedupe=dedupe, conflicts=conflicts)
    assert set(out["path"]) & {*AGREE, *CONFLICT} == kept
    assert report.rows_removed == removed == len(records) - len(out)
    if conflicts == "first":  # every kept copy carries the first path's labels
        labels = out[out["path"].isin(CONFLICT)][["age", "gender", "ethnicity"]]
        assert labels.values.tolist() == [[60, 0, 0]] * len(labels)


def test_bad_conflict_policy_lists_valid_values(defect_folder):
    with pytest.raises(
        DataError, match="unknown duplicate conflict policy 'merge'; valid: drop, first, keep"
    ):
        apply_duplicate_policy(scan_folder(defect_folder).records, conflicts="merge")


@pytest.fixture(scope="module")
def real_scan():
    root = real_utkface_root()
    if root is None:
        pytest.skip(REAL_SKIP_REASON)
    start = time.perf_counter()
    scan = scan_folder(root, workers=2)
    return scan, time.perf_counter() - start


@pytest.mark.real_data
def test_real_scan_finds_the_known_defects(real_scan):
    scan, seconds = real_scan
    rec = scan.records
    assert seconds < 60
    assert len(rec) + len(scan.rejected) >= 18_000
    no_race = sorted(rec.loc[rec["ethnicity"].isna(), "path"])
    assert [p[:22] for p in no_race] == [
        "39_1_20170116174525125",
        "61_1_20170109142408075",
        "61_1_20170109150557335",
    ]
    assert "24_0_1_20170116220224657 .jpg.chip.jpg" in set(rec["path"])


@pytest.mark.real_data
def test_real_duplicates_and_a_split_without_cross_split_copies(real_scan):
    scan, _ = real_scan
    kept, report = apply_duplicate_policy(scan.records, dedupe=False, conflicts="keep")
    assert report.n_groups > 100 and report.n_conflicting > 50 and report.n_files > 2 * report.n_groups - 1
    kept = kept.assign(split=build_split(kept))
    check_no_leak(kept)  # copies, even with conflicting labels, share a split
    counts = kept["split"].value_counts()
    assert abs(counts["train"] / len(kept) - 0.6) < 0.005
