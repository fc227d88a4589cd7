"""`agecls-serve`: the upload page and JSON API over agecls-predict."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from agecls.cli.app import App, compose_args, run
from agecls.cli.args import check_int
from agecls.cli.predict import check_faces
from agecls.errors import UsageError

APP = App(
    prog="agecls-serve",
    config="serve",
    summary="serve an upload page and a JSON API that predict age group, gender and ethnicity of photos.",
    usage="agecls-serve ckpt=PATH [host=127.0.0.1] [port=8000] [KEY=VALUE ...]",
    description="""\
The page is at http://HOST:PORT/; the API: POST /api/predict with field `file`, POST /api/predict/batch with
fields `files`, GET /api/info. ckpt and the face-finding keys are those of agecls-predict. At most
max_concurrent requests decode and predict at once and max_queue more wait; any other gets 503 with
Retry-After. JPEGs decode reduced; other formats over max_decoded_pixels are refused (413).""",
    examples=(
        "agecls-serve ckpt=outputs/runs/<date>/<time>/checkpoints/best.ckpt",
        "agecls-serve ckpt=[age.ckpt,gender.ckpt,eth.ckpt] port=8080 max_upload_mb=5",
        "agecls-serve ckpt=models:/agecls-demo@best tracking_uri=sqlite:///outputs/mlflow.db host=0.0.0.0",
    ),
    exit_codes="0 stopped, 1 a runtime problem, 2 bad arguments",
    text_keys=("host",),
    sweep_hint="a list of checkpoints: ckpt=[a,b]",
)
PROG = APP.prog


def parse_args(argv: Sequence[str]) -> DictConfig:
    """conf/serve.yaml with `key=value` overrides, checked; UsageError for unknown keys or bad values."""
    return check(compose_args(APP, argv))


def check(cfg: DictConfig) -> DictConfig:
    """The composed config, once its values are valid (UsageError naming the first that is not)."""
    check_faces(cfg)
    port = cfg.port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"port={port!r}: valid: a whole number from 1 to 65535")
    for key in ("max_upload_mb", "max_batch", "max_concurrent", "max_decoded_pixels"):
        check_int(cfg, key, 1)
    check_int(cfg, "max_queue", 0)
    wait = cfg.max_wait_s
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait > 0:
        raise UsageError(f"max_wait_s={wait!r}: valid: a number of seconds > 0")
    return cfg


def _serve(cfg: DictConfig, _overrides: list[str]) -> int:
    check(cfg)  # before anything heavy is imported or loaded
    from agecls.serving.predict import Predictor
    from agecls.serving.serve import create_app, model_cards
    from agecls.serving.sources import describe_model

    predictor = Predictor.from_config(cfg)
    import uvicorn

    app = create_app(
        predictor,
        max_upload_mb=float(cfg.max_upload_mb),
        max_batch=int(cfg.max_batch),
        max_concurrent=int(cfg.max_concurrent),
        max_queue=int(cfg.max_queue),
        max_wait_s=float(cfg.max_wait_s),
        max_decoded_pixels=int(cfg.max_decoded_pixels),
    )
    for card in model_cards(predictor):
        print(f"{PROG}: model {describe_model(card)}", file=sys.stderr)
    shown = "127.0.0.1" if str(cfg.host) in ("0.0.0.0", "::") else str(cfg.host)
    print(f"{PROG}: open http://{shown}:{int(cfg.port)}/ in a browser (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level="info")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _serve)


if __name__ == "__main__":
    sys.exit(main())
