"""Scoring a fitted model on its own split: each split's scores, tables and confusion plots recorded to the
run, each face's prediction (for paired comparisons and ensembles), the fairness view by group, and the
choice of flip TTA on validation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from agecls.data.batch_augment import TTA_CHOICES
from agecls.data.datamodule import FaceDataModule
from agecls.evaluation.scoring import attribute_report
from agecls.files import atomic_path
from agecls.metrics import StageReport, plot_confusions, stage_report
from agecls.tasks.module import FaceClassifier
from agecls.tracking import Recorder

log = logging.getLogger(__name__)

# Metric-name prefix of each split's scores with the best checkpoint (val's per-epoch values are `val/`).
PREFIX = {"train": "best_train", "val": "best_val", "test": "test"}


def choose_tta(
    module: FaceClassifier, datamodule: FaceDataModule, best: str, state: dict, rec: Recorder
) -> dict:
    """`augment.tta=auto`: score the loaded best checkpoint on validation without and with flip TTA (macro-F1
    of the objective attribute) and keep the better (a tie keeps `none`, half the inference cost). The
    choice is set on `module` and written into the checkpoint's config (atomically), so every later reader
    of the checkpoint uses it. Returns {"chosen", "val_macro_f1": {mode: score}, "val_predicted": the chosen
    mode's `module.collect` of validation (so `evaluate_splits` need not predict it a third time)}."""
    loader = datamodule.eval_dataloader("val")
    names = module.class_names[module.objective]
    scores, predicted = {}, {}
    for mode in TTA_CHOICES:
        module.tta = mode
        predicted[mode] = module.collect(loader)
        got = predicted[mode][module.objective]
        known = got["labels"] >= 0
        scores[mode] = float(
            stage_report(got["preds"][known], got["labels"][known], names).metrics["macro_f1"]
        )
    chosen = "flip" if scores["flip"] > scores["none"] else "none"
    module.tta = chosen
    state["hyper_parameters"]["cfg"]["augment"]["tta"] = chosen
    with atomic_path(best) as tmp:
        torch.save(state, tmp)
    log.info("augment.tta=auto: validation macro-F1 %s; chose %s", scores, chosen)
    rec.tags({"augment.tta_chosen": chosen})
    rec.metrics({f"tta_val/{mode}/macro_f1": score for mode, score in scores.items()})
    return {"chosen": chosen, "val_macro_f1": scores, "val_predicted": predicted[chosen]}


def subgroup_scores(
    preds: torch.Tensor,
    labels: torch.Tensor,
    groups: dict[str, tuple[np.ndarray, tuple[str, ...]]],
    class_names,
) -> pd.DataFrame:
    """Macro-F1 and accuracy of the task within each value of other attributes (e.g. age F1 by gender)."""
    rows = []
    for attr, (codes, names) in groups.items():
        for code, name in enumerate(names):
            mask = torch.from_numpy(codes == code)
            if int(mask.sum()) == 0:
                continue
            scores = stage_report(preds[mask], labels[mask], class_names).metrics
            rows.append({"attribute": attr, "group": name, "n": int(mask.sum()), **scores})
    return pd.DataFrame(rows, columns=["attribute", "group", "n", "macro_f1", "acc"])


def _write_table(report: StageReport, run_dir: Path, split: str, suffix: str, rec) -> None:
    """per_class_{split}{suffix}.csv of one attribute, recorded."""
    csv_path = run_dir / f"per_class_{split}{suffix}.csv"
    report.table.to_csv(csv_path, index=False)
    rec.artifact(csv_path, "evaluation")


def _write_confusions(
    reports: dict[str, StageReport], names: list[str], run_dir: Path, suffix: str, rec
) -> None:
    """confusion{suffix}.png: one attribute's confusion matrices on each split, side by side, recorded."""
    confmats = {
        f"{split}{suffix.replace('_', ' ')} (best checkpoint)": r.confmat for split, r in reports.items()
    }
    rec.artifact(plot_confusions(confmats, names, run_dir / f"confusion{suffix}.png"), "evaluation")


def evaluate_splits(
    module: FaceClassifier,
    datamodule: FaceDataModule,
    class_names: dict[str, list[str]],
    run_dir: Path,
    rec: Recorder,
    groups: dict[str, tuple[np.ndarray, tuple[str, ...]]] | None = None,
    paths: np.ndarray | None = None,
    predicted: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None,
) -> tuple[dict[str, dict[str, StageReport]], dict[str, pd.DataFrame]]:
    """Score the loaded (best) model on train, val and test, per attribute ({attribute: {split: report}};
    report.metrics holds macro_f1, acc and, for heads predicting years, mae); write and record tables
    (multitask: one per attribute, named `..._{split}_{attribute}`), one confusion figure per attribute with
    a panel per split (`confusion.png`; multitask `confusion_{attribute}.png`), and each face's
    prediction on val and test (`predictions_{split}.csv`, see `prediction_table`; `paths`: the manifest's
    image path per row).

    `groups` (attribute -> (code per manifest row, -1 if unknown; group names)) adds the fairness view of
    the age task (a single task: its target): its macro-F1 within each group, on val and test. `predicted`
    ({split: `module.collect` output}) reuses predictions already made by the same model and TTA mode."""
    multi = module.multitask
    fair_attr = "age" if multi else module.objective
    reports: dict[str, dict[str, StageReport]] = {a: {} for a in class_names}
    fairness: dict[str, pd.DataFrame] = {}
    for split in ("train", "val", "test"):
        made = (predicted or {}).get(split) or module.collect(datamodule.eval_dataloader(split))
        if split != "train":
            table = prediction_table(made, datamodule.indices[split], paths, module.multitask, class_names)
            table.to_csv(run_dir / f"predictions_{split}.csv", index=False)
            rec.artifact(run_dir / f"predictions_{split}.csv", "evaluation")
        for attr, names in class_names.items():
            got = made[attr]
            known = got["labels"] >= 0
            preds, labels = got["preds"][known], got["labels"][known]
            report, mae = attribute_report(got, names)
            if mae is not None:
                report.metrics["mae"] = mae
            _write_table(report, run_dir, split, f"_{attr}" if multi else "", rec)
            prefixes = metric_prefixes(PREFIX[split], attr, multi, module.objective)
            for prefix in prefixes:
                rec.metrics({f"{prefix}/{k}": v for k, v in report.metrics.items()})
                rec.metrics({f"{prefix}/f1_{r['class']}": float(r["f1"]) for _, r in report.table.iterrows()})
            reports[attr][split] = report
            if groups and split != "train" and attr == fair_attr:
                rows = datamodule.indices[split][known.numpy()]
                table = subgroup_scores(
                    preds, labels, {a: (c[rows], n) for a, (c, n) in groups.items()}, names
                )
                table.to_csv(run_dir / f"fairness_{split}.csv", index=False)
                rec.artifact(run_dir / f"fairness_{split}.csv", "evaluation")
                rec.metrics(
                    {
                        f"{prefixes[0]}/macro_f1_by_{r.attribute}/{r.group}": float(r.macro_f1)
                        for r in table.itertuples()
                    }
                )
                fairness[split] = table
    for attr, names in class_names.items():
        _write_confusions(reports[attr], names, run_dir, f"_{attr}" if multi else "", rec)
    return reports, fairness


def prediction_table(
    predicted: dict[str, dict[str, torch.Tensor]],
    rows: np.ndarray,
    paths: np.ndarray | None,
    multi: bool,
    class_names: dict[str, list[str]],
) -> pd.DataFrame:
    """One line per face of a split: `row` (its manifest row), `path`, and per attribute the true and the
    predicted class index (`label`, `pred`; multitask: `label_<attribute>`, ...; -1: the face lacks that
    label), `years`/`pred_years` for heads predicting exact age, and the class probabilities (`p_<class>`;
    multitask `p_<attribute>_<class>`; `FaceClassifier.predict_proba`'s, rounded to 5 decimals). Two runs
    on the same split list the same rows in the same order, so their predictions can be compared face by
    face (paired bootstrap) or averaged (an ensemble); `class_names` gives the classes' order."""
    columns: dict[str, Any] = {"row": rows}
    if paths is not None:
        columns["path"] = paths[rows]
    for attr, got in predicted.items():
        suffix = f"_{attr}" if multi else ""
        columns[f"label{suffix}"] = got["labels"].numpy()
        columns[f"pred{suffix}"] = got["preds"].numpy()
        if "years" in got:
            columns[f"years{suffix}"] = got["true_years"].numpy()
            columns[f"pred_years{suffix}"] = got["years"].double().numpy().round(2)
        proba = got["proba"].double().numpy().round(5)
        for k, name in enumerate(class_names[attr]):
            columns[f"p{suffix}_{name}"] = proba[:, k]
    return pd.DataFrame(columns)


def metric_prefixes(prefix: str, attr: str, multi: bool, objective: str) -> list[str]:
    """Where an attribute's scores are recorded: `prefix` (single task), `prefix/attr` (multitask), and
    also `prefix` for the multitask objective attribute."""
    if not multi:
        return [prefix]
    return [f"{prefix}/{attr}", prefix] if attr == objective else [f"{prefix}/{attr}"]
