"""`agecls-bins propose`: group a fine-bin run's classes (e.g. bins=pairs) into k contiguous age bins;
its keys are conf/bins.yaml's."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from agecls.cli.app import App, run
from agecls.evaluation.bins import options, propose

APP = App(
    prog="agecls-bins",
    config="bins",
    summary="group a fine-bin run's classes (e.g. bins=pairs) into k contiguous age bins.",
    usage="agecls-bins propose run=RUN k=K [KEY=VALUE ...] [--install]",
    description="""\
Selection uses the validation confusion matrix (split=val, the default) or train; never test. The chosen
grouping is the exact optimum of expected macro-F1 (bin_discovery). Writes <out>/<name>.yaml (a bins config
like conf/bins/*.yaml), <name>_confusion.png (the fine matrix with the bins outlined), <name>_tradeoff.png
and <name>_tradeoff.csv (best expected macro-F1 for every k). install=true (--install) also copies the YAML
into the package's conf/bins/ so that `agecls-train bins=<name>` works.""",
    examples=(
        "agecls-bins propose run=outputs/runs/<date>/<time> k=7 name=mybins --install",
        "agecls-bins propose run=1a98ea64 k=4 min_count=50 fixed_edges=[18] compare=seed7",
        "agecls-bins propose run=<run>/results.json k=5 max_width=20 split=train out=proposals",
    ),
    exit_codes="0 done, 1 a runtime problem, 2 bad arguments or a run that cannot be used",
    positional=("command",),
    switches={"--install": "install=true"},
    text_keys=("command", "run", "name", "out", "tracking_uri", "split"),
)


def _propose(cfg: DictConfig, _overrides: list[str]) -> int:
    propose(options(cfg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _propose)


if __name__ == "__main__":
    sys.exit(main())
