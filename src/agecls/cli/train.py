"""`agecls-train`: one Hydra-configured training run, or with -m a sweep of them (grid or Optuna study)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from agecls.cli.app import report
from agecls.config import CONFIG_DIR, check_overrides
from agecls.errors import UsageError

PROG = "agecls-train"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> float | None:
    """The objective of the run goes back to Hydra, so its sweepers can optimise it."""
    from agecls.training.task import run_task

    return run_task(cfg)


def precheck(argv: Sequence[str]) -> None:
    """UsageError, before Hydra starts, for an override it would reject with its own words (an unknown key:
    here the closest valid one is named) or skip without a word (an option of an `optional` group that does
    not exist). The config is composed as @hydra.main will compose it: same --config-path/--config-name/
    --config-dir, sweeps (-m) checked value by value."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))  # Hydra's own flags; --version exits here as there
    if args.hydra_help or args.shell_completion or args.experimental_rerun is not None:
        return
    overrides = list(args.overrides)
    if args.config_dir is not None:
        if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
            return  # both: leave the search path to Hydra
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    config_dir = CONFIG_DIR
    if args.config_path is not None:  # absolute, or relative to this file, as @hydra.main reads it
        config_dir = Path(__file__).resolve().parent / args.config_path
    check_overrides(args.config_name or "train", overrides, config_dir.resolve(), multirun=args.multirun)


def main() -> None:
    """Check the command line, then run it with Hydra (which reads sys.argv)."""
    try:
        precheck(sys.argv[1:])
    except UsageError as exc:
        sys.exit(report(PROG, exc))
    train()


if __name__ == "__main__":
    main()
