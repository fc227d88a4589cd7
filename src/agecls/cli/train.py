"""`agecls-train`: one Hydra-configured training run, or with -m a sweep of them (grid or Optuna study)."""

from __future__ import annotations

import string
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from agecls.cli.app import report
from agecls.config import CONFIG_DIR, check_overrides, register_resolvers
from agecls.errors import CarriedError, UsageError

PROG = "agecls-train"


@dataclass(frozen=True)
class Checked:
    """A single run's job config as the precheck composed and validated it, and validate()'s warnings."""

    config: dict[str, Any]
    warnings: list[str]

    def covers(self, cfg: DictConfig) -> bool:
        """Whether `cfg`, the job Hydra composed, is the config validated here."""
        return OmegaConf.to_container(cfg, resolve=False) == self.config


def task_function(checked: Checked | None) -> Callable[[DictConfig], float | None]:
    """What Hydra runs for each job; `checked` is what the precheck validated, so that a run of that very
    config is not validated again."""

    def train(cfg: DictConfig) -> float | None:
        """The objective of the run goes back to Hydra, so its sweepers can optimise it."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from agecls.training.task import run_task

        validated = checked.warnings if checked is not None and checked.covers(cfg) else None
        try:
            return run_task(cfg, validated=validated)
        except UsageError as exc:  # e.g. too few faces for the split: one line and exit 2, as before the run
            if HydraConfig.get().mode != RunMode.RUN:
                raise  # a sweep records the failed job and goes on
            sys.exit(report(PROG, exc))

    return train


def hydra_app(checked: Checked | None) -> Callable[[], Any]:
    """The Hydra application of this command line (it reads sys.argv)."""
    return hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(
        task_function(checked)
    )


def run_trial(argv: Sequence[str]) -> None:
    """A study's trial: Hydra's run of its command line, as @hydra.main runs it but composed once (the
    decorator composes the config a second time only to learn the run mode, which a trial knows)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path, get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    args = get_args_parser().parse_args(list(argv))
    search_path = create_automatic_config_search_path(__file__, None, str(CONFIG_DIR))
    app = Hydra.create_main_hydra2(task_name=Path(__file__).stem, config_search_path=search_path)
    try:
        app.run(
            config_name=args.config_name or "train",
            task_function=task_function(None),
            overrides=args.overrides,
        )
    finally:
        GlobalHydra.instance().clear()


def precheck(argv: Sequence[str]) -> Checked | None:
    """UsageError, before Hydra starts, for an override it would reject with its own words (an unknown key:
    here the closest valid one is named) or skip without a word (an option of an `optional` group that does
    not exist). The config is composed as @hydra.main will compose it: same --config-path/--config-name/
    --config-dir, sweeps (-m) checked value by value. Returns what it validated of a single run."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    if args.hydra_help or args.shell_completion or args.experimental_rerun is not None:
        return None
    overrides = list(args.overrides)
    if args.config_dir is not None:
        if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
            return None  # both: leave the search path to Hydra
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    config_dir = primary_config_dir(args.config_path)
    name = args.config_name or "train"
    cfg = check_overrides(name, overrides, config_dir, multirun=args.multirun)
    if is_study(cfg, args.multirun):
        from agecls.sweep.params import check_params
        from agecls.sweep.plugin_keys import with_plugin_keys

        cfg = with_plugin_keys(cfg)  # hydra-optuna-sweeper's keys (hydra/sweeper=optuna) as agecls's
        check_params(cfg, name, config_dir)
    if args.cfg or args.info:  # printing the config runs nothing
        return None
    checked = check_values(cfg, name, overrides, config_dir, multirun=args.multirun)
    return (
        None if is_multirun(cfg, args.multirun) else checked
    )  # each job of a sweep is validated as it starts


def primary_config_dir(config_path: str | None) -> Path:
    """The config folder @hydra.main reads: --config-path (absolute, or relative to this file) or conf/."""
    if config_path is None:
        return CONFIG_DIR
    return (Path(__file__).resolve().parent / config_path).resolve()


def check_values(
    cfg: DictConfig, name: str, overrides: list[str], config_dir: Path, multirun: bool
) -> Checked | None:
    """UsageError (one line) for a configured value no run can use or a `+key` no code reads, before Hydra
    makes a run folder; a grid sweep is checked with the first value of each swept key, a study without its
    search space (each job or trial is checked again when it starts). Returns the job config validated."""
    from agecls.config import parse_overrides
    from agecls.training.validation import check_added_keys, validate

    if OmegaConf.select(cfg, "optuna.trial") is not None:
        return None  # a study's trial process: train() checks it, where the study records why a trial failed
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
        from agecls.sweep.plugin_keys import with_plugin_keys

        fixed = [o.input_line for o in parse_overrides(overrides) if not o.is_sweep_override()]
        cfg = with_plugin_keys(check_overrides(name, fixed, config_dir, multirun=True))
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    check_added_keys(job, new)
    warnings = validate(job, drawn_later=multirun)
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
    return Checked(OmegaConf.to_container(job, resolve=False), warnings)


def is_multirun(cfg: DictConfig, flag: bool) -> bool:
    """Whether the command line sweeps: -m given, or hydra.mode=MULTIRUN set in its config."""
    from hydra.types import RunMode

    return flag or OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN


def is_study(cfg: DictConfig, multirun: bool) -> bool:
    """Whether the composed command line runs agecls's Optuna sweeper."""
    sweeper = OmegaConf.select(cfg, "hydra.runtime.choices.hydra/sweeper")
    return is_multirun(cfg, multirun) and sweeper in ("agecls_optuna", "optuna")  # optuna: the plugin's keys


