"""Checks of a study's settings that the schema (agecls.sweep.settings.OptunaSettings) cannot make, run before
the study opens: keys added past the schema, and what a study of several objectives can use."""

from __future__ import annotations

import difflib

from omegaconf import DictConfig, OmegaConf

from agecls.config import CONFIG_DIR
from agecls.sweep.settings import SETTINGS


class SweepError(ValueError):
    """A search-space entry or study setting that cannot be used."""


def check_settings(ocfg: DictConfig) -> None:
    """SweepError naming a key of the `optuna` block that is not a setting, with the closest valid one.

    The schema (agecls.sweep.settings.OptunaSettings) rejects a misspelled key while the config is composed;
    one added past it with Hydra's `+` (`+optuna.n_trails=8`, which inserts a key regardless of the schema)
    is caught here, before the study starts."""
    for key in ocfg:
        if key in SETTINGS:
            continue
        close = difflib.get_close_matches(str(key), SETTINGS, n=1)
        hint = f"did you mean optuna.{close[0]}? " if close else ""
        valid = ", ".join(SETTINGS)
        raise SweepError(f"optuna.{key}: not a setting of an Optuna study; {hint}valid: {valid}")


# Samplers that raise with several objectives (optuna's `_raise_error_if_multi_objective`).
SINGLE_OBJECTIVE_SAMPLERS = ("CmaEsSampler",)


def study_objectives(cfg: DictConfig) -> tuple[list[str] | None, list[str]]:
    """(objective.metrics or None, the directions): several objectives when objective.metrics lists two or
    more, else the one objective.metric in objective.mode's direction."""
    metrics = [str(m) for m in (cfg.objective.get("metrics") or [])]
    if len(metrics) > 1:
        return metrics, [str(d) for d in cfg.objective.directions]
    return None, ["maximize" if str(cfg.objective.mode) == "max" else "minimize"]


def check_several_objectives(cfg: DictConfig) -> None:
    """SweepError when a study of several objectives is given a pruner (optuna's work with one objective)
    or a sampler that works with one objective only; nothing to check for one objective."""
    names, _ = study_objectives(cfg)
    if names is None:
        return
    choices = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    pruner = str(cfg.optuna.pruner.get("_target_", ""))
    if pruner.rsplit(".", 1)[-1] != "NopPruner":
        chosen = choices.get("optuna/pruner")
        # a `_target_` set over the `none` file is named as it was given
        where = (
            f"optuna/pruner={chosen}" if chosen not in (None, "none") else f"optuna.pruner._target_={pruner}"
        )
        raise SweepError(
            f"{where}: optuna's pruners work with one objective, and objective.metrics has {len(names)}; "
            "valid: optuna/pruner=none (trials stop by early stopping: callbacks.early_stopping.*)"
        )
    sampler = str(cfg.optuna.sampler.get("_target_", ""))
    if sampler.rsplit(".", 1)[-1] in SINGLE_OBJECTIVE_SAMPLERS:
        files = sorted((CONFIG_DIR / "optuna" / "sampler").glob("*.yaml"))
        targets = {path.stem: str(OmegaConf.load(path).get("_target_", "")) for path in files}
        valid = [name for name, t in targets.items() if t.rsplit(".", 1)[-1] not in SINGLE_OBJECTIVE_SAMPLERS]
        raise SweepError(
            f"optuna.sampler._target_={sampler}: works with one objective, and objective.metrics has "
            f"{len(names)}; valid: optuna/sampler={', '.join(valid)}"
        )
