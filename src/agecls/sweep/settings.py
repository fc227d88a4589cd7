"""The typed schema of the train config's `optuna` block: the settings of an Optuna study run by agecls's
sweeper (`hydra/sweeper=agecls_optuna`, which registers it in Hydra's ConfigStore and applies it).

Values live in conf/train.yaml (with their comments), in optuna/sampler, optuna/pruner and in the sweep
files; every field here is MISSING so that this class only says which keys exist and what type each holds.
A misspelled key (`optuna.n_trails=8`, or in a sweep file's `optuna:` block) is then an error naming it when
the config is composed. The settings sit in the job's config rather than under `hydra.sweeper` because each
trial process reads them too (storage, heartbeats, sampler, its trial number).

Kept free of heavy imports: Hydra imports this (through the plugin) at the start of every `agecls-train`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import MISSING


@dataclass
class OptunaSettings:
    """The `optuna` block: where the study lives, how many trials and how they run, the search space."""

    study_name: str = MISSING
    storage: str = MISSING  # an Optuna RDB URL: sqlite:///..., postgresql://...
    n_trials: int = MISSING  # complete + pruned trials the study should hold
    n_jobs: int = MISSING  # trials at once on CPU
    devices: Any = MISSING  # auto | a list of GPU indices | null (CPU only)
    trials_per_device: int = MISSING  # trials sharing one GPU at once (Slurm: each job asks for a gres/shard)
    trial_start: str = MISSING  # template (forked from a pre-imported process) | fresh (a new interpreter)
    max_failures: int = MISSING
    retries: int = MISSING
    heartbeat_interval: int = MISSING
    grace_period: int = MISSING
    storage_patience_s: float = MISSING  # seconds a storage outage is waited out (agecls.outage)
    params: dict[str, Any] = MISSING  # key -> Hydra sweep syntax (choice, range, interval, tag) or a value
    optional_params: list[str] = MISSING  # keys of params searched only where the config has them
    enqueue: list[Any] = MISSING  # warm starts: {search-space key: value} evaluated first (sweep.warm_start)
    enqueue_from: Any = MISSING  # null | {study, storage, top}: another study's top trials as warm starts
    prune_warm_starts: bool = MISSING  # whether the pruner may cut an enqueued trial (PruningCallback)
    register_best: bool = MISSING
    register_rule: str | None = MISSING  # several objectives: a rule naming one front point (@rule)
    report: str = MISSING  # best | last: what a trial reports to the pruner each epoch (PruningCallback)
    reseed: dict[str, Any] = MISSING  # {top, seeds, leader_seeds}: top trials re-run (sweep.followup)
    check_pruned: int = MISSING  # PRUNED trials continued to the end from their last.ckpt (sweep.followup)
    trial: int | None = MISSING  # set by the sweeper in each trial process
    parent_run_id: str | None = MISSING  # set by the sweeper: the study's MLflow run
    sampler: dict[str, Any] = MISSING  # a `_target_` block: group optuna/sampler
    pruner: dict[str, Any] = MISSING  # a `_target_` block: group optuna/pruner


SETTINGS = tuple(f.name for f in fields(OptunaSettings))
