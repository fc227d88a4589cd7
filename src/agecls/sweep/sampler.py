"""The sweeper's sampler: the configured one (optuna/sampler), re-seeded for each trial from the configured
seed and the trial's number.

A sampler seeded once when the sweeper starts draws the same sequence on every start: a study resumed after
a crash, or a second worker joining it, would repeat the first trials' parameters. Trial numbers are unique
within a study, so seeding each trial from (seed, number) gives every trial its own draws, on any worker and
after any restart, and the same draws again when the study is re-run from scratch.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, CmaEsSampler, GridSampler, QMCSampler, RandomSampler

from agecls.sweep.checks import SweepError


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number` of a study seeded `seed` (a 32-bit value; distinct per trial)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(number)]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """Delegates to a sampler built afresh for each trial by `make(trial_seed(seed, trial.number))`.

    The samplers agecls configures keep no state between trials besides their random generator (TPE and
    random read the study's trials each time; QMC reads its position in the sequence from the study)."""

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, int(seed)
        self._sampler = make(self._seed)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._sampler = self._make(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


class StudyGridSampler(GridSampler):
    """Optuna's GridSampler without its stop: it ends `study.optimize`, which agecls's sweeper does not run
    (its loop counts optuna.n_trials, capped at the grid's size), and elsewhere `study.stop` raises."""

    def __init__(self, search_space: dict[str, list[Any]], seed: int | None = None) -> None:
        super().__init__(search_space, seed=seed)
        self.size = int(np.prod([len(values) for values in search_space.values()]))

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def grid_size(sampler: BaseSampler) -> int | None:
    """How many points a grid sampler has; None for any other sampler."""
    return sampler.size if isinstance(sampler, StudyGridSampler) else None


def grid_values(dist: BaseDistribution) -> list[Any]:
    """Every value a distribution can take, for a grid: each choice, or each step from low to high (both
    included); SweepError for a continuous one."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None and not dist.log:
        count = int(round((dist.high - dist.low) / dist.step)) + 1
        return [dist.low + i * dist.step for i in range(count)]
    raise SweepError(f"{dist}: a grid needs a choice or a range with a step, not a continuous interval")


def _grid(space: dict[str, BaseDistribution], seed: int | None) -> StudyGridSampler:
    grid = {}
    for key, dist in space.items():
        try:
            grid[key] = grid_values(dist)
        except SweepError as exc:
            raise SweepError(f"optuna.sampler (a grid): {key}: {exc}") from None
    return StudyGridSampler(grid, seed=seed)


def study_sampler(sampler_cfg: DictConfig, space: dict[str, BaseDistribution] | None = None) -> BaseSampler:
    """The configured sampler (a `_target_` block of optuna/sampler), seeded per trial when it has a seed.

    A QMC sampler keeps the configured seed (every trial and worker must walk one scrambled sequence; its
    position comes from the study); the random sampler it draws a study's first trial with is seeded per
    trial. A sampler configured with `seed: null` draws from fresh entropy in each process already. A grid
    is every combination of `space`'s values (grid_values)."""
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # QMCSampler; agecls uses it knowingly
    seed = sampler_cfg.get("seed")
    target = str(sampler_cfg.get("_target_", ""))
    if target.rsplit(".", 1)[-1] == GridSampler.__name__:
        return _grid(space or {}, seed)
    if target.rsplit(".", 1)[-1] == CmaEsSampler.__name__ and importlib.util.find_spec("cmaes") is None:
        # Optuna's CmaEsSampler needs it, and says so only once it samples
        raise SweepError(f"optuna.sampler._target_={target} needs the cmaes package: pip install cmaes")
    if seed is None:
        return instantiate(sampler_cfg)
    if target.rsplit(".", 1)[-1] == QMCSampler.__name__:

        def make(per_trial: int) -> BaseSampler:
            return instantiate(sampler_cfg, independent_sampler=RandomSampler(seed=per_trial))

    else:

        def make(per_trial: int) -> BaseSampler:
            return instantiate(sampler_cfg, seed=per_trial)

    return TrialSeededSampler(make, int(seed))
