"""agecls-compare: two runs' face-level predictions compared with a paired bootstrap, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agecls.cli.compare import main
from agecls.evaluation.compare import CompareError, compare_runs


def _run(folder: Path, preds, labels, split: str = "val", class_names=None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"row": np.arange(len(labels)) * 3, "path": "x.jpg", "label": labels, "pred": preds})
    for k, v in extra.items():
        table[k] = v
    table.to_csv(folder / f"predictions_{split}.csv", index=False)
    if class_names is not None:
        (folder / "results.json").write_text(json.dumps({"class_names": class_names}))
    return folder


def _pair(tmp_path, n=600, fixed=0.15, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    preds_b = np.where(rng.random(n) < 0.5, labels, rng.integers(0, 4, n))
    preds_a = np.where(rng.random(n) < fixed, labels, preds_b)  # A = B with some faces fixed
    names = ["a", "b", "c", "d"]
    return _run(tmp_path / "A", preds_a, labels, class_names=names), _run(tmp_path / "B", preds_b, labels)


def test_a_run_that_fixes_faces_is_better_with_confidence(tmp_path, capsys):
    run_a, run_b = _pair(tmp_path)
    report = compare_runs(run_a, run_b)
    d = report["macro_f1"]["A-B"]
    assert d["diff"] == pytest.approx(report["macro_f1"]["A"][0] - report["macro_f1"]["B"][0])
    assert d["lo"] > 0 and d["p_a_not_better"] == 0.0 and report["faces"] == 600
    assert main([str(run_a), str(run_b), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "600 faces (val)" in out and "| macro_f1 |" in out and "| A better |" in out
    assert "for reporting a choice made on validation" not in out
    assert json.loads((tmp_path / "r.json").read_text())["macro_f1"]["A-B"]["lo"] > 0
    # The other way round: B better; the same run twice: no difference.
    assert compare_runs(run_b, run_a)["macro_f1"]["A-B"]["hi"] < 0
    same = compare_runs(run_a, run_a / "predictions_val.csv")["macro_f1"]["A-B"]
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)


def test_test_split_and_faces_without_the_label(tmp_path, capsys):
    labels = np.array([0, 1, -1, 1, 0, -1])
    a = _run(tmp_path / "A", [0, 1, 0, 1, 0, 1], labels, split="test")
    b = _run(tmp_path / "B", [1, 1, 0, 0, 0, 1], labels, split="test")
    report = compare_runs(a, b, split="test", n=50)
    assert report["faces"] == 4 and report["macro_f1"]["A"][0] == 1.0  # the two -1 faces left out
    assert main([str(a), str(b), "--split", "test", "--n-boot", "50"]) == 0
    assert "for reporting a choice made on validation" in capsys.readouterr().out


def test_multitask_files_compare_one_attribute(tmp_path):
    labels = np.array([0, 1, 1, 0])
    cols = {
        "label_gender": labels,
        "pred_gender": labels,
        "label_age": [0, 1, 2, 3],
        "pred_age": [0, 1, 2, 2],
    }
    for name in ("A", "B"):
        folder = tmp_path / name
        folder.mkdir()
        pd.DataFrame({"row": range(4), **cols}).to_csv(folder / "predictions_val.csv", index=False)
    report = compare_runs(tmp_path / "A", tmp_path / "B", n=20)
    assert report["attribute"] == "gender"  # the file's first attribute
    assert compare_runs(tmp_path / "A", tmp_path / "B", attribute="age", n=20)["macro_f1"]["A"][0] < 1
    with pytest.raises(
        CompareError, match=r"no columns row, label_eye, pred_eye; its attributes: age, gender"
    ):
        compare_runs(tmp_path / "A", tmp_path / "B", attribute="eye")


def test_refusals_name_the_files(tmp_path, capsys):
    run_a, _ = _pair(tmp_path)
    other = _run(tmp_path / "C", [0, 1], [1, 1])
    with pytest.raises(
        CompareError, match=r"A/predictions_val\.csv \(600 faces\) and .*C/predictions_val\.csv"
    ):
        compare_runs(run_a, other)
    shuffled = pd.read_csv(run_a / "predictions_val.csv").sample(frac=1.0, random_state=0)
    (tmp_path / "D").mkdir()
    shuffled.to_csv(tmp_path / "D" / "predictions_val.csv", index=False)
    with pytest.raises(CompareError, match="same order"):
        compare_runs(run_a, tmp_path / "D")
    with pytest.raises(
        CompareError, match=r"E/predictions_test\.csv not found: give an agecls-train run folder"
    ):
        compare_runs(_run(tmp_path / "E", [0], [0]), run_a, split="test")
    with pytest.raises(CompareError, match="no such run folder or predictions file"):
        compare_runs(run_a, tmp_path / "missing")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert main([str(run_a), str(tmp_path / "bad.csv")]) == 1
    assert "bad.csv: no columns row, label, pred" in capsys.readouterr().err
    assert main([str(run_a), str(run_a), "--n-boot", "0"]) == 2
    assert "agecls-compare: error: n_boot=0: valid: a whole number >= 1" in capsys.readouterr().err
    assert main([str(run_a), str(run_a), "--split", "train"]) == 2
    assert "split='train': valid: val or test" in capsys.readouterr().err
