"""Checks of a command's composed config values, with errors that name the key and what would be valid."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from agecls.errors import UsageError

__all__ = ["UsageError", "check_bool", "check_int", "require"]


def require(cfg: DictConfig, *keys: str) -> None:
    """UsageError naming the first of `keys` that is unset (null, ???, empty)."""
    for key in keys:
        if OmegaConf.select(cfg, key) in (None, "", []):
            raise UsageError(f"{key}=... is required (see --help)")


def check_int(cfg: DictConfig, key: str, low: int) -> None:
    """UsageError unless `key` is a whole number >= low."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{key}={value!r}: valid: a whole number >= {low}")


def check_bool(cfg: DictConfig, key: str, optional: bool = False) -> None:
    """UsageError unless `key` is true or false (or unset, when optional)."""
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool) and not (optional and value is None):
        raise UsageError(f"{key}={value!r}: valid: true or false")
