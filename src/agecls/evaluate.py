"""`agecls-eval`: score a trained checkpoint, or an ensemble of them, on every labelled image of a folder
(no split).

    agecls-eval ckpt=PATH data.root=DIR [eval.out=FILE] [eval.batch_size=N] [tracking.experiment=NAME]
    agecls-eval ckpt=[A,B,C] data.root=DIR                        (an ensemble: mean class probabilities)
    agecls-eval ensemble.study=NAME ensemble.top_k=3 data.root=DIR (the study's 3 best trials' checkpoints)

The checkpoint alone defines the evaluation: its hyperparameters hold the training run's resolved config
(task, bins, class names, image size, colour mode, crop margin, normalisation), so the folder is decoded and
scored exactly as that run's test split was. An ensemble's members must agree on all of that but the
weights (`agecls.ensemble`). Arguments are Hydra-style `key=value` overrides of EVAL_DEFAULTS.

This module is the command: its keys, decoding the folder and assembling the report. Which checkpoints
are scored and how (loading, normalisation, predictions, per-attribute scores) is `agecls.eval_score`; what
is written (the JSON file, the MLflow run) is `agecls.eval_record`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from agecls.cli_args import UsageError, apply_overrides, check_bool, check_int, flat_keys, help_exit, require
from agecls.eval_record import (
    check_store,
    run_metrics,
    run_params,
    run_tags,
    tracking_config,
    write_atomic,
)
from agecls.eval_score import EvalError, load_checkpoint, member_checkpoints, score_checkpoints

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

    modules = [load_checkpoint(path) for path in ckpts]
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
    tracking = tracking_config(run_cfg, cfg, paths)
    check_store(tracking)

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
    scored, ensemble = score_checkpoints(
        cfg, modules, ckpts, (images, rows, labels, columns), transforms, study, picked
    )
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

    tags = run_tags(result, modules, ckpts, study, picked)
    default_name = (
        f"eval {folder.name}" if ensemble is None else f"eval ensemble of {len(ckpts)} {folder.name}"
    )
    run_name = tracking.get("run_name") or default_name
    with recording(tracking, run_name=run_name, tags=tags) as rec, tempfile.TemporaryDirectory() as tmp:
        result["mlflow_run_id"] = rec.run_id
        result["seconds"] = round(time.perf_counter() - started, 2)
        text = json.dumps(result, indent=2) + "\n"
        if cfg.eval.out:
            write_atomic(Path(str(cfg.eval.out)).expanduser(), text)
        if rec.enabled:
            rec.params(run_params(result, cfg, study))
            rec.metrics(run_metrics(result))
            report_file = Path(tmp) / "eval.json"
            report_file.write_text(text)
            rec.artifact(report_file, "evaluation")
            png = plot_confusion(report.confmat, class_names, Path(tmp) / "confusion_eval.png", folder.name)
            rec.artifact(png, "evaluation")
    return result


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
