"""Typed configs of the `agecls_optuna` sweeper, registered in Hydra's ConfigStore (the pattern of
hydra-optuna-sweeper's config.py): `hydra/sweeper=agecls_optuna` is `AgeclsOptunaSweeperConf`, and
selecting it applies the schema of the job's `optuna` block (agecls.sweep.settings.OptunaSettings).
`hydra/sweeper=optuna` is the same sweeper under hydra-optuna-sweeper's name, with that plugin's keys
(`PluginKeysSweeperConf`; its sampler group is conf/hydra/sweeper/sampler)."""

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


@dataclass
class PluginKeysSweeperConf:
    """`hydra.sweeper` of `hydra/sweeper=optuna`: hydra-optuna-sweeper's keys. Each one set means the agecls
    setting it names (agecls.sweep.plugin_keys); null keeps agecls's value, so the plugin's own defaults
    (minimize, n_jobs 2, a study in memory) do not apply."""

    _target_: str = "hydra_plugins.agecls_sweeper.optuna_sweeper.PluginKeysSweeper"
    _recursive_: bool = False  # the sampler block is agecls's to build (per-trial seeds, the grid's space)
    # the sampler group merges over `sampler` below; none is chosen unless named (hydra/sweeper/sampler=tpe)
    defaults: list[Any] = field(
        default_factory=lambda: [f"/{SETTINGS_NODE}@_global_.optuna", "_self_", {"sampler": None}]
    )
    sampler: Any = field(default_factory=lambda: {"seed": None})  # optuna.sampler
    direction: Any = None  # objective.mode, or objective.directions for several objectives
    storage: str | None = None  # optuna.storage
    study_name: str | None = None  # optuna.study_name
    n_trials: int | None = None  # optuna.n_trials
    n_jobs: int | None = None  # optuna.n_jobs
    max_failure_rate: float | None = None  # optuna.max_failures, as a share of optuna.n_trials
    params: dict[str, Any] = field(default_factory=dict)  # joins optuna.params
    search_space: dict[str, Any] = field(default_factory=dict)  # the plugin's deprecated form: refused
    custom_search_space: str | None = None  # a Python function: refused (trials are other processes)


_store = ConfigStore.instance()
_store.store(name=SETTINGS_NODE, node=OptunaSettings, provider="agecls")
_store.store(group="hydra/sweeper", name="agecls_optuna", node=AgeclsOptunaSweeperConf, provider="agecls")
_store.store(group="hydra/sweeper", name="optuna", node=PluginKeysSweeperConf, provider="agecls")
