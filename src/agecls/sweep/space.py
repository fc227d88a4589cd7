"""A study's search space: Hydra's sweep syntax (`optuna.params` and the command line's sweeps) as Optuna
distributions, and a sampled value back as override text."""

from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from agecls.sweep.checks import SweepError


def distribution(override: Override):
    """Optuna distribution for one Hydra sweep override (choice, range, interval, tag(log, interval))."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweepError(f"{key}: unsupported sweep {override.input_line!r}; use choice(), range(), interval()")


def search_space(
    params: dict[str, str], arguments: list[str], parser: OverridesParser
) -> tuple[dict[str, Any], list[str]]:
    """(distributions, fixed overrides): optuna.params from config, then the command line (which wins)."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    for origin, batch in (("optuna.params", lines), ("command line", list(arguments))):
        for override in parser.parse_overrides(batch):
            key = override.get_key_element()
            if override.is_sweep_override():
                try:
                    space[key] = distribution(override)
                except (ValueError, TypeError) as exc:
                    raise SweepError(f"{origin}: {override.input_line}: {exc}") from None
                fixed.pop(key, None)
            else:
                space.pop(key, None)
                fixed[key] = override.input_line
    return space, list(fixed.values())


def format_value(value: Any) -> str:
    """A sampled value as Hydra override text."""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
