"""Config helpers shared by every entry point: composing the train config, resolvers, paths and flattening
for tracking."""

from __future__ import annotations

from collections.abc import Sequence
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


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    """The train config `agecls-train OVERRIDES` would run with; UsageError naming a bad override."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from agecls.errors import UsageError

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        detail = str(exc).split("\nConfig search path:")[0].strip()  # Hydra appends its search path
        raise UsageError(f"bad override(s) {' '.join(overrides)}: {detail}") from None


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
