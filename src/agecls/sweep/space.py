"""A study's search space: Hydra's sweep syntax (`optuna.params` and the command line's sweeps) as Optuna
distributions, the same ones hydra-optuna-sweeper makes, and a sampled value back as override text."""

from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer

from agecls.sweep.checks import SweepError


def distribution(override: Override):
    """Optuna distribution for one Hydra sweep override, as hydra-optuna-sweeper makes it: choice() and
    shuffle(range()) categorical (values that are not str/int/float/bool as their override text, `null`,
    `[1,2]`); range(a, b, step=s) from a to b, both included, integer unless one of them is a float;
    interval(lo, hi) float, integer inside int(); tag(log, ...) on a log scale."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        bounds = (value.start, value.stop, value.step)
        if any(isinstance(b, float) for b in bounds):
            return FloatDistribution(float(value.start), float(value.stop), step=float(value.step))
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    key = override.get_key_element()
    raise SweepError(f"{key}: unsupported sweep {override.input_line!r}; use choice(), range(), interval()")


def search_space(
    params: dict[str, str], arguments: list[str], parser: OverridesParser
) -> tuple[dict[str, Any], list[str]]:
    """(distributions, fixed overrides): optuna.params from config, then the command line (which wins)."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    for origin, batch in (("optuna.params", lines), ("command line", list(arguments))):
        for override in _parsed(parser, batch, origin):
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


def _parsed(parser: OverridesParser, lines: list[str], origin: str) -> list[Override]:
    from hydra.errors import OverrideParseException

    parsed = []
    for line in lines:
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as exc:
            why = str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else str(exc)
            raise SweepError(f"{origin}: {line}: {why}") from None
    return parsed


def format_value(value: Any) -> str:
    """A sampled value as Hydra override text."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
