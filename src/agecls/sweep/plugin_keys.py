"""hydra-optuna-sweeper's keys under `hydra.sweeper` (`hydra/sweeper=optuna`) as the agecls settings that
mean the same, so that a sweep written for that plugin, on the command line or in a file, runs as a study.

A key set (not null) becomes its agecls setting; one left null keeps agecls's value. The same setting given
both ways with different values is a UsageError naming both keys. An agecls value counts as given when it
differs from conf/train.yaml's (the sampler: from conf/optuna/sampler/tpe.yaml, the default option)."""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from agecls.config import CONFIG_DIR
from agecls.errors import UsageError
from agecls.sweep.space import format_value

SWEEPER = "optuna"  # the plugin's option of hydra/sweeper, here agecls's own sweeper reading its keys
PLUGIN_CLASS = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
# hydra.sweeper key -> the agecls setting with the same meaning
SAME_AS = {
    "n_trials": "optuna.n_trials",
    "n_jobs": "optuna.n_jobs",
    "study_name": "optuna.study_name",
    "storage": "optuna.storage",
}
# settings a trial process reads from its own config: each trial is given them as overrides
TRIAL_KEYS = ("optuna.study_name", "optuna.storage", "objective.mode", "objective.directions")
DIRECTIONS = {"maximize": "max", "minimize": "min"}


@functools.cache
def _defaults() -> DictConfig:
    """The agecls values that count as not given: train.yaml's optuna and objective blocks, tpe's sampler."""
    train = OmegaConf.load(CONFIG_DIR / "train.yaml")
    optuna = OmegaConf.to_container(train.optuna)
    assert isinstance(optuna, dict)
    optuna["sampler"] = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "optuna" / "sampler" / "tpe.yaml"))
    return OmegaConf.create({"optuna": optuna, "objective": OmegaConf.to_container(train.objective)})


def _raw(cfg: DictConfig, key: str) -> Any:
    """The value at dotted `key` as configured (interpolations unresolved); None where absent."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return None
    return OmegaConf.to_container(node, resolve=False)[leaf]


def _plain(value: Any) -> Any:
    """A config value as plain Python (lists and dicts resolved)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _given(cfg: DictConfig, key: str) -> bool:
    return _raw(cfg, key) != _raw(_defaults(), key)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return "null" if value is None else format_value(value)


def _refuse_unsupported(node: DictConfig) -> None:
    if _raw(node, "_target_") == PLUGIN_CLASS:
        raise UsageError(
            f"hydra.sweeper._target_={PLUGIN_CLASS}: hydra-optuna-sweeper is not installed; agecls runs the "
            "same keys with its own sweeper: delete the _target_ line (hydra/sweeper=optuna selects it)"
        )
    if node.get("search_space"):
        raise UsageError(
            "hydra.sweeper.search_space: the plugin's deprecated form of the space; valid: "
            "hydra.sweeper.params in the sweep syntax, e.g. {x: 'interval(0, 1)', y: 'choice(a, b)'}"
        )
    if node.get("custom_search_space") is not None:
        raise UsageError(
            "hydra.sweeper.custom_search_space: a Python function run in the sweeper, and each agecls trial "
            "is a process of its own; valid: null, with the space in hydra.sweeper.params (a key under a "
            "searched group is searched only where the drawn option has it)"
        )


def _direction(cfg: DictConfig, value: Any) -> dict[str, tuple[str, Any]]:
    """hydra.sweeper.direction: objective.mode (one direction) or objective.directions (several)."""
    names = [str(v) for v in value] if isinstance(value, list | ListConfig) else [str(value)]
    if not names or any(n not in DIRECTIONS for n in names):
        raise UsageError(
            f"hydra.sweeper.direction={_shown(_plain(value))}: valid: minimize, maximize, or a list of them "
            "(one per objective of objective.metrics)"
        )
    if len(names) == 1:
        return {"objective.mode": (f"hydra.sweeper.direction={names[0]}", DIRECTIONS[names[0]])}
    metrics = list(_plain(cfg.objective.get("metrics")) or [])
    if len(metrics) != len(names):
        raise UsageError(
            f"hydra.sweeper.direction lists {len(names)} directions and objective.metrics has {len(metrics)} "
            "metrics; valid: one direction per metric, e.g. 'objective.metrics=[val/macro_f1,model/params]'"
        )
    return {"objective.directions": (f"hydra.sweeper.direction={_shown(names)}", names)}


