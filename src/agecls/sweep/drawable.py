"""What a study can draw, checked before it opens: every value of its search space validated on top of the
composed config, and the keys that only some options of a searched group have (`optimizer.momentum` when the
study chooses the optimizer) searched only in the trials that draw one of those options.

A group option (`optimizer=sgd`) changes which files Hydra composes, so each is composed once; a key's value
(`optimizer.lr=1e-5`) is applied to a composed config as Hydra applies a `key=value` override after
composition. A value refused alone is tried with each value of the other searched keys before it is called
one that can never run: `model=inception_resnet_v1` may need `data.image_size=128` from the same study."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from agecls.errors import UsageError
from agecls.sweep.space import format_value

log = logging.getLogger(__name__)

_ABSENT = object()


@dataclass
class Drawable:
    """The search space split into what every trial draws and what only some do: `conditions` maps a key to
    (the searched group it belongs to, the group's values whose option has the key)."""

    space: dict[str, Any]
    conditions: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)

    @property
    def always(self) -> dict[str, Any]:
        """The distributions every trial draws (study.ask's fixed part)."""
        return {k: d for k, d in self.space.items() if k not in self.conditions}

    def draw_conditional(self, trial) -> None:
        """Suggest each conditional key on `trial` when the option it drew has it (define-by-run)."""
        for key, (group, values) in self.conditions.items():
            if trial.params.get(group) in values:
                suggest(trial, key, self.space[key])

    def describe(self) -> list[str]:
        """One line per conditional key: where it is searched."""
        items = self.conditions.items()
        return [f"{k} searched only where {g} is {', '.join(map(str, v))}" for k, (g, v) in items]


def suggest(trial, key: str, dist) -> Any:
    """trial.suggest_* for one Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"{key}: unsupported distribution {dist!r}")


def _values(dist) -> list[Any]:
    """The values of a distribution checked before the study opens: every choice, or a range's two ends."""
    choices = getattr(dist, "choices", None)
    return list(choices) if choices is not None else [dist.low, dist.high]


class _Configs:
    """Configs composed with one searched group's option each, composed once."""

    def __init__(self, compose: Callable[[list[str]], DictConfig]) -> None:
        self.compose, self.cache = compose, {}

    def get(self, *chosen: tuple[str, Any]) -> DictConfig:
        lines = tuple(f"{group}={format_value(value)}" for group, value in chosen)
        if lines not in self.cache:
            self.cache[lines] = self.compose(list(lines))
        return self.cache[lines]


def _with(cfg: DictConfig, key: str, value: Any) -> DictConfig | None:
    """A copy of `cfg` with `key` set as a `key=value` override sets it; None when `cfg` has no such key."""
    if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        return None
    out = copy.deepcopy(cfg)
    with open_dict(out):
        OmegaConf.update(out, key, _override_value(key, value), merge=False)
    return out


@functools.cache
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _override_value(key: str, value: Any) -> Any:
    """What a trial's `key=value` override line sets: a categorical's encoded `[0.9,0.999]` is the list."""
    return _parser().parse_overrides([f"{key}={format_value(value)}"])[0].value()


def _refusal(cfg: DictConfig, validate: Callable[[DictConfig], Any]) -> str | None:
    try:
        validate(cfg)
    except ValueError as exc:
        return str(exc).splitlines()[0]
    return None


class _Checker:
    """Validates values of the search space on top of the composed config."""

    def __init__(self, space: dict[str, Any], groups: list[str], configs: _Configs, validate) -> None:
        self.space, self.groups, self.configs, self.validate = space, groups, configs, validate

    def config(self, key: str, value: Any, around: tuple[str, Any] | None = None) -> DictConfig | None:
        """The config with `key=value` (and the group option `around`, when given); None where the key does
        not exist in that config."""
        if key in self.groups:
            chosen = [(key, value)] + ([around] if around and around[0] != key else [])
            return self.configs.get(*chosen)
        base = self.configs.get(around) if around else self.configs.get()
        return _with(base, key, value)

    def refused(self, key: str, value: Any, where: list[tuple[str, Any]]) -> str | None:
        """None when `key=value` validates in at least one config of `where` (group options the key exists
        under; [] for the base config) or, failing that, beside one value of another searched key; else the
        refusal seen first."""
        first = None
        for around in where or [None]:
            cfg = self.config(key, value, around)
            if cfg is None:
                continue
            why = _refusal(cfg, self.validate)
            if why is None:
                return None
            first = first or why
            for other, dist in self.space.items():
                if other == key:
                    continue
                for other_value in _values(dist):
                    if self._passes_beside(cfg, key, value, other, other_value):
                        return None
        return first

    def _passes_beside(self, cfg: DictConfig, key: str, value: Any, other: str, other_value: Any) -> bool:
        if other in self.groups and key in self.groups:
            beside = self.configs.get((key, value), (other, other_value))
        elif other in self.groups:  # compose the other option, then set key as its override would
            beside = _with(self.configs.get((other, other_value)), key, value)
        else:
            beside = _with(cfg, other, other_value)
        return beside is not None and _refusal(beside, self.validate) is None


def check_space(
    space: dict[str, Any],
    compose: Callable[[list[str]], DictConfig],
    is_group: Callable[[str], bool],
    validate: Callable[[DictConfig], Any],
) -> Drawable:
    """The study's Drawable, or UsageError (one line) for a value no trial could run with, or a key that no
    option of its searched group has. `compose(lines)`: the study's config with those group overrides;
    `validate(cfg)`: raises ValueError for a config a run would refuse."""
    groups = [k for k in space if getattr(space[k], "choices", None) is not None and is_group(k)]
    configs = _Configs(compose)
    checker = _Checker(space, groups, configs, validate)
    conditions: dict[str, tuple[str, list[Any]]] = {}
    for key, dist in space.items():
        group = next((g for g in groups if key.startswith(g + ".")), None)
        where: list[tuple[str, Any]] = []
        if group is not None:
            options = space[group].choices
            having = [
                v
                for v in options
                if OmegaConf.select(configs.get((group, v)), key, default=_ABSENT) is not _ABSENT
            ]
            if not having:
                raise UsageError(
                    f"optuna.params: {key} is a key of no option the study draws for {group} "
                    f"({', '.join(map(str, options))})"
                )
            if len(having) < len(options):
                conditions[key] = (group, having)
            where = [(group, v) for v in having]
        for value in _values(dist):
            why = checker.refused(key, value, where)
            if why is not None:
                raise UsageError(f"optuna.params: {key}={format_value(value)} can never run: {why}")
    return Drawable(space, conditions)
