"""The Optuna studies agecls keeps: opening one on its storage, finding one by name, and the few places
where agecls needs more than Optuna's public API (each wrapped here, with the reason).

Optuna runs a trial in the process that asked for it (Study.optimize, or ask and tell in one process).
agecls runs each trial as its own process or cluster job: the sweeper asks for the trial, the trial process
reports, prunes and tells, and both record the trial's heartbeat. Optuna has no public API for that split,
so the functions of the section "beyond Optuna's public API" below reach into it. No other module touches
Optuna's private attributes or its storage interface (tests/test_sweeper_schema.py checks): an Optuna
upgrade that moves them breaks here, and only here."""

from __future__ import annotations

import abc
import contextlib
import functools
import json
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from agecls.errors import UsageError
from agecls.files import file_lock, sqlite_lock_path
from agecls.outage import Patience, database_down, redact
from agecls.process import ENDED, proc_stat

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)


# How long a study's database may be unreachable (a restart, a failover) before a sweeper or trial gives up.
DEFAULT_PATIENCE_S = 300.0
_PATIENCE: dict[str, Patience] = {}


def storage_patience(url: str, seconds: float | None = None) -> Patience:
    """This process's patience with the storage `url` (one per URL, shared by its threads, so an outage is
    said once); `seconds` (optuna.storage_patience_s) replaces the bound it had."""
    patience = _PATIENCE.get(url)
    if patience is None:
        bound = DEFAULT_PATIENCE_S if seconds is None else float(seconds)
        store = f"optuna.storage {redact(url)}"
        patience = Patience(store, "optuna.storage_patience_s", bound, database_down)
        _PATIENCE[url] = patience
    elif seconds is not None:
        patience.seconds = float(seconds)
    return patience


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
    directions: list[str] | None = None,
    metric_names: list[str] | None = None,
    with_sampler: bool = False,
    sampler_seed: int | None = None,
    sampler: Any = None,
):
    """The study named in config, on an RDB storage with heartbeats (stale trials are detectable).

    With `direction` (one objective) or `directions` and `metric_names` (several: objective.metrics) the
    study is created if it does not exist; an existing one must have the same objectives (UsageError naming
    both). Without either it is loaded. `sampler_seed` replaces the configured sampler's seed (a trial
    process drawing its own parameters, such as bins=search's edges, must not repeat another trial's random
    draws); `sampler` replaces the configured sampler altogether (the sweeper's, seeded per trial). A stale
    trial is failed and re-queued marked (`requeue`)."""
    import optuna
    from optuna.storages import RDBStorage

    # Heartbeats and stale-trial retry are marked experimental in optuna; agecls relies on them knowingly.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings(
        "ignore", message=".*Heartbeat of storage is supposed to be used with Study.optimize.*"
    )

    url = str(optuna_cfg.storage)
    patience = storage_patience(url, optuna_cfg.get("storage_patience_s", DEFAULT_PATIENCE_S))
    # a pooled connection a database restart has closed is replaced before use, not failed on
    engine = {} if url.startswith("sqlite") else {"engine_kwargs": {"pool_pre_ping": True}}
    with sqlite_lock(url):
        rdb = patience.call(
            "open the study's storage",
            RDBStorage,
            url,
            heartbeat_interval=int(optuna_cfg.heartbeat_interval),
            grace_period=int(optuna_cfg.grace_period),
            heartbeat_stale_trial_callback=RequeueStale(
                int(optuna_cfg.retries), int(optuna_cfg.grace_period)
            ),
            **engine,
        )
    storage = patient_storage(rdb, patience)
    kwargs: dict[str, Any] = {"pruner": instantiate(optuna_cfg.pruner)}
    if sampler is not None:
        kwargs["sampler"] = sampler
    elif with_sampler:
        seed = {} if sampler_seed is None else {"seed": sampler_seed}
        kwargs["sampler"] = instantiate(optuna_cfg.sampler, **seed)
    if direction is None and directions is None:
        return optuna.load_study(study_name=str(optuna_cfg.study_name), storage=storage, **kwargs)
    wanted = [direction] if directions is None else list(directions)
    study = optuna.create_study(
        study_name=str(optuna_cfg.study_name),
        storage=storage,
        directions=wanted,
        load_if_exists=True,
        **kwargs,
    )
    check_objectives(study, wanted, metric_names, url)
    return study


def _objectives_text(directions: list[str], names: list[str] | None) -> str:
    if names is None or len(directions) == 1:
        metric = names[0] if names else "objective.metric"
        return f"one objective, {metric} ({directions[0]})" if len(directions) == 1 else str(directions)
    return "[" + ", ".join(f"{n} ({d})" for n, d in zip(names, directions, strict=True)) + "]"


