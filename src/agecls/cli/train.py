"""`agecls-train`: one Hydra-configured training run, or with -m a sweep of them (grid or Optuna study)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from agecls.cli.app import report
from agecls.config import CONFIG_DIR, check_overrides
from agecls.errors import UsageError

PROG = "agecls-train"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> float | None:
    """The objective of the run goes back to Hydra, so its sweepers can optimise it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from agecls.training.task import run_task

    try:
        return run_task(cfg)
    except UsageError as exc:  # e.g. too few faces for the split: one line and exit 2, as before the run
        if HydraConfig.get().mode != RunMode.RUN:
            raise  # a sweep records the failed job and goes on
        sys.exit(report(PROG, exc))


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
    name = args.config_name or "train"
    cfg = check_overrides(name, overrides, config_dir.resolve(), multirun=args.multirun)
    if is_study(cfg, args.multirun):
        from agecls.sweep.params import check_params

        check_params(cfg, name, config_dir.resolve())
    if args.cfg or args.info:  # printing the config runs nothing
        return
    check_values(cfg, name, overrides, config_dir.resolve(), multirun=args.multirun)


def check_values(cfg: DictConfig, name: str, overrides: list[str], config_dir: Path, multirun: bool) -> None:
    """UsageError (one line) for a configured value no run can use or a `+key` no code reads, before Hydra
    makes a run folder; a grid sweep is checked with the first value of each swept key, a study without its
    search space (each job or trial is checked again when it starts)."""
    from agecls.config import parse_overrides
    from agecls.training.settings import check_added_keys, validate

    if OmegaConf.select(cfg, "optuna.trial") is not None:
        return  # a study's trial process: train() checks it, where the study records why a trial failed
    parsed = [o for o in parse_overrides(overrides) if o.package is None]
    choices = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    added = [o for o in parsed if (o.is_add() or o.is_force_add()) and o.key_or_group not in choices]
    forced = {o.input_line for o in added if o.is_force_add()}
    if forced:  # `++key=` may set a key that exists: compare with the config composed without them
        base = check_overrides(name, [o for o in overrides if o not in forced], config_dir, multirun=multirun)
    else:
        base = cfg
    absent = object()  # a `+key=` Hydra accepted is new; a `++key=` is when the config lacks it without it
    new = [
        o.key_or_group
        for o in added
        if not o.is_force_add() or OmegaConf.select(base, o.key_or_group, default=absent) is absent
    ]
    if is_study(cfg, multirun) and any(o.is_sweep_override() for o in parse_overrides(overrides)):
        # A study's command-line sweeps are its search space: each trial checks what it draws.
        fixed = [o.input_line for o in parse_overrides(overrides) if not o.is_sweep_override()]
        cfg = check_overrides(name, fixed, config_dir, multirun=True)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    check_added_keys(job, new)
    validate(job, drawn_later=multirun)
    if OmegaConf.select(job, "hierarchy.by"):  # the router's and experts' configs, as the run derives them
        from agecls.training.hierarchy import HierarchyError, stage_configs

        try:
            stages = stage_configs(job)
        except HierarchyError as exc:
            raise UsageError(str(exc)) from None
        for stage in stages:
            try:
                validate(stage.cfg, drawn_later=multirun)
            except UsageError as exc:
                raise UsageError(f"hierarchy stage {stage.name}: {exc}") from None


def is_study(cfg: DictConfig, multirun: bool) -> bool:
    """Whether the composed command line runs agecls's Optuna sweeper."""
    from hydra.types import RunMode

    multirun = multirun or OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN
    return multirun and OmegaConf.select(cfg, "hydra.runtime.choices.hydra/sweeper") == "agecls_optuna"


def main() -> None:
    """Check the command line, then run it with Hydra (which reads sys.argv)."""
    try:
        precheck(sys.argv[1:])
    except Exception as exc:  # a configuration error is one line; a bug is re-raised with its traceback
        sys.exit(report(PROG, exc))
    train()


if __name__ == "__main__":
    main()
