"""`agecls-data prepare|show`: the report of the split a run would use, through the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from agecls.data.synthetic import MARKER_NAME
from data_helpers import jpeg_bytes, utk_name, write_defect_folder, write_nested_folder

SCRIPT = str(Path(sys.executable).parent / "agecls-data")
SMALL = ["data.synthetic.n=60"]


def _cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env, cwd=out.parent
    )


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cli") / "outputs"


def test_help_names_both_commands(out):
    done = _cli(out, "--help")
    assert done.returncode == 0, done.stderr
    assert "prepare" in done.stdout and "show" in done.stdout and "exit codes" in done.stdout
    helps = {command: _cli(out, command, "--help") for command in ("prepare", "show")}
    for sub in helps.values():
        assert sub.returncode == 0 and "OVERRIDE" in sub.stdout, sub.stderr
    assert "--manifest" in helps["show"].stdout


def test_show_before_prepare_says_which_command_creates_it(out):
    done = _cli(out, "show", *SMALL)
    assert done.returncode == 1
    assert "no manifest for data.root=" in done.stderr
    assert "`agecls-data prepare data.synthetic.n=60`" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_prepare_generates_splits_and_reports_then_show_reads_it(out):
    done = _cli(out, "prepare", *SMALL, "bins=four")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "rows: train 36, val 12, test 12 (total 60)" in text
    assert "age bin (four)" in text and "60-116" in text
    assert "gender" in text and "ethnicity" in text
    assert "scanned 60 files: 60 valid, 0 rejected" in text
    assert "duplicates: 0 groups" in text
    manifests = list((out / "data" / "manifests").glob("synthetic-*"))
    assert len(manifests) == 1
    assert f"manifest written: {manifests[0]}" in text
    assert sorted(p.name for p in manifests[0].iterdir()) == ["manifest.csv", "manifest.json", "rejected.csv"]

    again = _cli(out, "prepare", *SMALL, "bins=four")
    assert again.returncode == 0 and "manifest reused" in again.stdout, again.stderr
    assert again.stdout.split("\n")[:-2] == text.split("\n")[:-2]  # same report, other last line

    shown = _cli(out, "show", *SMALL)
    assert shown.returncode == 0, shown.stderr
    assert "age bin (seed7)" in shown.stdout and "rows: train 36, val 12, test 12" in shown.stdout
    assert "not rescanned" in shown.stdout
    by_path = _cli(out, "show", "--manifest", str(manifests[0]), "bins=three")
    assert by_path.returncode == 0, by_path.stderr
    assert "age bin (three)" in by_path.stdout


def test_prepare_reports_rejected_files_duplicates_and_conflicts(out, tmp_path):
    folder = write_defect_folder(tmp_path / "utk", n_valid=30)
    done = _cli(out, "prepare", "data=utkface", f"data.root={folder}")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "8 rejected" in text
    assert "face.jpg: unparseable name" in text and "truncated image" in text
    assert "duplicates: 2 groups of identical files" in text and "1 with conflicting labels" in text
    assert "conflict: 60_0_0_" in text


def test_prepare_counts_sub_folders_and_rejects_links_or_reports_skipped_folders(out, tmp_path):
    folder = write_nested_folder(tmp_path / "nested")
    for i in range(6):
        (folder / "part3" / utk_name(25 + 2 * i, i % 2, i % 5, 50 + i)).parent.mkdir(exist_ok=True)
        (folder / "part3" / utk_name(25 + 2 * i, i % 2, i % 5, 50 + i)).write_bytes(jpeg_bytes(50 + i))
    os.symlink("self.jpg", folder / "self.jpg")
    os.symlink("gone.jpg", folder / "part1" / utk_name(22, 0, 0, 99))
    done = _cli(out, "prepare", "data=utkface", f"data.root={folder}")
    assert done.returncode == 0, done.stderr
    assert "scanned 15 files: 13 valid, 2 rejected" in done.stdout
    assert "rows: train 7, val 3, test 2 (total 12)" in done.stdout  # 13 valid less one duplicate copy
    assert "self.jpg: looping link: it leads back to itself" in done.stdout
    assert f"part1/{utk_name(22, 0, 0, 99)}: broken link: its target gone.jpg does not exist" in done.stdout
    flat = _cli(
        out,
        "prepare",
        "data=utkface",
        f"data.root={folder}",
        "data.recursive=false",
        f"data.manifest_dir={tmp_path / 'flat'}",
    )
    assert flat.returncode == 2, flat.stderr
    assert flat.stderr.strip().endswith(
        f"agecls-data: error: data.root={folder}: 2 usable faces cannot fill train/val/test at ratios "
        "0.6/0.2/0.2; at least 4 are needed"
    )


def test_too_few_faces_exit_2_through_agecls_data_and_agecls_train(out, tmp_path):
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        (folder / utk_name(20 + 10 * i, i % 2, 0, i)).write_bytes(jpeg_bytes(i))
    message = (
        f"data.root={folder}: 3 usable faces cannot fill train/val/test at ratios 0.7/0.15/0.15; "
        "at least 6 are needed (so that every split gets one whichever strata of data.split.stratify=[age5] "
        "they fall in)\n"
    )
    args = ("data=utkface", f"data.root={folder}", "data.split.ratios=[0.7,0.15,0.15]")
    done = _cli(out, "prepare", *args)
    assert done.returncode == 2 and done.stderr.endswith(f"agecls-data: error: {message}"), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    train = subprocess.run(
        [str(Path(SCRIPT).parent / "agecls-train"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AGECLS_OUTPUT_DIR": str(out)},
        cwd=tmp_path,
    )
    assert train.returncode == 2 and train.stderr.endswith(f"agecls-train: error: {message}"), train.stderr
    assert "Traceback" not in train.stderr


def test_data_manifest_reports_an_external_split(out, tmp_path):
    faces = out / "data" / "synthetic-n60-s0"  # generated by the prepare test above, or now
    if not (faces / MARKER_NAME).exists():
        assert _cli(out, "prepare", *SMALL).returncode == 0
    names = sorted(p.name for p in faces.iterdir() if p.name != MARKER_NAME)
    table = pd.DataFrame({"path": names})
    table[["age", "gender", "ethnicity"]] = [n.split("_")[:3] for n in names]
    table["split"] = ["test" if i < 20 else "train" for i in range(len(names))]
    table.loc[20:29, "split"] = "val"
    csv = tmp_path / "theirs.csv"
    table.to_csv(csv, index=False)
    done = _cli(out, "prepare", "data=manifest", f"data.path={csv}", f"data.root={faces}")
    assert done.returncode == 0, done.stderr
    assert "rows: train 30, val 10, test 20 (total 60)" in done.stdout
    assert "external split read from" in done.stdout
    shown = _cli(out, "show", "--manifest", str(csv), f"data.root={faces}")
    assert shown.returncode == 0, shown.stderr
    assert "rows: train 30, val 10, test 20 (total 60)" in shown.stdout
    lost = _cli(out, "show", "--manifest", str(csv))  # relative to the CSV's folder: no such files
    assert lost.returncode == 1 and "is root=" in lost.stderr and "Traceback" not in lost.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "data=nope"], "data=nope: no option 'nope' in group data (valid: manifest, synthetic"),
        (["prepare", "bins=fuor"], "did you mean bins=four?"),
        (["prepare", "experiment=agecnnn"], "did you mean experiment=agecnn?"),
        (["prepare", "data.nope=1"], "unknown key 'data.nope'"),
        (["show", "data.rot=/x"], "unknown key 'data.rot'; did you mean data.root?"),
        (["show", "manifst=x"], "unknown key 'manifst'; did you mean manifest?"),
        (["show", "model.blocks=["], "cannot parse 'model.blocks=['"),
        (["prepare", "data=utkface"], "data=utkface needs data.root=/path/to/images"),
        (["prepare", "data=manifest"], "data=manifest needs data.path=FILE.csv"),
        (
            ["prepare", "data=utkface", "data.root=/nowhere", "data.recursive=maybe"],
            "data.recursive='maybe': must be true or false",
        ),
        (["show", "bins.ranges=[[0,5],[3,116]]"], "bins"),
        (["prepare", "--manifest", "x"], "manifest=PATH (--manifest) is for show"),
        (["prepare", "extra"], "unexpected argument 'extra'"),
        (["frobnicate"], "command='frobnicate': valid: prepare or show"),
        ([], "command=... is required: prepare or show"),
    ],
)
def test_bad_arguments_exit_2_without_a_traceback(out, args, message):
    done = _cli(out, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "usage: agecls-data" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_cfg_job_prints_the_train_config_with_the_command_keys(out):
    done = _cli(out, "show", "--cfg", "job", "--manifest", "m 1.csv", "data=utkface", "data.root=/faces")
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert (cfg["command"], cfg["manifest"]) == ("show", "m 1.csv")
    assert (cfg["data"]["name"], cfg["data"]["root"]) == ("utkface", "/faces")
    assert cfg["model"]["name"] == "basic_cnn"
    assert "hydra" not in cfg and done.stderr == ""
