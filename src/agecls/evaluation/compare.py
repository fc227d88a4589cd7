"""`agecls-compare`: is run A really better than run B? Both runs' face-level predictions on the same split,
compared with a paired bootstrap.

    agecls-compare RUN_A RUN_B                  # on validation: the split to choose on
    agecls-compare RUN_A RUN_B --split test     # to report a choice made on validation
    agecls-compare RUN_A RUN_B --attribute gender --n-boot 5000 --json out.json

RUN_A and RUN_B are run folders (each agecls-train run writes `predictions_val.csv` and
`predictions_test.csv` beside its `results.json`) or those CSV files themselves. Both must hold the same faces
(same manifest rows, same labels, same order: two runs on the same persisted split); otherwise the command
refuses, naming both files. Each resample of the faces scores both runs on the same draw
(`bootstrap.bootstrap_diff`), so the interval is of the difference itself: two runs whose separate
intervals overlap can still differ with confidence when they err on many of the same faces.

Printed: each run's macro-F1 and accuracy with 95% bootstrap intervals, then A - B with its paired interval
and the share of resamples in which A was no better; exit 0 (also when the difference is not significant),
1 for files that cannot be compared, 2 for bad arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecls.evaluation.bootstrap import bootstrap_ci, bootstrap_diff

SPLITS = ("val", "test")


class CompareError(Exception):
    """Two runs' predictions that cannot be compared; the message names the files."""


def _predictions_file(run: Path, split: str) -> Path:
    if run.is_file():
        return run
    path = run / f"predictions_{split}.csv"
    if not run.is_dir():
        raise CompareError(f"{run}: no such run folder or predictions file")
    if not path.is_file():
        raise CompareError(
            f"{path} not found: give an agecls-train run folder (each run writes predictions_val.csv and "
            "predictions_test.csv; runs from before agecls wrote them have none) or a predictions CSV"
        )
    return path


def _class_names(csv: Path, attribute: str | None) -> list[str] | None:
    """The attribute's class names from the run's results.json beside the CSV (None when absent)."""
    results = csv.parent / "results.json"
    if not results.is_file():
        return None
    names = json.loads(results.read_text()).get("class_names")
    if isinstance(names, dict):
        return names.get(attribute) if attribute else None
    return names


def load_predictions(
    run: Path, split: str, attribute: str | None
) -> tuple[pd.DataFrame, str, str | None, Path]:
    """(table, label-column suffix, attribute, file) of one run; CompareError naming the file otherwise.
    A multitask file without `attribute`: its first attribute."""
    path = _predictions_file(Path(run), split)
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: not a readable predictions CSV ({exc})") from exc
    if attribute is None and "label" not in table:
        attribute = next((c[len("label_") :] for c in table.columns if c.startswith("label_")), None)
    found = sorted(c[len("label_") :] for c in table.columns if c.startswith("label_"))
    multi = "label" not in table and bool(found)
    suffix = f"_{attribute}" if multi else ""
    if f"label{suffix}" not in table or f"pred{suffix}" not in table or "row" not in table:
        hint = f"; its attributes: {', '.join(found)} (--attribute)" if found else ""
        raise CompareError(f"{path}: no columns row, label{suffix}, pred{suffix}{hint}")
    return table, suffix, attribute, path


def compare_runs(
    run_a: Path | str,
    run_b: Path | str,
    split: str = "val",
    attribute: str | None = None,
    n: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Both runs' macro-F1 and accuracy with bootstrap intervals on `split`, and A - B with paired intervals.

    `attribute` picks one task of multitask runs (their `label_<attribute>` columns; default: the first
    attribute in the file); single-task runs need none. Faces without that label (-1) are left out."""
    if split not in SPLITS:
        raise CompareError(f"split={split!r}; valid: {', '.join(SPLITS)}")
    a, sa, attribute, path_a = load_predictions(Path(run_a), split, attribute)
    b, sb, _, path_b = load_predictions(Path(run_b), split, attribute)
    la, lb = a[f"label{sa}"], b[f"label{sb}"]
    if len(a) != len(b) or not (a["row"].equals(b["row"]) and la.equals(lb)):
        raise CompareError(
            f"{path_a} ({len(a)} faces) and {path_b} ({len(b)} faces) do not hold the same faces with the "
            "same labels in the same order; compare runs of the same persisted split (same data, data.split)"
        )
    known = (la >= 0).to_numpy()
    target = la.to_numpy()[known]
    preds_a, preds_b = a[f"pred{sa}"].to_numpy()[known], b[f"pred{sb}"].to_numpy()[known]
    if len(target) == 0:
        raise CompareError(f"{path_a}: no face has a {attribute or 'label'} label in the {split} split")
    names = _class_names(path_a, attribute)
    k = len(names) if names else int(max(target.max(), preds_a.max(), preds_b.max())) + 1
    report: dict[str, Any] = {
        "split": split,
        "attribute": attribute,
        "faces": int(len(target)),
        "n_boot": n,
        "runs": {"A": str(path_a), "B": str(path_b)},
    }
    for metric in ("macro_f1", "acc"):
        report[metric] = {
            "A": bootstrap_ci(preds_a, target, k, metric, n=n, seed=seed),
            "B": bootstrap_ci(preds_b, target, k, metric, n=n, seed=seed),
            "A-B": bootstrap_diff(preds_a, preds_b, target, k, metric, n=n, seed=seed),
        }
    report["agree"] = float(np.mean(preds_a == preds_b))
    return report


def verdict(diff: dict[str, float]) -> str:
    """`A better`, `B better` or `no significant difference`, from a paired 95% interval."""
    if diff["lo"] > 0:
        return "A better"
    if diff["hi"] < 0:
        return "B better"
    return "no significant difference"


def render(report: dict[str, Any]) -> str:
    what = f"{report['split']}" + (f", {report['attribute']}" if report["attribute"] else "")
    lines = [
        f"{report['faces']} faces ({what}); 95% percentile bootstrap, {report['n_boot']} resamples; "
        f"the runs agree on {report['agree']:.1%} of the faces",
        f"  A: {report['runs']['A']}",
        f"  B: {report['runs']['B']}",
        "",
        "| metric | A [95% CI] | B [95% CI] | A - B [paired 95% CI] | A no better in | reading |",
        "|---|---|---|---|---|---|",
    ]
    for metric in ("macro_f1", "acc"):
        m = report[metric]
        a, b, d = m["A"], m["B"], m["A-B"]
        lines.append(
            f"| {metric} | {a[0]:.4f} [{a[1]:.4f}, {a[2]:.4f}] | {b[0]:.4f} [{b[1]:.4f}, {b[2]:.4f}] "
            f"| {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {d['p_a_not_better']:.1%} "
            f"| {verdict(d)} |"
        )
    if report["split"] == "test":
        lines += ["", "Test scores are for reporting a choice made on validation, not for making it."]
    return "\n".join(lines)
