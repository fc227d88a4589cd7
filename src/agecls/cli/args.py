"""`key=value` command lines of the stand-alone tools (agecls-eval, agecls-predict, agecls-serve): Hydra's
override grammar over a dict of defaults, with errors that name the key and what would be valid."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from agecls.errors import UsageError


def help_exit(args: Sequence[str], text: str) -> int | None:
    """Exit code after printing `text`: -h/--help/help -> stdout, 0; no arguments -> stderr, 2; else None."""
    import sys

    if args and not any(a in ("-h", "--help", "help") for a in args):
        return None
    print(text, end="", file=sys.stdout if args else sys.stderr)
    return 0 if args else 2


def flat_keys(node: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of every leaf of a nested dict."""
    keys: list[str] = []
    for key, value in node.items():
        if isinstance(value, dict):
            keys += flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def apply_overrides(argv: Sequence[str], defaults: dict[str, Any], sweep_hint: str) -> DictConfig:
    """`defaults` with every `key=value` of argv applied; UsageError for anything else (an unknown key gets
    the closest valid one; a sweep such as `a,b` gets `sweep_hint`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            raise UsageError(f"unexpected argument {arg!r}: give key=value pairs (see --help)")
    try:
        overrides = OverridesParser.create().parse_overrides(list(argv))
    except HydraException as exc:
        raise UsageError(f"cannot parse the arguments: {exc}") from None
    valid = flat_keys(defaults)
    cfg = OmegaConf.create(defaults)
    for override in overrides:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or override.package is not None:
            raise UsageError(f"{override.input_line!r}: only plain key=value is supported")
        if override.is_sweep_override():
            raise UsageError(f"{override.input_line!r}: one value per key ({sweep_hint})")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown key {key!r}{hint} (valid: {', '.join(valid)})")
        OmegaConf.update(cfg, key, override.value(), merge=False)
    return cfg


def require(cfg: DictConfig, *keys: str) -> None:
    """UsageError naming the first of `keys` that is unset."""
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
