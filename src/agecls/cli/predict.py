"""`agecls-predict`: faces in photos -> age group, gender and ethnicity with probabilities."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from agecls.cli.args import apply_overrides, check_bool, check_int, help_exit, require
from agecls.errors import UsageError
from agecls.serving.predict import DEFAULT_MAX_PIXELS, PREDICT_DEFAULTS, PROG, run

HELP = f"""usage: {PROG} ckpt=PATH images=FILE_OR_DIR [KEY=VALUE ...]

Find faces in photos and predict every attribute the checkpoint(s) know (age group, gender, ethnicity)
with probabilities. Writes predictions.json, predictions.csv and predictions.png under out=.

keys (Hydra override syntax):
  ckpt=PATH | ckpt=[A,B,C]   a checkpoint, or one per attribute; or models:/NAME@ALIAS, models:/NAME/VER
  images=FILE_OR_DIR         a photo or a folder of photos (jpg, png, webp, bmp, tif, gif)
  out=DIR                    output folder (default predictions)
  detect=BOOL                find faces with OpenCV Haar cascades (default true); false: images are crops
  margin=F                   square crop side = face box side * (1 + 2*F) (default 0.3, ~UTKFace framing)
  align=BOOL                 level the eyes before cropping when two are found (default true)
  min_face=N, max_faces=N    smallest face side in pixels (24); faces kept per photo (20)
  max_pixels=N               refuse larger photos (default {DEFAULT_MAX_PIXELS})
  batch_size=N, device=DEV   forward-pass batch (32); cpu | cuda | auto (cpu)
  grid=BOOL                  write the annotated grid predictions.png (default true)
  tracking_uri=URI           MLflow store for ckpt=models:/... (default: MLFLOW_TRACKING_URI / the default)

exit codes: 0 done (even when some files were unreadable), 1 nothing could be predicted, 2 bad arguments
"""


def parse_args(argv: Sequence[str]) -> DictConfig:
    """PREDICT_DEFAULTS with `key=value` overrides (Hydra's override grammar); UsageError otherwise."""
    cfg = apply_overrides(argv, PREDICT_DEFAULTS, "a list of checkpoints: ckpt=[a,b]")
    require(cfg, "ckpt", "images")
    for key in ("min_face", "max_faces", "max_pixels", "batch_size"):
        check_int(cfg, key, 1)
    if isinstance(cfg.margin, bool) or not isinstance(cfg.margin, int | float) or not 0 <= cfg.margin <= 2:
        raise UsageError(f"margin={cfg.margin!r}: valid: a number from 0 to 2")
    for key in ("detect", "align", "grid"):
        check_bool(cfg, key)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    code = help_exit(args, HELP)
    if code is not None:
        return code
    try:
        summary = run(parse_args(args))
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "images"}, indent=2))
    return 0 if summary["n_files"] > summary["n_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