def _sampler(cfg: DictConfig, node: DictConfig) -> dict[str, tuple[str, Any]]:
    """hydra.sweeper.sampler: a whole sampler block (its group chosen, or a `_target_`), or keys such as
    `seed` set on optuna.sampler's own block."""
    block = _plain(node.get("sampler")) or {}
    chosen = OmegaConf.select(cfg, "hydra.runtime.choices", default={}).get("hydra/sweeper/sampler")
    source = f"hydra/sweeper/sampler={chosen}" if chosen else "hydra.sweeper.sampler"
    if "_target_" in block:
        if _given(cfg, "optuna.sampler"):
            _agree(source, "optuna.sampler", block, _plain(cfg.optuna.sampler))
        return {"optuna.sampler": (source, block)}
    keys = {k: v for k, v in block.items() if v is not None}
    if not keys:
        return {}
    current = _plain(cfg.optuna.sampler)
    for key, value in keys.items():
        if _raw(cfg, f"optuna.sampler.{key}") != _raw(_defaults(), f"optuna.sampler.{key}"):
            source = f"hydra.sweeper.sampler.{key}={_shown(value)}"
            _agree(source, f"optuna.sampler.{key}", value, current.get(key))
    shown = " ".join(f"hydra.sweeper.sampler.{k}={_shown(v)}" for k, v in keys.items())
    return {"optuna.sampler": (shown, {**current, **keys})}


def _params(cfg: DictConfig, node: DictConfig) -> dict[str, tuple[str, Any]]:
    """hydra.sweeper.params joins optuna.params; a key in both must have the same value."""
    given = _flat(_plain(node.get("params")) or {})
    if not given:
        return {}
    current = _plain(cfg.optuna.params) or {}
    for key, value in given.items():
        if key in current:
            _agree(f"hydra.sweeper.params.{key}={_shown(value)}", f"optuna.params.{key}", value, current[key])
    return {"optuna.params": ("hydra.sweeper.params", {**current, **given})}


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`+hydra.sweeper.params.model.dropout=...` nests {model: {dropout: ...}}: as the key model.dropout."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _agree(source: str, key: str, value: Any, current: Any) -> None:
    """UsageError naming both keys when `source` (`hydra.sweeper.KEY=VALUE`) sets `key` to `value` and the
    config gives `key` another value, `current` (of two blocks, the keys that differ are shown)."""
    if value == current or str(value) == str(current):
        return
    if isinstance(value, dict) and isinstance(current, dict):
        differ = [k for k in {**current, **value} if value.get(k) != current.get(k)]
        current = {k: current.get(k) for k in differ}
        source += f" (sets {_shown({k: value.get(k) for k in differ})})"
    raise UsageError(
        f"{source} and {key}={_shown(current)} are the same setting with different values; valid: set one "
        "of them, or both to the same value"
    )


def plugin_values(cfg: DictConfig) -> dict[str, tuple[str, Any]]:
    """{agecls key: (the hydra.sweeper key it comes from, its value)} for each plugin key set in the
    composed `cfg` (hydra node included); UsageError for a value with no meaning here or a disagreement."""
    node = cfg.hydra.sweeper
    _refuse_unsupported(node)
    values: dict[str, tuple[str, Any]] = {}
    for key, target in SAME_AS.items():
        value = _plain(node.get(key))
        if value is not None:
            values[target] = (f"hydra.sweeper.{key}={_shown(value)}", value)
    if node.get("direction") is not None:
        values.update(_direction(cfg, node.direction))
    rate = node.get("max_failure_rate")
    if rate is not None:
        if not 0.0 <= float(rate) <= 1.0:
            raise UsageError(f"hydra.sweeper.max_failure_rate={rate}: valid: a share from 0.0 to 1.0")
        n_trials = values.get("optuna.n_trials", ("", cfg.optuna.n_trials))[1]
        # the plugin stops when more than this share of trials failed: more than floor(share x trials)
        source = f"hydra.sweeper.max_failure_rate={rate} of {n_trials} trials"
        values["optuna.max_failures"] = (source, math.floor(float(rate) * n_trials))
    for key, (source, value) in values.items():
        if _given(cfg, key):
            _agree(source, key, value, _plain(OmegaConf.select(cfg, key)))
    values.update(_sampler(cfg, node))
    values.update(_params(cfg, node))
    return values


def is_plugin_sweep(cfg: DictConfig) -> bool:
    """Whether the composed config selects hydra/sweeper=optuna."""
    return OmegaConf.select(cfg, "hydra.runtime.choices", default={}).get("hydra/sweeper") == SWEEPER


def apply_plugin_keys(cfg: DictConfig) -> list[str]:
    """Set in `cfg` the agecls settings its hydra.sweeper keys mean (nothing unless hydra/sweeper=optuna);
    returns the overrides a trial process needs to read the same (study, storage, objective)."""
    if not is_plugin_sweep(cfg):
        return []
    values = plugin_values(cfg)
    with read_write(cfg), open_dict(cfg):
        for key, (_, value) in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return [f"{key}={_override(value)}" for key, (_, value) in values.items() if key in TRIAL_KEYS]


def with_plugin_keys(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` with the settings its hydra.sweeper keys mean (apply_plugin_keys)."""
    if not is_plugin_sweep(cfg):
        return cfg
    out = copy.deepcopy(cfg)
    apply_plugin_keys(out)
    return out


def _override(value: Any) -> str:
    """A value as the right-hand side of a Hydra override (strings quoted)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(map(_override, value)) + "]"
    return format_value(value)
