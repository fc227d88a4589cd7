"""The `agecls_optuna` Hydra sweeper: a thin adapter over agecls.sweep.sweeper.StudyRunner (its config,
`hydra/sweeper=agecls_optuna`, is AgeclsOptunaSweeperConf in this package's config.py), and the same
sweeper as `hydra/sweeper=optuna`, reading hydra-optuna-sweeper's keys (PluginKeysSweeperConf)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.agecls_sweeper import config as _config  # noqa: F401 - registers the typed configs


class AgeclsOptunaSweeper(Sweeper):
    """Optuna study: asynchronous trials, pruning, resume; settings in the config's `optuna` block.

    Takes no arguments: AgeclsOptunaSweeperConf carries only `_target_`, so a key set under `hydra.sweeper`
    is an error when the config is composed rather than ignored here."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config

    def sweep(self, arguments: list[str]) -> Any:
        from agecls.errors import AgeclsError, CarriedError
        from agecls.sweep.sweeper import StudyRunner

        assert self.config is not None and self.hydra_context is not None
        try:
            return StudyRunner(self.config, self.hydra_context).sweep(self._arguments(arguments))
        except AgeclsError as exc:  # past Hydra's traceback report, so agecls-train says it in one line
            raise CarriedError(exc) from exc

    def _arguments(self, arguments: list[str]) -> list[str]:
        return arguments


class PluginKeysSweeper(AgeclsOptunaSweeper):
    """`hydra/sweeper=optuna`: the same study, with hydra-optuna-sweeper's keys under `hydra.sweeper` read
    as the agecls settings they mean (agecls.sweep.plugin_keys) before it starts."""

    def __init__(self, **plugin_keys: Any) -> None:  # read from the config itself, checked there
        super().__init__()

    def _arguments(self, arguments: list[str]) -> list[str]:
        from agecls.sweep.plugin_keys import apply_plugin_keys

        assert self.config is not None
        # the trials are told the keys they read themselves (study, storage, objective) as overrides
        return [*arguments, *apply_plugin_keys(self.config)]