def check_objectives(study: optuna.Study, directions: list[str], names: list[str] | None, url: str) -> None:
    """UsageError when an existing study has other objectives than the command asks for (names and
    directions, in order); names a study that has no names yet (`set_metric_names`, which the Pareto plots,
    trials_dataframe and optuna-dashboard's charts read; one objective's is objective.metric). With one
    objective only the name is compared, and a command that gives none takes the study's as it is."""
    have = [d.name.lower() for d in study.directions]
    have_names = study.metric_names
    one = len(have) == 1 and len(directions) == 1
    if names is not None and have_names is None and (one or have == directions):
        from optuna.exceptions import ExperimentalWarning

        with warnings.catch_warnings():  # set_metric_names is experimental in Optuna; agecls relies on it
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(list(names))
        return
    if one and (names is None or have_names == list(names)):
        return
    if have != directions or have_names != (list(names) if names is not None else None):
        raise UsageError(
            f"study {study.study_name!r} in {url} has the objectives {_objectives_text(have, have_names)}; "
            f"this command asks for {_objectives_text(directions, names)}; valid: the study's own "
            "objective.metrics and objective.directions, or another optuna.study_name for a new study"
        )


def find_study(storage: str, name: str):
    """The study `name` in `storage`, or None when the storage or the study does not exist."""
    import optuna

    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    patience = storage_patience(storage)
    summaries = patience.call(
        "list its studies", optuna.get_all_study_summaries, storage=storage, include_best_trial=False
    )
    if name not in [s.study_name for s in summaries]:
        return None
    return patience.call("load the study", optuna.load_study, study_name=name, storage=storage)


def find_trial(study: optuna.Study, number: int) -> FrozenTrial | None:
    """Trial `number` of the study as its storage holds it now, or None when the study has no such trial.

    Public API: `get_trials` re-reads every unfinished trial from the storage, so a trial that another
    process (a trial process, another worker) has finished is seen finished."""
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)


def requeue(
    study: optuna.Study,
    failed: FrozenTrial,
    max_retry: int | None,
    reason: str,
    marks: dict[str, Any] | None = None,
) -> bool:
    """Queue a failed trial's parameters again as a new WAITING trial marked with where it came from (user
    attrs `requeued_from`, `requeue_reason`, and `marks`; system attrs `failed_trial`, `retry_history` as
    Optuna's RetryHeartbeatStaleTrialCallback sets them). False, and nothing queued, after `max_retry`
    re-queues of the original trial (None: no limit). The failed trial's other user attrs (its process,
    MLflow run, error) are not copied: they describe the run that failed, not the one to come; but a trial
    that had to run alone (`run_alone`: it ran out of GPU memory beside others) still must."""
    import optuna

    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if max_retry is not None and len(history) > max_retry:
        return False
    system_attrs = {
        **failed.system_attrs,
        "failed_trial": history[0],
        "retry_history": history,
        "fixed_params": dict(failed.params),
    }
    user_attrs: dict[str, Any] = {"requeued_from": failed.number, "requeue_reason": reason}
    if failed.user_attrs.get("run_alone"):
        user_attrs["run_alone"] = True
    user_attrs.update(marks or {})
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )
    return True


class RequeueStale:
    """The storage's callback for a trial failed because its heartbeat went stale: re-queue it, marked."""

    def __init__(self, max_retry: int | None, grace_period: int) -> None:
        self.max_retry, self.grace_period = max_retry, grace_period

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reason = f"no heartbeat for optuna.grace_period={self.grace_period} s (its process or machine died)"
        again = requeue(study, trial, self.max_retry, reason)
        log.warning("trial %d failed%s: %s", trial.number, " and re-queued" if again else "", reason)


def fail_trial(study: optuna.Study, number: int, reason: str, url: str | None = None) -> FrozenTrial | None:
    """Fail trial `number` if it is still RUNNING, with the reason as user attr `failed_because`; the failed
    trial, or None when it had finished (or another process failed it first: only one may re-queue it).

    With a sqlite `url` the check and the change are made under the storage's lock file: sqlite does not
    lock the row between them, so two sweepers failing one dead trial would otherwise both re-queue it;
    PostgreSQL locks the row (Optuna updates the state SELECT ... FOR UPDATE) and the loser gets an error."""
    import optuna

    with sqlite_lock(url) if url else contextlib.nullcontext():
        frozen = find_trial(study, number)
        if frozen is None or frozen.state != optuna.trial.TrialState.RUNNING:
            return None
        try:
            attach_trial(study, frozen).set_user_attr("failed_because", reason)
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        except (RuntimeError, ValueError):  # UpdateFinishedTrialError, or tell's "Cannot tell a COMPLETE"
            return None
    return find_trial(study, number)


