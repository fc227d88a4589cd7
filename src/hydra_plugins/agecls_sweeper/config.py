"""Typed configs of the `agecls_optuna` sweeper, registered in Hydra's ConfigStore (the pattern of
hydra-optuna-sweeper's config.py): `hydra/sweeper=agecls_optuna` is `AgeclsOptunaSweeperConf`, and
selecting it applies the schema of the job's `optuna` block (agecls.sweep.settings.OptunaSettings)."""

# No `from __future__ import annotations`: Hydra executes plugin modules without registering them in
# sys.modules, and dataclasses cannot resolve string annotations then.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from agecls.sweep.settings import OptunaSettings

SETTINGS_NODE = "agecls_optuna_settings"


@dataclass
class AgeclsOptunaSweeperConf:
    """`hydra.sweeper`: the plugin class, nothing else (the study's settings are the job's `optuna` block).

    Its defaults list merges the OptunaSettings schema at the config's `optuna` key before the train config
    itself (Hydra composes the `hydra` tree first), so every sweep that selects this sweeper, and every
    trial process it starts with the same sweep file, composes a typed `optuna` block."""

    _target_: str = "hydra_plugins.agecls_sweeper.optuna_sweeper.AgeclsOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [f"/{SETTINGS_NODE}@_global_.optuna", "_self_"])


_store = ConfigStore.instance()
_store.store(name=SETTINGS_NODE, node=OptunaSettings, provider="agecls")
_store.store(group="hydra/sweeper", name="agecls_optuna", node=AgeclsOptunaSweeperConf, provider="agecls")
