"""Config helpers shared by every entry point: resolvers, paths and flattening for tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def project_root() -> Path:
    """Repository root when running from a source checkout, else the current directory."""
    here = Path(__file__).resolve()
    candidate = here.parents[2]
    if (candidate / "pyproject.toml").is_file() and (candidate / "src" / "agecls").is_dir():
        return candidate
    return Path.cwd()


def register_resolvers() -> None:
    """Register agecls's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("agecls_root"):
        OmegaConf.register_new_resolver("agecls_root", lambda: str(project_root()))


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into dotted keys (lists become their string form)."""
    container = (
        OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    )
    out: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


register_resolvers()
