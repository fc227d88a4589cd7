"""`agecls-eval`: score a trained checkpoint, or an ensemble of them, on every labelled image of a folder
(no split).

    agecls-eval ckpt=PATH data.root=DIR [eval.out=FILE] [eval.batch_size=N] [tracking.experiment=NAME]
    agecls-eval ckpt=[A,B,C] data.root=DIR                        (an ensemble: mean class probabilities)
    agecls-eval ensemble.study=NAME ensemble.top_k=3 data.root=DIR (the study's 3 best trials' checkpoints)

The checkpoint alone defines the evaluation: its hyperparameters hold the training run's resolved config
(task, bins, class names, image size, colour mode, crop margin, normalisation), so the folder is decoded and
scored exactly as that run's test split was. An ensemble's members must agree on all of that but the
weights (`agecls.ensemble`). Arguments are Hydra-style `key=value` overrides of EVAL_DEFAULTS.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from agecls.cli_args import UsageError, apply_overrides, check_bool, check_int, flat_keys, help_exit, require

PROG = "agecls-eval"

# Every key agecls-eval takes (`key=value`); null means "from the checkpoint / the environment".
EVAL_DEFAULTS: dict[str, Any] = {
    "ckpt": None,  # the FaceClassifier checkpoint (e.g. a run's checkpoints/best.ckpt), or a list (ensemble)
    "ensemble": {  # instead of ckpt: the checkpoints of an Optuna study's best top_k COMPLETE trials
        "study": None,
        "top_k": 3,
        "storage": None,  # default: optuna.storage as agecls-train composes it
    },
    "data": {"root": None},  # a folder of UTKFace-named images; every labelled one is scored
    "eval": {
        "out": None,  # also write the JSON here (atomically)
        "batch_size": 256,
        "num_workers": 0,
        "check_images": True,  # fully decode each file when scanning (rejects truncated files)
        "device": "auto",  # auto (cuda when available) | cpu | cuda | cuda:N
        "tta": None,  # none | flip: test-time augmentation of every member (null: each checkpoint's own)
    },
    "tracking": {  # over the checkpoint's tracking config; experiment default: <its experiment>-eval
        "enabled": None,
        "experiment": None,
        "tracking_uri": None,
        "artifact_root": None,
        "run_name": None,
    },
    "paths": {"cache_dir": None},  # decoded-image cache; default: <output dir>/cache (AGECLS_OUTPUT_DIR)
}

HELP = f"""usage: {PROG} ckpt=PATH data.root=DIR [KEY=VALUE ...]
       {PROG} ckpt=[PATH,PATH,...] data.root=DIR [KEY=VALUE ...]
       {PROG} ensemble.study=NAME [ensemble.top_k=K] data.root=DIR [KEY=VALUE ...]

Score a trained agecls checkpoint on every labelled image of a folder of UTKFace-named images
(labels from the file names; no split). The checkpoint's own config decides the task, bins, class names,
image size, colour mode, crop and normalisation. Prints a JSON report (macro_f1, acc, per-class precision/
recall/f1/support, confusion matrix, class names, image and rejected-file counts) and records it as an MLflow
run in the checkpoint's tracking store (experiment <training experiment>-eval) unless tracking.enabled=false.

Several checkpoints are scored as one ensemble: each predicts class probabilities, the ensemble's are their
mean, its class the argmax (coral/corn age heads: the median bin of the mean distribution; regression and
label_distribution: the mean predicted age, binned). The members must share task, class names, bins, image
size, crop margin, colour mode and normalisation. The report's `ensemble` block lists the members with their
own macro_f1 beside the ensemble's (gain_over_best_member).

