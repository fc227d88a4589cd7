"""`agecls-serve`: the upload page and JSON API over agecls-predict."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from agecls.cli import predict
from agecls.cli.args import help_exit
from agecls.errors import UsageError
from agecls.serving.predict import PREDICT_DEFAULTS, Predictor
from agecls.serving.serve import SERVE_DEFAULTS, create_app

PROG = "agecls-serve"


HELP = f"""usage: {PROG} ckpt=PATH [host=127.0.0.1] [port=8000] [max_upload_mb=10] [max_batch=16]
       [max_pixels=N] [detect=true] [margin=0.3] [align=true] [device=cpu] [tracking_uri=URI]

Serve an upload page at http://HOST:PORT/ and a JSON API (POST /api/predict with field `file`,
POST /api/predict/batch with fields `files`).
ckpt as for agecls-predict (a file, [a,b,c], models:/NAME@ALIAS).
"""


def parse_args(argv: Sequence[str]) -> DictConfig:
    """SERVE_DEFAULTS with `key=value` overrides; UsageError for unknown keys or bad values."""
    serve_keys = {k: v for k, v in SERVE_DEFAULTS.items() if k not in PREDICT_DEFAULTS}
    own = [a for a in argv if a.split("=", 1)[0] in serve_keys]
    rest = [a for a in argv if a not in own]
    for arg in rest:
        if arg.split("=", 1)[0] not in SERVE_DEFAULTS:
            raise UsageError(f"unknown key {arg.split('=', 1)[0]!r} (valid: {', '.join(SERVE_DEFAULTS)})")
    cfg = predict.parse_args([*rest, "images=-"])
    del cfg["images"], cfg["out"], cfg["grid"]
    extra = OmegaConf.create(serve_keys)
    for arg in own:
        key, value = arg.split("=", 1)
        extra[key] = value if key == "host" else _positive_int(key, value)
    return OmegaConf.merge(cfg, extra)


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"{key}={value!r}: valid: a whole number >= 1")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    code = help_exit(args, HELP)
    if code is not None:
        return code
    try:
        cfg = parse_args(args)
        predictor = Predictor.from_config(cfg)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(predictor, max_upload_mb=float(cfg.max_upload_mb), max_batch=int(cfg.max_batch))
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