def is_trial(argv: Sequence[str]) -> bool:
    """Whether this process is a study's trial: the sweeper checked its overrides before launching it, and
    train() validates what the trial drew, where the study records why a trial failed."""
    return any(arg.startswith("optuna.trial=") and arg != "optuna.trial=null" for arg in argv)


# -- --help ------------------------------------------------------------------------------------------------


def config_groups(*config_dirs: Path) -> dict[str, list[str]]:
    """{group: its options} of the config folders, as Hydra lists them (a folder holding YAML files is a
    group, nested ones as `optuna/pruner`); Hydra's own groups left out."""
    groups: dict[str, set[str]] = {}
    for root in config_dirs:
        for path in root.rglob("*.yaml"):
            group = path.parent.relative_to(root).as_posix()
            if group != "." and group.split("/")[0] != "hydra":
                groups.setdefault(group, set()).add(path.stem)
    return {group: sorted(groups[group]) for group in sorted(groups)}


# Said under a group's options in --help, where a reader of the list asks.
GROUP_NOTES = {
    "experiment": "  (v01-v20: the dissertation's trail, docs/DISSERTATION.md; no v14 on purpose:\n"
    "  its hierarchy's age experts saw validation faces, the leak that v15 fixes)\n"
}


def help_text(args: Namespace) -> str:
    """--help: conf/hydra/default.yaml's help (what the command does, examples, the groups and their
    options, the footer), read without composing a config, so no heavy library is imported."""
    dirs = [primary_config_dir(args.config_path)]
    dirs += [Path(args.config_dir).resolve()] if args.config_dir is not None else []
    listed = "".join(
        f"{group}: {', '.join(options)}\n" + GROUP_NOTES.get(group, "")
        for group, options in config_groups(*dirs).items()
    )
    own = OmegaConf.create({"hydra": OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml")})
    return string.Template(own.hydra.help.template).substitute(APP_CONFIG_GROUPS=listed)


def main() -> None:
    """--help from the config files alone; else check the command line once (a study's trial was checked
    by its sweeper), then run it with Hydra. Errors reaching here become one line and an exit code."""
    from hydra._internal.utils import get_args_parser

    argv = sys.argv[1:]
    args = get_args_parser().parse_args(argv)  # as @hydra.main will read them; --version exits here
    if args.help:
        print(help_text(args))
        return
    register_resolvers()
    try:
        if is_trial(argv) and not (args.config_path or args.config_dir):
            run_trial(argv)
            return
        checked = None
        if not is_trial(argv):
            try:
                checked = precheck(argv)
            except Exception as exc:  # a configuration error is one line; a bug keeps its traceback
                sys.exit(report(PROG, exc))
        hydra_app(checked)()
    except CarriedError as carried:  # e.g. a study setting the sweeper refuses
        sys.exit(report(PROG, carried.error))
    except KeyboardInterrupt:  # a study re-queues its running trials first
        sys.exit(130)


if __name__ == "__main__":
    main()
