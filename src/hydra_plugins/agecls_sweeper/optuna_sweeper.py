"""The `agecls_optuna` Hydra sweeper: a thin adapter over agecls.sweep.sweeper.StudyRunner."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

ConfigStore.instance().store(
    group="hydra/sweeper",
    name="agecls_optuna",
    node={"_target_": "hydra_plugins.agecls_sweeper.optuna_sweeper.AgeclsOptunaSweeper"},
    provider="agecls",
)


class AgeclsOptunaSweeper(Sweeper):
    """Optuna study: asynchronous trials, pruning, resume; settings in the config's `optuna` block."""

    def __init__(self, **_: Any) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config

    def sweep(self, arguments: list[str]) -> Any:
        from agecls.sweep.sweeper import StudyRunner

        assert self.config is not None and self.hydra_context is not None
        return StudyRunner(self.config, self.hydra_context).sweep(arguments)