# -- which process runs a trial --------------------------------------------------------------------------
def _boot_id() -> str:
    """This machine's boot id (Linux): a process recorded before a reboot is gone whatever its pid."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot); None when there is no such process, it has ended
    (a zombie waiting for its parent), or there is no /proc."""
    stat = proc_stat(pid)
    return None if stat is None or stat[0] in ENDED else stat[1]


def process_record(pid: int | None = None) -> dict[str, Any]:
    """Host, boot id, pid and start time of a process (this one by default): a trial user attr that lets
    a sweeper on the same host tell at once that the trial's process is gone (`process_gone`)."""
    pid = os.getpid() if pid is None else int(pid)
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": _start_ticks(pid)}


def process_gone(record: Any) -> bool | None:
    """Whether the process a `process_record` names has ended (its pid is gone, or now belongs to another
    process: a different start time or boot). None when it ran on another host: only its heartbeat tells."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return None
    if record.get("boot") and _boot_id() and record["boot"] != _boot_id():
        return True
    pid = int(record["pid"])
    if Path("/proc/self/stat").exists():
        start = _start_ticks(pid)
        return start is None or (record.get("start") is not None and start != record["start"])
    try:  # no /proc (macOS): whether the pid exists is all there is
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def device_label(env: Any) -> str | None:
    """The device a trial's environment gives it, as its user attr and MLflow tag `device` say it: "cpu"
    (CUDA_VISIBLE_DEVICES empty), "cuda:1" (=1), and in a Slurm job what Slurm gave it: "cuda:1 (1 shard)"
    for a share of a GPU (gres/shard), "cuda:0 (Slurm GPU 3)" when the job sees its GPU renumbered (cgroups).
    None when the environment names no device (then the process's own CUDA, if any, decides)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    node_gpus = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")
    ids = visible if visible is not None else node_gpus
    if ids is None:
        return None
    if not ids.strip():
        return "cpu"
    label = ",".join(f"cuda:{i.strip()}" for i in ids.split(","))
    extra = [f"Slurm GPU {node_gpus}"] if node_gpus and node_gpus != ids else []
    shards = env.get("SLURM_SHARDS_ON_NODE")
    if shards:
        extra.append(f"{shards} shard" + ("s" if shards != "1" else ""))
    return f"{label} ({', '.join(extra)})" if extra else label


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


def patient_storage(rdb, patience: Patience):
    """The RDB storage `rdb` (with Optuna's cache in front, as a study given the RDBStorage would have it)
    behind a proxy whose every call waits out an outage of the database (`patience`): ask, tell, reports,
    user attrs and heartbeats of sweepers and trial processes alike."""
    import optuna

    return _patient_storage_class()(optuna.storages.get_storage(rdb), patience)


@functools.cache
def _patient_storage_class() -> type:
    """PatientStorage: Optuna's storage and heartbeat interfaces, each method passed on patiently.

    Why beyond the API: Optuna has no hook around its storage calls; the proxy implements the storage and
    heartbeat interfaces (BaseStorage, and BaseHeartbeat from a private module: Optuna's stale-trial check
    looks for it). A call retried after the database applied it but dropped the connection before
    answering (rare: the restart must fall between commit and reply) is made twice: harmless for the
    upserts (reports, attributes, heartbeats), recognised for finishing a trial (`_finish_once`), and for
    creating a trial or taking a waiting one it can leave one trial RUNNING without a heartbeat."""
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    class PatientStorage(BaseStorage, BaseHeartbeat):
        def __init__(self, inner, patience: Patience) -> None:
            self.inner, self.patience = inner, patience

        def __getattr__(self, name: str) -> Any:  # e.g. the cache's `_backend`: the RDBStorage
            return getattr(self.inner, name)

    def passed_on(name: str, patiently: bool):
        doing = name.strip("_").replace("_", " ")

        def method(self, *args: Any, **kwargs: Any) -> Any:
            if not patiently:
                return getattr(self.inner, name)(*args, **kwargs)
            return self.patience.call(doing, getattr(self.inner, name), *args, **kwargs)

        method.__name__ = name
        return method

    # every storage method, and the heartbeats' two that touch the database, patiently; the rest as they are
    plain = {"remove_session", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    heartbeat = {"record_heartbeat", "_get_stale_trial_ids"}
    passed = {n for n in vars(BaseStorage) if not n.startswith("_")} | heartbeat
    for name in sorted(passed | plain):
        setattr(PatientStorage, name, passed_on(name, name not in plain))
    PatientStorage.set_trial_state_values = _finish_once
    abc.update_abstractmethods(PatientStorage)
    return PatientStorage


def _finish_once(self, trial_id: int, state: Any, values: Any = None) -> bool:
    """set_trial_state_values, waiting out an outage; a retry refused because the trial is already finished
    with this very state and these values is the earlier try having landed (the database committed it,
    then the connection dropped before its answer), so it succeeds instead of failing the trial's tell."""
    from optuna.exceptions import UpdateFinishedTrialError

    tries = 0

    def once() -> bool:
        nonlocal tries
        tries += 1
        try:
            return self.inner.set_trial_state_values(trial_id, state, values)
        except UpdateFinishedTrialError:
            if tries > 1 and _holds(self.get_trial(trial_id), state, values):
                log.info("trial id %s was finished as asked before the connection dropped", trial_id)
                return True
            raise

    return self.patience.call("set trial state values", once)


def _holds(trial: FrozenTrial, state: Any, values: Any) -> bool:
    return trial.state == state and (values is None or list(trial.values or []) == [float(v) for v in values])


@functools.cache
def _engine(url: str):
    import sqlalchemy

    # pre-ping: a pooled connection a database restart has closed is replaced, not failed on
    return sqlalchemy.create_engine(url, pool_pre_ping=True)


def heartbeat_ages(url: str, trials: list[FrozenTrial]) -> dict[int, float | None]:
    """Seconds since each trial's last heartbeat (by trial number; None: none recorded), by the storage's
    clock, which is the clock Optuna's staleness check uses.

    Why beyond the API: Optuna keeps heartbeats in its RDB table `trial_heartbeats` and has no reader for
    them; this reads that table through its own connection to `url` (the schema is Optuna's)."""
    import sqlalchemy

    ids = {trial_id(t): t.number for t in trials}
    ages: dict[int, float | None] = dict.fromkeys(ids.values())
    if not ids:
        return ages
    query = sqlalchemy.text(
        "SELECT trial_id, heartbeat FROM trial_heartbeats WHERE trial_id IN :ids"
    ).bindparams(sqlalchemy.bindparam("ids", expanding=True))

    def read() -> None:
        with _engine(url).connect() as conn:
            now = _as_datetime(conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one())
            for storage_id, beat in conn.execute(query, {"ids": list(ids)}):
                ages[ids[storage_id]] = (now - _as_datetime(beat)).total_seconds()

    storage_patience(url).call("read the trials' heartbeats", read)
    return ages


def _as_datetime(value: Any) -> datetime:
    """A timestamp as the database returns it (sqlite: text) as a naive datetime."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    return datetime.fromisoformat(str(value)).replace(tzinfo=None)


def set_finished_attrs(study, trial, attrs: dict[str, Any]) -> None:
    """Set user attributes of a finished trial (read them through `fresh(study)`, whose cache has not seen
    them yet).

    Why beyond the API: Optuna refuses user attrs once a trial is finished, but what a study's follow-up runs
    find about a trial (its re-seeds, its continuation) belongs on that trial. They are written to the RDB
    storage's user-attribute table through Optuna's own private models and session helper."""
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    storage = study._storage
    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, RDBStorage):
        raise UsageError(
            f"optuna.storage: follow-ups need an RDB storage (sqlite:///..., postgresql://...), not {rdb}"
        )

    def write() -> None:
        with _create_scoped_session(rdb.scoped_session, True) as session:
            row = models.TrialModel.find_or_raise_by_id(trial_id(trial), session)
            for key, value in attrs.items():
                attribute = models.TrialUserAttributeModel.find_by_trial_and_key(row, key, session)
                if attribute is None:
                    session.add(
                        models.TrialUserAttributeModel(
                            trial_id=row.trial_id, key=key, value_json=json.dumps(value)
                        )
                    )
                else:
                    attribute.value_json = json.dumps(value)

    storage_patience(rdb.url).call("set a finished trial's user attrs", write)


def fresh(study):
    """The same study read anew from its storage.

    Why beyond the API: Optuna caches finished trials per study object, so attrs written by
    `set_finished_attrs` are seen only by a study loaded again; its storage URL is private."""
    import optuna
    from optuna.storages import RDBStorage

    rdb = getattr(study._storage, "_backend", study._storage)
    again = patient_storage(RDBStorage(rdb.url, engine_kwargs=rdb.engine_kwargs), storage_patience(rdb.url))
    return optuna.load_study(study_name=study.study_name, storage=again)
