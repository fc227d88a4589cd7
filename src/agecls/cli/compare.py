"""`agecls-compare`: two runs on the same faces, with a paired bootstrap of their difference."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from agecls.cli.app import App, run
from agecls.cli.args import check_int, require
from agecls.errors import AgeclsError, UsageError

APP = App(
    prog="agecls-compare",
    config="compare",
    summary="two runs on the same faces, with a paired bootstrap of their difference.",
    usage="agecls-compare RUN_A RUN_B [KEY=VALUE ...]",
    description="""\
Reads both runs' face-level predictions_<split>.csv (written by every agecls-train run) and reports each
run's macro-F1 and accuracy, their difference with a bootstrap confidence interval over the same faces, and
how often A is not better. See docs/EVALUATION.md, 'Comparing two runs'.""",
    examples=(
        "agecls-compare outputs/runs/<A> outputs/runs/<B>                 # on validation, to choose",
        "agecls-compare outputs/runs/<A> outputs/runs/<B> --split test    # to report the choice",
        "agecls-compare run_a=<A> run_b=<B> attribute=gender n_boot=5000 json=diff.json",
    ),
    exit_codes="0 done, 1 the runs cannot be compared (files missing, different faces), 2 bad arguments",
    positional=("run_a", "run_b"),
    options={
        "--split": "split",
        "--attribute": "attribute",
        "--n-boot": "n_boot",
        "--seed": "seed",
        "--json": "json",
    },
    text_keys=("run_a", "run_b", "split", "attribute", "json"),
)


def check(cfg: DictConfig) -> DictConfig:
    """The composed config, once its values are valid (UsageError naming the first that is not)."""
    from agecls.evaluation.compare import SPLITS

    require(cfg, "run_a", "run_b")
    if cfg.split not in SPLITS:
        raise UsageError(f"split={cfg.split!r}: valid: {' or '.join(SPLITS)}")
    check_int(cfg, "n_boot", 1)
    check_int(cfg, "seed", 0)
    return cfg


def _compare(cfg: DictConfig, _overrides: list[str]) -> int:
    from agecls.evaluation.compare import CompareError, compare_runs, render

    cfg = check(cfg)
    attribute = None if cfg.attribute is None else str(cfg.attribute)
    try:
        report = compare_runs(
            Path(str(cfg.run_a)), Path(str(cfg.run_b)), str(cfg.split), attribute, cfg.n_boot, cfg.seed
        )
    except CompareError as exc:
        raise AgeclsError(str(exc)) from None
    print(render(report))
    if cfg.json:
        Path(str(cfg.json)).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _compare)


if __name__ == "__main__":
    sys.exit(main())
