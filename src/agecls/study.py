"""The Optuna studies agecls keeps: opening one on its storage, finding one by name, and the few places
where agecls needs more than Optuna's public API (each wrapped here, with the reason).

Optuna runs a trial in the process that asked for it (Study.optimize, or ask and tell in one process).
agecls runs each trial as its own process or cluster job: the sweeper asks for the trial, the trial process
reports, prunes and tells, and both record the trial's heartbeat. Optuna has no public API for that split,
so the functions of the section "beyond Optuna's public API" below reach into it. No other module touches
Optuna's private attributes or its storage interface (tests/test_sweeper_schema.py checks): an Optuna
upgrade that moves them breaks here, and only here."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from agecls.files import file_lock, sqlite_lock_path

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


@contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """For a `sqlite:///PATH` storage: hold an exclusive lock on `.NAME.lock` beside it meanwhile.

    The first RDBStorage on a new database creates its tables and stamps the schema version; two processes
    doing that at once (two sweeps started together on one fresh file, as `bench/quality.py --parallel 2`
    does) make the second fail with `UNIQUE constraint failed: alembic_version.version_num`. Opening the
    storage under this lock makes the second process find the finished schema. Other URLs (PostgreSQL,
    MySQL) pass through: create their database once before starting parallel sweeps."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with file_lock(sqlite_lock_path(url)):
        yield


def open_study(
    optuna_cfg: DictConfig,
    direction: str | None = None,
    *,
    with_sampler: bool = False,
    sampler_seed: int | None = None,
):
    """The study named in config, on an RDB storage with heartbeats (stale trials are detectable).

    `sampler_seed` replaces the configured sampler's seed (a trial process drawing its own parameters,
    such as bins=search's edges, must not repeat another trial's random draws)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # Heartbeats and stale-trial retry are marked experimental in optuna; agecls relies on them knowingly.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings(
        "ignore", message=".*Heartbeat of storage is supposed to be used with Study.optimize.*"
    )

    url = str(optuna_cfg.storage)
    with sqlite_lock(url):
        storage = RDBStorage(
            url,
            heartbeat_interval=int(optuna_cfg.heartbeat_interval),
            grace_period=int(optuna_cfg.grace_period),
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                max_retry=int(optuna_cfg.retries)
            ),
        )
    kwargs: dict[str, Any] = {"pruner": instantiate(optuna_cfg.pruner)}
    if with_sampler:
        seed = {} if sampler_seed is None else {"seed": sampler_seed}
        kwargs["sampler"] = instantiate(optuna_cfg.sampler, **seed)
    if direction is None:
        return optuna.load_study(study_name=str(optuna_cfg.study_name), storage=storage, **kwargs)
    return optuna.create_study(
        study_name=str(optuna_cfg.study_name),
        storage=storage,
        direction=direction,
        load_if_exists=True,
        **kwargs,
    )


def find_study(storage: str, name: str):
    """The study `name` in `storage`, or None when the storage or the study does not exist."""
    import optuna

    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage=storage, include_best_trial=False)]
    return optuna.load_study(study_name=name, storage=storage) if name in names else None


def find_trial(study: optuna.Study, number: int) -> FrozenTrial | None:
    """Trial `number` of the study as its storage holds it now, or None when the study has no such trial.

    Public API: `get_trials` re-reads every unfinished trial from the storage, so a trial that another
    process (a trial process, another worker) has finished is seen finished."""
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)


# -- beyond Optuna's public API --------------------------------------------------------------------------
def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (trial numbers count within a study; the storage keys trials by id).

    Why private: Optuna keeps the id in `_trial_id` and has no public accessor; agecls needs it to attach a
    trial process to its trial (`attach_trial`) and to record heartbeats (`record_heartbeat`)."""
    return trial._trial_id  # noqa: SLF001


def attach_trial(study: optuna.Study, frozen: FrozenTrial) -> optuna.Trial:
    """A live Trial (report, should_prune, suggest_*, set_user_attr) for a trial another process asked for.

    Why: Optuna hands out Trial objects only from `study.ask()` in the asking process; the trial process
    builds one with the Trial constructor (documented as not for direct use), which takes the private trial
    id. The study's trials are read first: suggest_* in this process needs them in Optuna's trial cache."""
    import optuna

    study.get_trials(deepcopy=False)
    return optuna.Trial(study, trial_id(frozen))


def record_heartbeat(study: optuna.Study, storage_id: int) -> None:
    """Record that the trial with this storage id (`trial_id`) is alive; the study's storage has heartbeats
    when `open_study` opened it.

    Why: Optuna records heartbeats only from its own thread while Study.optimize runs the trial in-process;
    here the sweeper and the trial process record them, through the study's storage, which Optuna keeps in
    the private `Study._storage` (and whose interface it documents as not for library users)."""
    study._storage.record_heartbeat(storage_id)  # noqa: SLF001
