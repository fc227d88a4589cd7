"""`agecls-predict`: faces in photos -> age group, gender and ethnicity with probabilities."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from agecls.cli.app import App, compose_args, run
from agecls.cli.args import check_bool, check_int, require
from agecls.data.faces.finders import FINDERS
from agecls.errors import UsageError

APP = App(
    prog="agecls-predict",
    config="predict",
    summary="find faces in photos and predict age group, gender and ethnicity with probabilities.",
    usage="agecls-predict ckpt=PATH images=FILE_OR_DIR [KEY=VALUE ...]",
    description="""\
Every attribute the checkpoint(s) know is predicted; each checkpoint's own config decides its preprocessing.
Prints the model (file or registered version, MLflow run, training data, validation macro-F1) and a table
of every face (file, box x,y,w,h, each attribute's class and probability; photos without a face and
unreadable files too), then writes predictions.json, predictions.csv (one row per face) and predictions.png
(an annotated grid) under out=.""",
    examples=(
        "agecls-predict ckpt=outputs/runs/<date>/<time>/checkpoints/best.ckpt images=photos/ out=predictions",
        "agecls-predict ckpt=[age.ckpt,gender.ckpt,eth.ckpt] images=me.jpg   # one checkpoint per attribute",
        "agecls-predict ckpt=models:/agecls-demo@best tracking_uri=sqlite:///outputs/mlflow.db images=me.jpg",
        "agecls-predict ckpt=best.ckpt images=crops/ detect=false          # the images are face crops",
    ),
    exit_codes="0 done (even when some files were unreadable), 1 nothing could be predicted, 2 bad arguments",
    sweep_hint="a list of checkpoints: ckpt=[a,b]",
)
PROG = APP.prog


def parse_args(argv: Sequence[str]) -> DictConfig:
    """conf/predict.yaml with `key=value` overrides (Hydra's override grammar), checked; UsageError
    otherwise."""
    return check(compose_args(APP, argv))


def check_faces(cfg: DictConfig) -> None:
    """The checkpoint and face-finding keys agecls-predict and agecls-serve share."""
    require(cfg, "ckpt")
    for key in ("min_face", "max_faces", "max_pixels", "batch_size"):
        check_int(cfg, key, 1)
    if cfg.finder not in FINDERS:
        raise UsageError(f"finder={cfg.finder!r}: valid: {' | '.join(FINDERS)}")
    if not isinstance(cfg.framing, str) or not cfg.framing:
        raise UsageError(
            f"framing={cfg.framing!r}: valid: checkpoint, or a folder of training-style face crops"
        )
    for key in ("detect", "align"):
        check_bool(cfg, key)


def check(cfg: DictConfig) -> DictConfig:
    """The composed config, once its values are valid (UsageError naming the first that is not)."""
    require(cfg, "ckpt", "images")
    check_faces(cfg)
    check_bool(cfg, "grid")
    return cfg


def _predict(cfg: DictConfig, _overrides: list[str]) -> int:
    from agecls.serving.predict import console_table
    from agecls.serving.predict import run as predict

    summary = predict(check(cfg))
    print("\n".join(console_table(summary)))
    counts = (
        f"{summary['n_files']} files: {summary['n_faces']} faces, {summary['n_no_face']} without a face, "
        f"{summary['n_errors']} unreadable ({summary['seconds']:g} s)"
    )
    print(counts)
    print("wrote " + ", ".join(summary["outputs"]))
    return 0 if summary["n_files"] > summary["n_errors"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _predict)


if __name__ == "__main__":
    sys.exit(main())
