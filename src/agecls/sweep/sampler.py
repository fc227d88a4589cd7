"""The sweeper's sampler: the configured one (optuna/sampler), re-seeded for each trial from the configured
seed and the trial's number.

A sampler seeded once when the sweeper starts draws the same sequence on every start: a study resumed after
a crash, or a second worker joining it, would repeat the first trials' parameters. Trial numbers are unique
within a study, so seeding each trial from (seed, number) gives every trial its own draws, on any worker and
after any restart, and the same draws again when the study is re-run from scratch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, QMCSampler, RandomSampler


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


def study_sampler(sampler_cfg: DictConfig) -> BaseSampler:
    """The configured sampler (a `_target_` block of optuna/sampler), seeded per trial when it has a seed.

    A QMC sampler keeps the configured seed (every trial and worker must walk one scrambled sequence; its
    position comes from the study); the random sampler it draws a study's first trial with is seeded per
    trial. A sampler configured with `seed: null` draws from fresh entropy in each process already."""
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # QMCSampler; agecls uses it knowingly
    seed = sampler_cfg.get("seed")
    if seed is None:
        return instantiate(sampler_cfg)
    target = str(sampler_cfg.get("_target_", ""))
    if target.rsplit(".", 1)[-1] == QMCSampler.__name__:

        def make(per_trial: int) -> BaseSampler:
            return instantiate(sampler_cfg, independent_sampler=RandomSampler(seed=per_trial))

    else:

        def make(per_trial: int) -> BaseSampler:
            return instantiate(sampler_cfg, seed=per_trial)

    return TrialSeededSampler(make, int(seed))