keys (Hydra override syntax; quote values holding spaces or commas):
  ckpt=PATH                 checkpoint file, e.g. outputs/runs/<date>/<time>/checkpoints/best.ckpt (required
                            unless ensemble.study is given); ckpt=[A,B,C]: an ensemble of those checkpoints
  ensemble.study=NAME       an ensemble of the Optuna study's best trials (by their validation objective, in
                            the study's direction; never a test score): their `checkpoint` user attributes
  ensemble.top_k=K          how many of its COMPLETE trials (default 3; 1: the best trial alone)
  ensemble.storage=URI      the study's Optuna storage (default: optuna.storage of agecls-train,
                            sqlite:///<output dir>/optuna.db)
  data.root=DIR             folder of images named like UTKFace (required); unusable files are reported
  eval.out=FILE             also write the JSON report to FILE (atomically)
  eval.batch_size=N         images per forward pass (default 256)
  eval.num_workers=N        DataLoader worker processes (default 0)
  eval.check_images=BOOL    fully decode every file when scanning (default true)
  eval.device=DEV           auto | cpu | cuda | cuda:N (default auto)
  eval.tta=MODE             none | flip: test-time augmentation for every checkpoint (default: each one's
                            augment.tta from training), e.g. to measure what flip TTA adds on validation
  tracking.enabled=BOOL     record the evaluation in MLflow (default: as the checkpoint's run did)
  tracking.experiment=NAME  MLflow experiment (default: the training run's experiment + '-eval')
  tracking.tracking_uri=URI, tracking.artifact_root=DIR, tracking.run_name=NAME
  paths.cache_dir=DIR       where decoded images are cached (default: the output dir's cache/)

exit codes: 0 done, 1 the folder or checkpoint cannot be evaluated, 2 bad or missing arguments
"""


class EvalError(ValueError):
    """The checkpoint or the folder cannot be evaluated (exit code 1)."""


VALID_KEYS = flat_keys(EVAL_DEFAULTS)


def parse_args(argv: Sequence[str]) -> DictConfig:
    """EVAL_DEFAULTS with `key=value` overrides applied (Hydra's override grammar); UsageError otherwise."""
    cfg = apply_overrides(argv, EVAL_DEFAULTS, "quote a value holding commas; a list is ckpt=[a,b]")
    if cfg.ensemble.study in (None, ""):
        require(cfg, "ckpt", "data.root")
    elif cfg.ckpt not in (None, "", []):
        raise UsageError("give ckpt=... or ensemble.study=..., not both")
    require(cfg, "data.root")
    check_int(cfg, "ensemble.top_k", 1)
    if isinstance(cfg.ckpt, ListConfig):
        given = [str(c) for c in cfg.ckpt]
        twice = sorted({c for c in given if given.count(c) > 1})
        if twice:
            raise UsageError(f"ckpt=[...] lists {twice[0]} more than once; give each member once")
    check_int(cfg, "eval.batch_size", 1)
    check_int(cfg, "eval.num_workers", 0)
    check_bool(cfg, "eval.check_images", optional=True)
    check_bool(cfg, "tracking.enabled", optional=True)
    return cfg


def default_paths() -> DictConfig:
    """The `paths` group as agecls-train resolves it here (AGECLS_OUTPUT_DIR or the default outputs/)."""
    from agecls.config import CONFIG_DIR

    return OmegaConf.create({"paths": OmegaConf.load(CONFIG_DIR / "paths" / "default.yaml")}).paths


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def normalize_stats(run_cfg: DictConfig, images, rows, stored=None) -> tuple[Any, Any] | None:
    """(mean, std) the checkpoint's run normalised with, or None for data.normalize=none.

    `stored` is the checkpoint's `input_stats` (FaceClassifier): what the datamodule resolved, used as is.
    Checkpoints saved before it was kept have None there; their `dataset` statistics are recomputed from
    the training run's own train split (its persisted manifest and cached images, as recorded in the
    checkpoint's config), which fails with EvalError when that data is gone."""
    import numpy as np

    from agecls.data.augment import resolve_normalize

    if stored is not None:
        return np.asarray(stored["mean"], np.float32), np.asarray(stored["std"], np.float32)
    spec = run_cfg.data.get("normalize", "none")
    if spec != "dataset":
        return resolve_normalize(spec, images, rows)
    from agecls.data.prepare import data_lock, resolve_manifest

    try:
        with data_lock(run_cfg.paths.data_dir):
            manifest = resolve_manifest(run_cfg.data, run_cfg.paths)
        from agecls.data.cache import build_cache

        train_images = build_cache(
            [manifest.root / p for p in manifest.df["path"]],
            run_cfg.paths.cache_dir,
            key=manifest.hash,
            size=int(run_cfg.data.image_size) + int(run_cfg.data.get("crop_margin") or 0),
            grayscale=bool(run_cfg.data.grayscale),
        )
    except (ValueError, OSError) as exc:
        raise EvalError(
            "the checkpoint was trained with data.normalize=dataset, whose mean/std come from its train "
            f"split, and that split cannot be read again ({exc})"
        ) from None
    train_rows = np.flatnonzero(manifest.df["split"].to_numpy() == "train")
    return resolve_normalize("dataset", train_images, train_rows)


def _find_training_run(tracking: DictConfig, ckpt: Path) -> str | None:
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


def member_checkpoints(cfg: DictConfig) -> tuple[list[Path], dict[str, Any] | None, list[Any]]:
    """The checkpoint files to score: `ckpt` (one path or a list), or the best `ensemble.top_k` trials of
    `ensemble.study`; with, for a study, its description and the picked trials (`ensemble.StudyMember`)."""
    if cfg.ensemble.study not in (None, ""):
        from agecls.ensemble import study_members

        storage = str(cfg.ensemble.storage or default_storage())
        picked = study_members(storage, str(cfg.ensemble.study), int(cfg.ensemble.top_k))
        study = {"name": str(cfg.ensemble.study), "storage": storage, "top_k": int(cfg.ensemble.top_k)}
        return [m.checkpoint for m in picked], study, picked
    given = list(cfg.ckpt) if isinstance(cfg.ckpt, ListConfig) else [cfg.ckpt]
    paths = [Path(str(c)).expanduser() for c in given]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"ckpt={path}: no such checkpoint file")
    return paths, None, []


def default_storage() -> str:
    """optuna.storage as agecls-train composes it (AGECLS_OUTPUT_DIR or the default outputs/)."""
    from agecls.report import default_tracking

    return default_tracking()[2]


def _load(path: Path):
    from agecls.module import FaceClassifier

    try:
        return FaceClassifier.load_from_checkpoint(path, map_location="cpu")
    except Exception as exc:
        raise EvalError(
            f"ckpt={path}: not a loadable agecls checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt` (or the ensemble of checkpoints it lists or `cfg.ensemble` names) on every
    labelled image of `cfg.data.root` (a parse_args config); return the report, also written to eval.out
    and recorded in MLflow as configured."""
    started = time.perf_counter()
    folder = Path(str(cfg.data.root)).expanduser()
    ckpts, study, picked = member_checkpoints(cfg)
    if not folder.is_dir():
        raise UsageError(f"data.root={folder}: no such folder")

    import numpy as np

    from agecls.data.augment import build_augment
    from agecls.data.bins import AgeBins
    from agecls.data.cache import build_cache
    from agecls.data.prepare import frame_targets
    from agecls.data.records import folder_fingerprint, scan_folder
    from agecls.metrics import plot_confusion
    from agecls.tracking import recording

    modules = [_load(path) for path in ckpts]
    if cfg.eval.get("tta") is not None:
        for m in modules:
            try:
                m.tta = str(cfg.eval.tta)
            except ValueError as exc:
                raise UsageError(str(exc).replace("augment.tta", "eval.tta")) from None
    if len(modules) > 1:
        from agecls.ensemble import check_members

        check_members(ckpts, modules)
    module = modules[0]  # every member predicts and reads images as this one does
    run_cfg = module.cfg
    target = str(run_cfg.task.target)  # `multitask` for a multitask checkpoint
    size = int(run_cfg.data.image_size) + int(run_cfg.data.get("crop_margin") or 0)
    grayscale = bool(run_cfg.data.grayscale)
    paths = default_paths()
    tracking = _tracking_config(run_cfg, cfg, paths)
    _check_store(tracking)

    scan = scan_folder(folder, check_images=bool(cfg.eval.check_images))
    records = scan.records
    bins = AgeBins.from_config(run_cfg.bins) if "age" in module.attributes else None
    columns = max((m.columns for m in modules), key=len)  # exact age too when any member's head reads it
    labels = frame_targets(records, list(columns), bins)
    labelled = labels >= 0 if labels.ndim == 1 else (labels[:, : len(module.attributes)] >= 0).any(axis=1)
    rows = np.flatnonzero(labelled)
    if len(rows) == 0:
        raise EvalError(f"data.root={folder}: none of its {len(records)} valid images has a {target} label")

    cache_dir = Path(str(cfg.paths.cache_dir or paths.cache_dir))
    fingerprint = folder_fingerprint(folder)["sha256"]
    images = build_cache(
        [folder / p for p in records["path"]],
        cache_dir,
        key=f"eval-{fingerprint[:24]}",  # the folder's names and sizes; size and mode are in the file name
        size=size,
        grayscale=grayscale,
    )
    transforms = build_augment(OmegaConf.create({"name": "none", "train": []}), data=run_cfg.data)
    scored, ensemble = _score(cfg, modules, ckpts, (images, rows, labels, columns), transforms, study, picked)
    headline = scored[module.objective]
    report = headline.pop("report")
    class_names = headline["class_names"]

    result: dict[str, Any] = {
        # an ensemble: the list of its members' checkpoints
        "checkpoint": str(ckpts[0].resolve()) if ensemble is None else [str(p.resolve()) for p in ckpts],
        "folder": str(folder.resolve()),
        "task": target,
        "class_names": class_names,
        "n_images": len(rows),
        "n_rejected": len(scan.rejected),
        "n_unlabelled": int(len(records) - len(rows)),
        **{k: headline[k] for k in ("macro_f1", "acc", "per_class", "confusion_matrix")},
        "rejected": scan.rejected.head(100).to_dict(orient="records"),
        "image_size": int(run_cfg.data.image_size),
        "grayscale": grayscale,
        "tta": modules[0].tta if len({m.tta for m in modules}) == 1 else [m.tta for m in modules],
        "bins": bins.to_dict() if bins is not None else None,
        "folder_fingerprint": fingerprint,
        "mlflow_run_id": None,
    }
    if "mae" in headline:  # an age head predicting years: mean absolute error in years
        result["mae"] = headline["mae"]
    if module.multitask:  # every attribute's scores; the top-level ones are the objective attribute's
        result["objective_attribute"] = module.objective
        result["attributes"] = {a: {k: v for k, v in d.items() if k != "report"} for a, d in scored.items()}
    if ensemble is not None:
        result["ensemble"] = ensemble

    tags = _run_tags(result, modules, ckpts, study, picked)
    default_name = (
        f"eval {folder.name}" if ensemble is None else f"eval ensemble of {len(ckpts)} {folder.name}"
    )
    run_name = tracking.get("run_name") or default_name
    with recording(tracking, run_name=run_name, tags=tags) as rec, tempfile.TemporaryDirectory() as tmp:
        result["mlflow_run_id"] = rec.run_id
        result["seconds"] = round(time.perf_counter() - started, 2)
        text = json.dumps(result, indent=2) + "\n"
        if cfg.eval.out:
            _write_atomic(Path(str(cfg.eval.out)).expanduser(), text)
        if rec.enabled:
            rec.params(_run_params(result, cfg, study))
            rec.metrics(_run_metrics(result))
            report_file = Path(tmp) / "eval.json"
            report_file.write_text(text)
            rec.artifact(report_file, "evaluation")
            png = plot_confusion(report.confmat, class_names, Path(tmp) / "confusion_eval.png", folder.name)
            rec.artifact(png, "evaluation")
    return result


def _score(cfg, modules, ckpts, data, transforms, study, picked) -> tuple[dict[str, dict], dict | None]:
    """`_score_attributes` of the checkpoint's (or the ensemble's) predictions on `data` (decoded images,
    labelled rows, targets, their columns), and the report's `ensemble` block (None for one checkpoint)."""
    import torch
    from torch.utils.data import DataLoader

    from agecls.data.datamodule import FaceDataset

    images, rows, labels, columns = data
    device = str(cfg.eval.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = modules[0]
    if len(modules) == 1 and study is None:  # a study's best trial alone still reports its ensemble block
        stats = normalize_stats(module.cfg, images, rows, module.input_stats)
        mean, std = stats if stats is not None else (None, None)
        loader = DataLoader(
            FaceDataset(images, rows, labels, transforms.eval, mean, std),
            batch_size=int(cfg.eval.batch_size),
            num_workers=int(cfg.eval.num_workers),
        )
        module.to(device)
        return _score_attributes(module.collect(loader), module.class_names), None
    from agecls.ensemble import Member, collect, report_block

    members = []  # one un-normalised loader; each member normalises its batches as its own run did
    for path, member in zip(ckpts, modules, strict=True):
        stats = normalize_stats(member.cfg, images, rows, member.input_stats)
        mean, std = (
            (torch.as_tensor(s, dtype=torch.float32).view(1, -1, 1, 1).to(device) for s in stats)
            if stats is not None
            else (None, None)
        )
        members.append(Member(path, member.to(device), mean, std))
    loader = DataLoader(
        FaceDataset(images, rows, labels, transforms.eval),
        batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.eval.num_workers),
    )
    predicted, per_member, rules = collect(members, loader, columns, device)
    scored = _score_attributes(predicted, module.class_names)
    return scored, report_block(ckpts, per_member, module, rules, scored, study, picked)


def _run_tags(result: dict, modules, ckpts: list[Path], study: dict | None, picked: list) -> dict[str, str]:
    """The eval run's tags: its checkpoint (or members) and the training run(s) that wrote them."""
    tags = {"agecls.kind": "eval", "task": result["task"]}
    if "ensemble" not in result:
        tags["eval.checkpoint"] = result["checkpoint"]
        train_run = _training_run(modules[0], ckpts[0])
        if train_run:
            tags["train_run_id"] = train_run
        return tags
    tags["eval.members"] = "\n".join(result["checkpoint"])[:8000]
    train_runs = [m.mlflow_run_id for m in picked] or [
        _training_run(m, p) for m, p in zip(modules, ckpts, strict=True)
    ]
    if any(train_runs):
        tags["train_run_ids"] = ",".join(r or "" for r in train_runs)
    if study is not None:
        tags["optuna.study"] = study["name"]
    return tags


def _run_params(result: dict, cfg: DictConfig, study: dict | None) -> dict[str, Any]:
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


def _run_metrics(result: dict) -> dict[str, float]:
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


def _training_run(module, ckpt: Path) -> str | None:
    recorded = module.cfg.get("tracking") or {}
    if recorded.get("enabled") and "tracking_uri" in recorded:
        return _find_training_run(recorded, ckpt)
    return None


def _score_attributes(predicted: dict[str, dict], class_names: dict[str, list[str]]) -> dict[str, dict]:
    """{attribute: macro_f1, acc, per_class, confusion_matrix, class_names, n_images (faces with the
    attribute), mae (heads predicting years), report (its StageReport)} of FaceClassifier.collect output."""
    from agecls.metrics import stage_report

    scored: dict[str, dict] = {}
    for attr, got in predicted.items():
        known = got["labels"] >= 0
        report = stage_report(got["preds"][known], got["labels"][known], class_names[attr])
        scored[attr] = {
            "class_names": class_names[attr],
            "n_images": int(known.sum()),
            "macro_f1": report.metrics["macro_f1"],
            "acc": report.metrics["acc"],
            "per_class": [
                {
                    "class": str(r["class"]),
                    **{k: _finite(r[k]) for k in ("precision", "recall", "f1")},
                    "support": int(r["support"]),
                }
                for _, r in report.table.iterrows()
            ],
            "confusion_matrix": report.confmat.astype(int).tolist(),  # rows true, columns predicted
            "report": report,
        }
        if "years" in got:
            scored[attr]["mae"] = float((got["years"][known] - got["true_years"][known]).abs().mean())
    return scored


def _check_store(tracking: DictConfig) -> None:
    """EvalError before any work when a local sqlite tracking store's folder is gone (e.g. a moved run)."""
    uri, prefix = str(tracking.tracking_uri), "sqlite:///"
    if tracking.enabled and uri.startswith(prefix) and not Path(uri[len(prefix) :]).parent.is_dir():
        raise EvalError(
            f"the checkpoint's MLflow store {uri} is not there (its folder is missing); "
            "set tracking.tracking_uri=URI, or tracking.enabled=false"
        )


def _tracking_config(run_cfg: DictConfig, cfg: DictConfig, paths: DictConfig) -> DictConfig:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    code = help_exit(args, HELP)
    if code is not None:
        return code
    try:
        cfg = parse_args(args)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON report
            result = evaluate(cfg)
    except UsageError as exc:
        print(
            f"usage: {PROG} ckpt=PATH data.root=DIR [KEY=VALUE ...]  (--help for all keys)", file=sys.stderr
        )
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # EvalError, DataError (folder without valid images), ...
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
