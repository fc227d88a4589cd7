"""`agecls-eval`: score a checkpoint (or an ensemble) on a labelled image folder."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig

from agecls.cli.app import App, app_keys, compose_args, run
from agecls.cli.args import check_bool, check_int, require
from agecls.errors import UsageError

APP = App(
    prog="agecls-eval",
    config="eval",
    summary="score a checkpoint, or an ensemble of them, on every labelled image of a folder.",
    usage="agecls-eval ckpt=PATH data.root=DIR [KEY=VALUE ...]",
    description="""\
The folder holds images named like UTKFace (labels from the file names; no split). The checkpoint's own
config decides the task, bins, class names, image size, colour mode, crop and normalisation. Prints a JSON
report (macro_f1, acc, per-class precision/recall/f1/support, confusion matrix, class names, image and
rejected-file counts) and records it as an MLflow run in the checkpoint's tracking store (experiment
<training experiment>-eval) unless tracking.enabled=false.

Several checkpoints are scored as one ensemble: each predicts class probabilities, the ensemble's are their
mean, its class the argmax (coral/corn age heads: the median bin of the mean distribution; regression and
label_distribution: the mean predicted age, binned). The members must share task, class names, bins, image
size, crop margin, colour mode and normalisation. The report's `ensemble` block lists the members with their
own macro_f1 beside the ensemble's (gain_over_best_member).""",
    examples=(
        "agecls-eval ckpt=outputs/runs/<date>/<time>/checkpoints/best.ckpt data.root=/path/to/faces",
        "agecls-eval ckpt=[runA/checkpoints/best.ckpt,runB/checkpoints/best.ckpt] data.root=/path/to/faces",
        "agecls-eval ensemble.study=optuna_models ensemble.top_k=3 data.root=/path/to/faces eval.out=r.json",
    ),
    exit_codes="0 done, 1 the folder or checkpoint cannot be evaluated, 2 bad or missing arguments",
    sweep_hint="quote a value holding commas; a list is ckpt=[a,b]",
)
PROG = APP.prog
VALID_KEYS = app_keys(APP)


def parse_args(argv: Sequence[str]) -> DictConfig:
    """conf/eval.yaml with `key=value` overrides (Hydra's override grammar), checked; UsageError otherwise."""
    return check(compose_args(APP, argv))


def check(cfg: DictConfig) -> DictConfig:
    """The composed config, once its values are valid (UsageError naming the first that is not)."""
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


def _evaluate(cfg: DictConfig, _overrides: list[str]) -> int:
    from agecls.evaluation.evaluate import evaluate

    cfg = check(cfg)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON report
        result = evaluate(cfg)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _evaluate)


if __name__ == "__main__":
    sys.exit(main())
