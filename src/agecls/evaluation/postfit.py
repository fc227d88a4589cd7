"""After a run's fit: its chosen checkpoint loaded and scored on its own split (flip TTA chosen, the fairness
view, confusion matrices, the study's objectives), assembled into results.json and recorded."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from agecls.data.datamodule import FaceDataModule
from agecls.errors import UsageError
from agecls.evaluation.objectives import compute_objectives, missing_objectives
from agecls.evaluation.splits import PREFIX, choose_tta, evaluate_splits, metric_prefixes
from agecls.metrics import StageReport
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES
from agecls.tasks.module import FaceClassifier
from agecls.tracking import Recorder

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Fitted:
    """What a fit hands to scoring: the chosen checkpoint, its validation score, and how the fit went."""

    best: str
    best_score: float
    epochs_trained: int
    fit_seconds: float


def score_fit(
    cfg: DictConfig,
    module: FaceClassifier,
    datamodule: FaceDataModule,
    class_names: dict[str, list[str]],
    manifest: pd.DataFrame,
    run_dir: Path,
    rec: Recorder,
    fitted: Fitted,
    strict: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Load the chosen checkpoint into `module`, choose flip TTA (`augment.tta=auto`), score train/val/test
    with the fairness view, compute the objectives (`strict`: see `run_objectives`) and write results.json.
    Returns the results and the objective attribute's per-class test table."""
    state = torch.load(fitted.best, map_location=module.device, weights_only=False)
    module.load_state_dict(state["state_dict"])
    best_score = fitted.best_score
    tta = choose_tta(module, datamodule, fitted.best, state, rec) if module.tta_auto else None
    paths = manifest["path"].astype(str).to_numpy()
    reused = {"val": tta.pop("val_predicted")} if tta is not None else None
    groups = fairness_groups(module, manifest)
    reports, fairness = evaluate_splits(
        module, datamodule, class_names, run_dir, rec, groups, paths, predicted=reused
    )
    results: dict[str, Any] = {
        "objective": best_score,
        "best_epoch": int(state["epoch"]) + 1,  # counted from 1, like MLflow steps
        "epochs_trained": fitted.epochs_trained,
        "fit_seconds": round(fitted.fit_seconds, 2),
        "data_sizes": {s: len(datamodule.indices[s]) for s in SPLITS},
    }
    for attr, by_split in reports.items():
        for split, report in by_split.items():
            for prefix in metric_prefixes(PREFIX[split], attr, module.multitask, module.objective):
                results.update({f"{prefix}/{k}": v for k, v in report.metrics.items()})
    if str(cfg.objective.metric) == "val/macro_f1" and "best_val/macro_f1" in results:
        # the chosen checkpoint scored as it will be used (float32, with its chosen TTA): a bf16-mixed run
        # validated its epochs under autocast, whose scores differ in the last digits
        best_score = results["objective"] = results["best_val/macro_f1"]
    rec.metrics({k: float(results[k]) for k in ("objective", "best_epoch", "epochs_trained", "fit_seconds")})
    results.update(confusion_results(reports, class_names, module))
    objectives = run_objectives(cfg, module, results, fairness.get("val"), best_score, strict)
    results["objectives"] = objectives
    rec.metrics({f"objectives/{k}": v for k, v in objectives.items()})
    results["fairness_test"] = fairness["test"].to_dict(orient="records") if "test" in fairness else []
    if tta is not None:
        results["tta"] = tta
    results["checkpoint"] = fitted.best
    results["run_dir"] = str(run_dir)
    results["mlflow_run_id"] = rec.run_id
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    rec.artifact(run_dir / "results.json", "evaluation")
    if cfg.tracking.get("log_checkpoint"):
        rec.artifact(Path(fitted.best), "checkpoints")
    return results, reports[module.objective]["test"].table


def fairness_groups(
    module: FaceClassifier, manifest: pd.DataFrame
) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """The groups the fairness view scores the age task (a single task: its target) within: gender and
    ethnicity codes per manifest row (-1: unknown), leaving out the task's own attribute."""
    fair_attr = "age" if module.multitask else module.objective
    return {
        attr: (manifest[attr].fillna(-1).to_numpy(dtype=np.int64), names)
        for attr, names in (("gender", GENDER_NAMES), ("ethnicity", ETHNICITY_NAMES))
        if attr != fair_attr
    }


def confusion_results(
    reports: dict[str, dict[str, StageReport]], class_names: dict[str, list[str]], module: FaceClassifier
) -> dict[str, Any]:
    """results.json's `class_names` and `confusion_<split>`: per attribute for multitask, else the task's."""
    confusion = {a: {s: r.confmat.tolist() for s, r in by.items()} for a, by in reports.items()}
    if module.multitask:
        out: dict[str, Any] = {"class_names": class_names}
        out.update({f"confusion_{s}": {a: confusion[a][s] for a in class_names} for s in SPLITS})
        return out
    out = {"class_names": class_names[module.objective]}
    out.update({f"confusion_{s}": confusion[module.objective][s] for s in SPLITS})
    return out


def run_objectives(
    cfg: DictConfig,
    module: FaceClassifier,
    results: dict[str, Any],
    fairness_val: pd.DataFrame | None,
    best_score: float,
    strict: bool = False,
) -> dict[str, float]:
    """The run's objectives (agecls.evaluation.objectives) on validation at the selected checkpoint.
    `val/macro_f1` is the single objective's value when that is objective.metric (flip TTA included, as
    chosen), else the evaluated validation macro-F1. When objective.metrics names one that cannot be computed
    for this run (e.g. a gap over a validation split with faces of one group only): UsageError if `strict`
    (a trial, which must tell every value), else a warning."""
    wanted = [str(m) for m in (cfg.objective.get("metrics") or [])]
    macro_f1 = best_score if str(cfg.objective.metric) == "val/macro_f1" else results["best_val/macro_f1"]
    values = compute_objectives(
        macro_f1=macro_f1,
        fairness=fairness_val,
        module=module,
        fit_seconds=float(results["fit_seconds"]),
        image_size=int(cfg.data.image_size),
        channels=1 if cfg.data.get("grayscale", True) else 3,
        channels_last=bool(cfg.trainer.get("channels_last", False)),
        wanted=wanted,
    )
    why = missing_objectives(values, wanted, fairness_val)
    if why and strict:
        raise UsageError(f"objective.metrics: {why}")
    if why:
        log.warning("objective.metrics: %s", why)
    return values
