"""What agecls-eval records: the JSON report written atomically, and the MLflow run (its tracking config
over the checkpoint's, tags linking the training run(s), params and metrics).

The store is checked before any work (`check_store`) so that a moved run fails at once, not after scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from agecls.evaluation.scoring import EvalError
from agecls.files import write_atomic  # noqa: F401  (callers import it from here)


def check_store(tracking: DictConfig) -> None:
    """EvalError before any work when a local sqlite tracking store's folder is gone (e.g. a moved run)."""
    uri, prefix = str(tracking.tracking_uri), "sqlite:///"
    if tracking.enabled and uri.startswith(prefix) and not Path(uri[len(prefix) :]).parent.is_dir():
        raise EvalError(
            f"the checkpoint's MLflow store {uri} is not there (its folder is missing); "
            "set tracking.tracking_uri=URI, or tracking.enabled=false"
        )


def tracking_config(run_cfg: DictConfig, cfg: DictConfig, paths: DictConfig) -> DictConfig:
    """The checkpoint's tracking config, experiment + '-eval', with the command's tracking.* over it."""
    base = {
        "enabled": True,
        "tracking_uri": f"sqlite:///{paths.output_dir}/mlflow.db",
        "artifact_root": f"{paths.output_dir}/mlartifacts",
        "experiment": "agecls",
    }
    recorded = OmegaConf.to_container(run_cfg.get("tracking") or {}, resolve=True)
    tracking = {**base, **{k: v for k, v in recorded.items() if k in base}}
    tracking["experiment"] = f"{tracking['experiment']}-eval"
    given = {k: v for k, v in OmegaConf.to_container(cfg.tracking).items() if v is not None}
    tracking.update(given)
    return OmegaConf.create(tracking)


def run_tags(result: dict, modules, ckpts: list[Path], study: dict | None, picked: list) -> dict[str, str]:
    """The eval run's tags: its checkpoint (or members) and the training run(s) that wrote them."""
    tags = {"agecls.kind": "eval", "task": result["task"]}
    if "ensemble" not in result:
        tags["eval.checkpoint"] = result["checkpoint"]
        train_run = training_run(modules[0], ckpts[0])
        if train_run:
            tags["train_run_id"] = train_run
        return tags
    tags["eval.members"] = "\n".join(result["checkpoint"])[:8000]
    train_runs = [m.mlflow_run_id for m in picked] or [
        training_run(m, p) for m, p in zip(modules, ckpts, strict=True)
    ]
    if any(train_runs):
        tags["train_run_ids"] = ",".join(r or "" for r in train_runs)
    if study is not None:
        tags["optuna.study"] = study["name"]
    return tags


def run_params(result: dict, cfg: DictConfig, study: dict | None) -> dict[str, Any]:
    """The eval run's params: checkpoint(s), folder, task, image settings, TTA; an ensemble's size, decision
    rules and study."""
    ensemble = result.get("ensemble")
    params = {
        "ckpt": result["checkpoint"] if ensemble is None else ",".join(result["checkpoint"]),
        "folder": result["folder"],
        "task": result["task"],
        "image_size": result["image_size"],
        "grayscale": result["grayscale"],
        "n_images": result["n_images"],
        "check_images": bool(cfg.eval.check_images),
        "tta": result["tta"],
    }
    if ensemble is not None:
        params["ensemble.n_members"] = ensemble["n_members"]
        params["ensemble.decision"] = ",".join(f"{a}:{r}" for a, r in ensemble["decision"].items())
        if study is not None:
            params.update({f"ensemble.{k}": v for k, v in study.items()})
    return params


def run_metrics(result: dict) -> dict[str, float]:
    """The eval run's metrics (`eval/...`): the report's scores and counts, per attribute and per class, and
    an ensemble's members and gain over the best one."""
    metrics = {
        "eval/macro_f1": result["macro_f1"],
        "eval/acc": result["acc"],
        "eval/n_images": result["n_images"],
        "eval/n_rejected": result["n_rejected"],
        "eval/n_unlabelled": result["n_unlabelled"],
    }
    if "mae" in result:
        metrics["eval/mae"] = result["mae"]
    for attr, d in result.get("attributes", {}).items():
        metrics.update({f"eval/{attr}/{k}": d[k] for k in ("macro_f1", "acc", "mae") if k in d})
    metrics.update({f"eval/f1_{r['class']}": r["f1"] for r in result["per_class"] if r["f1"] is not None})
    ensemble = result.get("ensemble")
    if ensemble is not None:
        metrics.update({f"eval/member{i}/macro_f1": m["macro_f1"] for i, m in enumerate(ensemble["members"])})
        metrics["eval/best_member_macro_f1"] = ensemble["best_member_macro_f1"]
        metrics["eval/gain_over_best_member"] = ensemble["gain_over_best_member"]
    return metrics


def training_run(module, ckpt: Path) -> str | None:
    """The MLflow run id that trained `module` (saved as `ckpt`) when its run recorded to MLflow."""
    recorded = module.cfg.get("tracking") or {}
    if recorded.get("enabled") and "tracking_uri" in recorded:
        return find_training_run(recorded, ckpt)
    return None


def find_training_run(tracking: DictConfig, ckpt: Path) -> str | None:
    """The MLflow run that wrote `ckpt` (tag run_dir = the checkpoint's run folder), if it can be found."""
    import mlflow

    try:
        mlflow.set_tracking_uri(tracking.tracking_uri)
        experiment = mlflow.get_experiment_by_name(str(tracking.experiment))
        if experiment is None:
            return None
        run_dir = str(ckpt.resolve().parent.parent).replace("'", "\\'")
        found = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.run_dir = '{run_dir}'",
            max_results=1,
            output_format="list",
        )
    except Exception:  # an unreachable or foreign store only loses the link, not the evaluation
        return None
    return found[0].info.run_id if found else None
