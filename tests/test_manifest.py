"""The persisted, hashed manifest: written once, reused, change detection, validation, external import."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pandas as pd
import pytest

import agecls.data.manifest as manifest_mod
from agecls.data.bins import AgeBins
from agecls.data.manifest import (
    COLUMNS,
    ManifestChangedError,
    ManifestError,
    load_manifest,
    prepare_manifest,
)
from agecls.data.split import EmptySplitError, LeakError
from data_helpers import (
    AGREE,
    CONFLICT,
    REAL_SKIP_REASON,
    jpeg_bytes,
    real_utkface_root,
    utk_name,
    write_defect_folder,
    write_nested_folder,
)

PARAMS = {"ratios": (0.6, 0.2, 0.2), "stratify": ("age5",), "seed": 42, "dedupe": True, "conflicts": "drop"}


@pytest.fixture
def folder(tmp_path):
    return write_defect_folder(tmp_path / "utk", n_valid=40)


@pytest.fixture
def prepared(folder, tmp_path):
    return prepare_manifest(folder, tmp_path / "manifest", **PARAMS)


def test_prepare_writes_hashed_manifest_and_reports(prepared, tmp_path):
    out = tmp_path / "manifest"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "manifest.json", "rejected.csv"]
    raw = (out / "manifest.csv").read_bytes()
    info = json.loads((out / "manifest.json").read_text())
    assert prepared.hash == info["hash"] == hashlib.sha256(raw).hexdigest()
    assert raw.decode().splitlines()[0] == ",".join(COLUMNS)
    assert list(prepared.df.columns) == list(COLUMNS)
    n_valid = 40 + 7 + 4  # plain faces + accepted defect names + the two copy groups
    assert len(prepared.df) == n_valid - 3 == info["counts"]["total"]
    assert info["scan"]["n_valid"] == n_valid and info["scan"]["n_rejected"] == 8
    assert info["duplicates"]["n_groups"] == 2 and info["duplicates"]["rows_removed"] == 3
    assert info["split"] == {"ratios": [0.6, 0.2, 0.2], "stratify": ["age5"], "seed": 42, "group_col": "sha1"}
    rejected = pd.read_csv(out / "rejected.csv")
    assert set(rejected["stage"]) == {"scan", "duplicates"}
    assert set(rejected["path"]) >= {AGREE[1], *CONFLICT, "face.jpg"}
    assert prepared.root == (tmp_path / "utk").resolve()


def test_second_prepare_reuses_without_rescanning(prepared, folder, tmp_path, monkeypatch):
    csv = tmp_path / "manifest" / "manifest.csv"
    mtime = csv.stat().st_mtime_ns

    def no_scan(*args, **kwargs):
        raise AssertionError("the folder was scanned again")

    monkeypatch.setattr(manifest_mod, "scan_folder", no_scan)
    again = prepare_manifest(folder, tmp_path / "manifest", **PARAMS)
    assert again.hash == prepared.hash and csv.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again.df, prepared.df)


def test_changed_folder_is_detected_and_force_rewrites(prepared, folder, tmp_path):
    out = tmp_path / "manifest"
    (folder / "33_1_2_20170116999999999.jpg.chip.jpg").write_bytes(jpeg_bytes(4242))
    with pytest.raises(ManifestChangedError, match=r"1 file\(s\) added, 0 removed .*force=True"):
        prepare_manifest(folder, out, **PARAMS)
    (folder / "33_1_2_20170116999999999.jpg.chip.jpg").unlink()
    (folder / AGREE[0]).unlink()
    with pytest.raises(ManifestChangedError, match=r"0 file\(s\) added, 1 removed"):
        prepare_manifest(folder, out, **PARAMS)
    rewritten = prepare_manifest(folder, out, **PARAMS, force=True)
    assert rewritten.hash != prepared.hash
    assert AGREE[1] in set(rewritten.df["path"])  # the surviving copy is now a plain record
    assert prepare_manifest(folder, out, **PARAMS).hash == rewritten.hash


def test_size_change_and_param_change_are_detected(prepared, folder, tmp_path):
    with pytest.raises(ManifestChangedError, match="now asked for .*'seed': 7"):
        prepare_manifest(folder, tmp_path / "manifest", **{**PARAMS, "seed": 7})
    (folder / "face.jpg").write_bytes(b"longer than before")
    with pytest.raises(ManifestChangedError, match="same file names but some file sizes changed"):
        prepare_manifest(folder, tmp_path / "manifest", **PARAMS)


def test_same_folder_same_params_same_hash(folder, tmp_path):
    a = prepare_manifest(folder, tmp_path / "a", **PARAMS)
    b = prepare_manifest(folder, tmp_path / "b", **PARAMS)
    assert a.hash == b.hash


def test_load_verifies_the_hash(prepared, tmp_path):
    loaded = load_manifest(tmp_path / "manifest")
    assert loaded.hash == prepared.hash and loaded.root == prepared.root
    pd.testing.assert_frame_equal(loaded.df, prepared.df)
    csv = tmp_path / "manifest" / "manifest.csv"
    csv.write_text(csv.read_text().replace(",train\n", ",test\n", 1))
    with pytest.raises(ManifestError, match="does not match the hash recorded in .*manifest.json"):
        load_manifest(csv)


def test_external_csv_reproduces_a_split_exactly(prepared, tmp_path):
    ext = prepared.df.drop(columns="sha1").sample(frac=1.0, random_state=0)
    ext["path"] = [str(prepared.root / p) for p in ext["path"]]  # absolute paths, no sha1, shuffled rows
    ext["note"] = "extra columns are ignored"
    ext.to_csv(tmp_path / "their_split.csv", index=False)
    loaded = load_manifest(tmp_path / "their_split.csv", root=prepared.root)
    pd.testing.assert_frame_equal(loaded.df, prepared.df)
    assert loaded.hash == prepared.hash and loaded.info["source"] == "external"
    # relative paths and no root: paths are relative to the CSV's folder
    rel = prepared.df.drop(columns="sha1")
    rel.to_csv(prepared.root / "split.csv", index=False)
    assert load_manifest(prepared.root / "split.csv").hash == prepared.hash


def test_external_csv_with_a_leak_needs_allow_leaks(prepared, tmp_path):
    ext = prepared.df.copy()
    copy = ext.iloc[[0]].assign(
        path="copy_of_first.jpg", split="test" if ext.iloc[0]["split"] != "test" else "val"
    )
    pd.concat([ext, copy]).to_csv(tmp_path / "leaky.csv", index=False)
    with pytest.raises(LeakError, match=r"(?s)leaky.csv: .*1 content hash\(s\) in more than one split"):
        load_manifest(tmp_path / "leaky.csv", root=prepared.root)
    assert len(load_manifest(tmp_path / "leaky.csv", root=prepared.root, allow_leaks=True).df) == len(ext) + 1


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("age", "abc", r"column 'age' has invalid value\(s\) \(line 2: 'abc'\); valid: whole numbers 0..116"),
        ("age", "117", r"column 'age' .*'117'"),
        ("gender", "", r"column 'gender' .*valid: whole numbers 0..1$"),
        ("ethnicity", "7", r"valid: whole numbers 0..4 or empty"),
        ("split", "training", r"column 'split' .*'training'.*valid: train, val, test"),
        ("sha1", "xyz", r"column 'sha1' .*40 hex digits"),
    ],
)
def test_bad_csv_values_name_file_line_and_column(prepared, tmp_path, column, value, message):
    bad = prepared.df.astype({column: object})
    bad.loc[0, column] = value
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(tmp_path / "bad.csv", root=prepared.root)
    assert "bad.csv" in str(err.value)


def test_bad_csv_structure(prepared, tmp_path):
    prepared.df.drop(columns=["split"]).to_csv(tmp_path / "nosplit.csv", index=False)
    with pytest.raises(ManifestError, match=r"nosplit.csv: missing column\(s\) \['split'\]"):
        load_manifest(tmp_path / "nosplit.csv", root=prepared.root)
    pd.concat([prepared.df, prepared.df.iloc[[0]]]).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(ManifestError, match="column 'path' .*valid: each path once"):
        load_manifest(tmp_path / "twice.csv", root=prepared.root)
    prepared.df.drop(columns="sha1").assign(path="nowhere.jpg").iloc[:1].to_csv(
        tmp_path / "gone.csv", index=False
    )
    with pytest.raises(ManifestError, match="gone.csv has no sha1 column and cannot read .*nowhere.jpg"):
        load_manifest(tmp_path / "gone.csv", root=prepared.root)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.csv")


def test_report_lists_counts_rejects_and_duplicates(prepared):
    text = prepared.report(AgeBins.named("seed7"))
    counts = prepared.df["split"].value_counts()
    per_split = f"train {counts['train']}, val {counts['val']}, test {counts['test']}"
    assert f"rows: {per_split} (total {len(prepared.df)})" in text
    for needle in ("train", "val", "test", "66-116", "missing", "unparseable name", "truncated image"):
        assert needle in text
    assert (
        "duplicates: 2 groups of identical files (4 files), 1 with conflicting labels; 3 rows removed" in text
    )
    assert f"conflict: {CONFLICT[0]} [60, 0, 0]; {CONFLICT[1]} [62, 1, 0]" in text


def test_sub_folder_faces_are_in_the_manifest_reused_and_changes_seen(tmp_path, monkeypatch):
    root = write_nested_folder(tmp_path / "faces")
    manifest = prepare_manifest(root, tmp_path / "m", **PARAMS)
    assert list(manifest.df["path"])[2:4] == [
        f"part1/{utk_name(30, 0, 0, 3)}",
        f"part1/{utk_name(31, 1, 3, 4)}",
    ]
    assert len(manifest.df) == 6 and manifest.info["scan"]["n_files"] == 7  # the part2/ copy: a duplicate
    assert prepare_manifest(root, tmp_path / "other", **PARAMS).hash == manifest.hash
    monkeypatch.setattr(manifest_mod, "scan_folder", None)  # reuse must not rescan
    assert prepare_manifest(root, tmp_path / "m", **PARAMS).hash == manifest.hash
    with pytest.raises(
        ManifestChangedError,
        match=r"\(7 files then, 2 now: 0 file\(s\) added, 5 removed \(removed e.g. \['part1/.*\]\); "
        r"data.recursive was true, now false\); pass force=True",
    ):
        prepare_manifest(root, tmp_path / "m", **PARAMS, recursive=False)
    new = f"part2/deep/{utk_name(41, 1, 0, 9)}"
    (root / new).write_bytes(jpeg_bytes(9))
    with pytest.raises(
        ManifestChangedError, match=rf"1 file\(s\) added, 0 removed \(added e.g. \['{new}'\]\)"
    ):
        prepare_manifest(root, tmp_path / "m", **PARAMS)


def test_without_recursion_the_report_names_the_skipped_sub_folders(tmp_path):
    root = write_nested_folder(tmp_path / "faces")
    for i in range(4):
        (root / utk_name(25 + i, i % 2, 0, 20 + i)).write_bytes(jpeg_bytes(20 + i))
    manifest = prepare_manifest(root, tmp_path / "m", **PARAMS, recursive=False)
    assert len(manifest.df) == 6 and manifest.info["scan"]["skipped_folders"] == ["part1", "part2"]
    assert "skipped 2 sub-folder(s), not scanned (data.recursive=false): part1, part2" in manifest.report()


def test_broken_and_looping_links_are_rejected_and_the_rest_prepared(tmp_path):
    root = write_nested_folder(tmp_path / "faces")
    loop, dangling = utk_name(22, 0, 0, 90), utk_name(23, 1, 0, 91)
    os.symlink(loop, root / loop)
    os.symlink("gone.jpg", root / dangling)
    manifest = prepare_manifest(root, tmp_path / "m", **PARAMS)
    assert len(manifest.df) == 6 and manifest.info["scan"]["n_rejected"] == 2
    rejected = pd.read_csv(tmp_path / "m" / "rejected.csv").set_index("path")
    assert rejected.loc[loop, "reason"].startswith("looping link: it leads back to itself")
    assert rejected.loc[dangling, "reason"] == "broken link: its target gone.jpg does not exist"
    assert set(rejected.loc[[loop, dangling], "stage"]) == {"scan"}
    assert "scanned 9 files: 7 valid, 2 rejected" in manifest.report()
    assert prepare_manifest(root, tmp_path / "m", **PARAMS).hash == manifest.hash  # reused: links stable


def test_too_few_faces_for_three_splits_are_refused_with_the_minimum(tmp_path):
    root = tmp_path / "x"
    root.mkdir()
    for i in range(3):
        (root / utk_name(20 + 10 * i, i % 2, 0, i)).write_bytes(jpeg_bytes(i))
    params = {**PARAMS, "ratios": (0.7, 0.15, 0.15), "stratify": ()}
    with pytest.raises(EmptySplitError) as refused:
        prepare_manifest(root, tmp_path / "m", **params)
    assert str(refused.value) == (
        f"data.root={root}: 3 usable faces cannot fill train/val/test at ratios 0.7/0.15/0.15; "
        "at least 5 are needed"
    )
    assert refused.value.exit_code == 2 and not (tmp_path / "m").exists()
    with pytest.raises(
        EmptySplitError,
        match=r"at least 6 are needed \(so that every split gets one "
        r"whichever strata of data.split.stratify=\[age5\] they fall in\)$",
    ):
        prepare_manifest(root, tmp_path / "m", **{**params, "stratify": ("age5",)})
    for i in range(3, 6):
        (root / utk_name(20 + 10 * i, i % 2, 0, i)).write_bytes(jpeg_bytes(i))
    counts = prepare_manifest(root, tmp_path / "m", **params).info["counts"]["split"]
    assert counts == {"train": 4, "val": 1, "test": 1}


@pytest.mark.real_data
def test_real_manifest_is_leak_free_and_reused(tmp_path_factory):
    root = real_utkface_root()
    if root is None:
        pytest.skip(REAL_SKIP_REASON)
    out = tmp_path_factory.mktemp("real_manifest")
    manifest = prepare_manifest(root, out, **PARAMS)
    dup = manifest.info["duplicates"]
    assert dup["n_groups"] > 100 and dup["n_conflicting"] > 50
    assert manifest.df.groupby("sha1")["split"].nunique().max() == 1
    counts = manifest.info["counts"]["split"]
    assert abs(counts["train"] - 0.6 * len(manifest.df)) <= 5
    start = time.perf_counter()
    again = prepare_manifest(root, out, **PARAMS)
    assert again.hash == manifest.hash and time.perf_counter() - start < 10
