"""A study's `optuna.params` as configured: the entries that apply to the composed config, and a check that
each names a real key or group option before any trial draws it."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from agecls.config import CONFIG_DIR, check_lines
from agecls.errors import UsageError


def check_params(cfg: DictConfig, config_name: str = "train", config_dir: str | Path = CONFIG_DIR) -> None:
    """optuna.params names keys and group options like the command line does (the sweeper parses them the
    same way); a misspelling there would fail every trial. A key under a group the study also searches
    (`model.width` beside `model: choice(basic_cnn, residual_attention)`) need not be in the composed config:
    the sweeper checks it against each option it draws."""
    if not isinstance(OmegaConf.select(cfg, "optuna.params"), DictConfig):
        return
    params = present_params(cfg)
    drawn_later = [k for k in map(str, params) if "." in k and k.split(".")[0] in params]
    lines = [f"{k}={v}" for k, v in params.items() if not isinstance(v, dict | list) and k not in drawn_later]
    try:
        check_lines(lines, cfg, config_name, config_dir)
    except UsageError as exc:
        raise UsageError(f"optuna.params: {exc}") from None


def present_params(cfg: DictConfig) -> dict[str, Any]:
    """optuna.params without the keys of optuna.optional_params that `cfg` does not have (task.head, say,
    which only the age task has: one sweep file then searches every task). UsageError for an optional key
    that optuna.params does not search (a misspelling would otherwise be silently ignored)."""
    params = OmegaConf.to_container(OmegaConf.select(cfg, "optuna.params") or OmegaConf.create({}))
    assert isinstance(params, dict)
    optional = [str(k) for k in OmegaConf.select(cfg, "optuna.optional_params", default=None) or []]
    for key in optional:
        if key not in params:
            close = difflib.get_close_matches(key, [str(k) for k in params], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UsageError(
                f"optuna.optional_params: {key} is not a key of optuna.params; {hint}"
                f"valid: {', '.join(map(str, params))}"
            )
    absent = object()
    return {
        k: v
        for k, v in params.items()
        if k not in optional or OmegaConf.select(cfg, k, default=absent) is not absent
    }
