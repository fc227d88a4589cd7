"""`agecls-eval`: score a checkpoint (or an ensemble) on a labelled image folder."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig

from agecls.cli.args import apply_overrides, check_bool, check_int, flat_keys, help_exit, require
from agecls.errors import UsageError
from agecls.evaluation.evaluate import EVAL_DEFAULTS, evaluate

PROG = "agecls-eval"

VALID_KEYS = flat_keys(EVAL_DEFAULTS)


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
