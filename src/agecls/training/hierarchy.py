"""Hierarchical age models (the dissertation's V15/V16): a router predicts each face's gender (or ethnicity),
and one age expert per group, trained only on that group's training faces, predicts its age bin.

`agecls-train hierarchy=gender` (or `hierarchy=ethnicity`) runs, in one process, on one persisted split:
  1. the router: the run's config with `task=<by>`, trained on the training split;
  2. one expert per group: the run's config (its age task, bins, model...) restricted to the faces whose
     *true* group is that group (`data.subset`), trained on the training split's faces of the group, its
     checkpoint chosen on the validation faces of the group;
  3. the combined model: every validation and test face is routed by the router's *prediction* to one
     expert, whose age prediction is scored with the same bin macro-F1 as a flat age model. The same faces
     routed by their true group ("oracle") are scored beside it, to show what routing errors cost.
No stage trains on a validation or test face: every stage's training rows are training-split rows of the
same manifest (tests/test_hierarchical.py checks this). MLflow holds one parent run (tag
`agecls.role=hierarchy`) with the combined metrics, and a child run per stage.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from agecls.config import CONFIG_DIR
from agecls.evaluation.inference import load_checkpoint
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES
from agecls.tracking import Recorder, interrupted
from agecls.training.train import build_datamodule, train

log = logging.getLogger(__name__)

GROUPS: dict[str, tuple[str, ...]] = {"gender": GENDER_NAMES, "ethnicity": ETHNICITY_NAMES}


class HierarchyError(ValueError):
    """A hierarchy setting that cannot be used."""


@dataclass
class Stage:
    """One model of the hierarchy: its name, role, group code (experts) and composed config."""

    name: str
    role: str  # router | expert
    cfg: DictConfig
    group: int | None = None


def _task_config(name: str) -> DictConfig:
    path = CONFIG_DIR / "task" / f"{name}.yaml"
    if not path.is_file():
        raise HierarchyError(f"hierarchy.by={name!r}: no task file {path}")
    return OmegaConf.load(path)


def stage_configs(cfg: DictConfig, parent_run_id: str | None = None) -> list[Stage]:
    """The router's and every expert's config, derived from the run's config."""
    by = str(cfg.hierarchy.by)
    if by not in GROUPS:
        raise HierarchyError(f"hierarchy.by={by!r}; valid: {', '.join(GROUPS)}")
    if str(cfg.task.target) != "age":
        raise HierarchyError(f"a hierarchy routes faces to age experts; task.target={cfg.task.target!r}")
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(base):
        base.hierarchy.by = None
        tags = dict(base.tracking.get("tags") or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        base.tracking.tags = tags
    prefix = cfg.tracking.get("run_name") or f"hierarchy-{by}"
    stages = []
    router = OmegaConf.merge(base, OmegaConf.from_dotlist(list(cfg.hierarchy.get("router_overrides") or [])))
    with open_dict(router):
        router.task = _task_config(by)
        router.tracking.run_name = f"{prefix}/router-{by}"
        router.tracking.tags = {**router.tracking.tags, "agecls.role": "router"}
    stages.append(Stage(f"router-{by}", "router", router))
    expert_overrides = OmegaConf.from_dotlist(list(cfg.hierarchy.get("expert_overrides") or []))
    for code, group in enumerate(GROUPS[by]):
        expert = OmegaConf.merge(base, expert_overrides)
        with open_dict(expert):
            expert.data.subset = {by: code}
            expert.tracking.run_name = f"{prefix}/expert-{group}"
            expert.tracking.tags = {**expert.tracking.tags, "agecls.role": "expert", "hierarchy.group": group}
        stages.append(Stage(f"expert-{group}", "expert", expert, code))
    return stages


def _parent_run(cfg: DictConfig, by: str):
    """(client, run id) of a new MLflow parent run for this hierarchy, or (None, None) without tracking."""
    if not cfg.tracking.enabled:
        return None, None
    from mlflow import MlflowClient

    from agecls.tracking import ensure_experiment, source_tags

    tracking = cfg.tracking
    experiment_id = ensure_experiment(tracking.tracking_uri, tracking.experiment, tracking.artifact_root)
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    tags = {**source_tags(), "agecls.role": "hierarchy", "hierarchy.by": by, "seed": str(cfg.seed)}
    name = cfg.tracking.get("run_name") or f"hierarchy-{by}"
    return client, client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@torch.no_grad()
def _predict_rows(ckpt: str, cfg: DictConfig, prepared, rows: np.ndarray) -> np.ndarray:
    """Predicted class of `rows` (manifest indices) by the checkpoint, preprocessed as in its training."""
    module = load_checkpoint(ckpt)
    datamodule, _ = build_datamodule(cfg, prepared)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    return module.predict_loader(datamodule.rows_dataloader(rows))[0].numpy()  # decoded by the task's head


def evaluate_routing(cfg: DictConfig, stages: list[Stage], results: dict[str, dict], run_dir: Path, rec):
    """Route every val/test face with an age label by the router's prediction; score combined and oracle."""
    from agecls.data.bins import AgeBins
    from agecls.data.prepare import prepare_data, task_labels
    from agecls.metrics import plot_confusion, stage_report

    by = str(cfg.hierarchy.by)
    prepared = prepare_data(cfg.data, cfg.paths)
    df = prepared.manifest.df
    bins = AgeBins.from_config(cfg.bins)
    ages = task_labels(prepared, "age", bins)
    true_group = df[by].fillna(-1).to_numpy(dtype=np.int64)
    router = next(s for s in stages if s.role == "router")
    experts = {s.group: s for s in stages if s.role == "expert"}
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        rows = np.flatnonzero((df["split"].to_numpy() == split) & (ages >= 0))
        routed = _predict_rows(results[router.name]["checkpoint"], router.cfg, prepared, rows)
        known = true_group[rows] >= 0
        out[f"{split}/router_acc"] = float((routed[known] == true_group[rows][known]).mean())
        for mode, groups in (("routed", routed), ("oracle", true_group[rows])):
            preds = np.full(len(rows), -1, dtype=np.int64)
            for code, expert in experts.items():
                mine = groups == code
                if mine.any():
                    preds[mine] = _predict_rows(
                        results[expert.name]["checkpoint"], expert.cfg, prepared, rows[mine]
                    )
            scored = preds >= 0  # oracle: faces without a true group have no expert
            report = stage_report(
                torch.from_numpy(preds[scored]), torch.from_numpy(ages[rows][scored]), bins.labels
            )
            prefix = f"{split}/{mode}" if mode == "oracle" else split
            out.update({f"{prefix}/{k}": v for k, v in report.metrics.items()})
            if mode == "routed":
                out[f"confusion_{split}"] = report.confmat.tolist()
                report.table.to_csv(run_dir / f"per_class_{split}.csv", index=False)
                png = plot_confusion(
                    report.confmat,
                    bins.labels,
                    run_dir / f"confusion_{split}.png",
                    f"{split}: routed by {by}",
                )
                rec.artifact(run_dir / f"per_class_{split}.csv", "evaluation")
                rec.artifact(png, "evaluation")
    return out


def run_hierarchy(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train the router and the experts, then score the combined model; returns train()-like results
    whose `objective` is the combined model's validation macro-F1."""
    by = str(cfg.hierarchy.by)
    client, parent = _parent_run(cfg, by)
    stages = stage_configs(cfg, parent)
    run_dir.mkdir(parents=True, exist_ok=True)  # the composed config, as a flat run's folder holds it
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    started = time.perf_counter()
    results: dict[str, dict] = {}
    status = "FAILED"
    try:
        for stage in stages:
            log.info("hierarchy %s: training %s", by, stage.name)
            results[stage.name] = train(stage.cfg, run_dir=run_dir / stage.name)
        rec = _ClientRecorder(client, parent)
        combined = evaluate_routing(cfg, stages, results, run_dir, rec)
        status = "FINISHED"
    except BaseException as exc:
        status = "KILLED" if interrupted(exc) else "FAILED"  # Ctrl-C in a stage's fit is a SystemExit
        raise
    finally:
        if client is not None and status != "FINISHED":
            client.set_terminated(parent, status=status)
    summary: dict[str, Any] = {
        "objective": combined["val/macro_f1"],
        "best_val/macro_f1": combined["val/macro_f1"],
        "test/macro_f1": combined["test/macro_f1"],
        **combined,
        "fit_seconds": round(sum(r["fit_seconds"] for r in results.values()), 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "stages": {
            name: {
                k: r.get(k)
                for k in (
                    "best_val/macro_f1",
                    "test/macro_f1",
                    "best_epoch",
                    "epochs_trained",
                    "fit_seconds",
                    "data_sizes",
                    "checkpoint",
                    "mlflow_run_id",
                    "run_dir",
                )
            }
            for name, r in results.items()
        },
        "class_names": results[stages[1].name]["class_names"],
        "run_dir": str(run_dir),
        "mlflow_run_id": parent,
    }
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    if client is not None:
        metrics = {k: float(v) for k, v in summary.items() if isinstance(v, float)}
        for key, value in metrics.items():
            client.log_metric(parent, key, value)
        client.log_artifact(parent, str(run_dir / "results.json"), "evaluation")
        client.log_artifact(parent, str(run_dir / "config.yaml"), "config")
        client.set_terminated(parent, status="FINISHED")
    log.info(
        "hierarchy by %s: val macro-F1 %.4f, test macro-F1 %.4f (oracle routing: test %.4f; router acc %.3f)",
        by,
        summary["val/macro_f1"],
        summary["test/macro_f1"],
        summary["test/oracle/macro_f1"],
        summary["test/router_acc"],
    )
    return summary


class _ClientRecorder(Recorder):
    """Recorder writing to a given run through an MlflowClient (the parent run is not the active run)."""

    def __init__(self, client, run_id: str | None) -> None:
        super().__init__(enabled=client is not None)
        self.client, self.run_id = client, run_id

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), folder)
