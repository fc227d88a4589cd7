"""MLflow recording of a run: config, per-epoch metrics, final metrics, figures and the best checkpoint; the
run folder's status marker (run.json), and the ending of runs whose process died without ending them.

mlflow is imported where it is used, so runs with `tracking=none` (e.g. on a lent GPU machine that has no
mlflow installed) never import it."""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from agecls.config import compose_train, project_root
from agecls.errors import UsageError
from agecls.files import file_lock, sqlite_lock_path, write_atomic
from agecls.outage import Deferred, Patience, redact
from agecls.process import ENDED, proc_stat
from agecls.tracking_store import MLFLOW_RETRIES, artifact_location, shared_store, store_patience

MAX_PARAM_CHARS = 6000
log = logging.getLogger(__name__)
# The run folder's status marker (see `write_run_file`).
RUN_FILE = "run.json"
# MLflow tags naming the process that runs a run, so a later command can tell whether it still runs.
PID_TAG, HOST_TAG, STARTED_TAG = "agecls.pid", "agecls.host", "agecls.started"
ENDED_BY_TAG = "agecls.ended_by"
# Experiment tag that makes the MLflow 3 UI open an experiment on its runs table, not the GenAI overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# Run names stay short enough for the runs table's name column.
MAX_RUN_NAME_CHARS = 80


def default_tracking(overrides: list[str] | None = None) -> tuple[str, Path, str]:
    """Tracking URI, output folder and Optuna storage from the same config `agecls-train` composes."""
    cfg = compose_train(overrides or [])
    return cfg.tracking.tracking_uri, Path(cfg.paths.output_dir), str(cfg.optuna.storage)


def git_commit() -> str:
    """Commit of the source checkout agecls runs from ('+dirty' if modified), or 'unknown'."""
    root = project_root()
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


_READY_STORES: set[str] = set()


def _mlflow():
    import mlflow

    return mlflow


def open_store(tracking_uri: str) -> None:
    """Point MLflow at `tracking_uri`; a local sqlite store is first opened under a file lock, so runs that
    start together (a grid's jobs through a submitit launcher, sweep workers) never create its tables twice
    (sqlite's 'duplicate column name' race)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY_STORES:
        return
    with file_lock(sqlite_lock_path(tracking_uri)):
        mlflow.MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    _READY_STORES.add(tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path | None) -> str:
    """Return the experiment id, creating it (artifacts where `artifact_location` says) if missing;
    race-safe. An existing experiment of a shared store whose artifacts go to a machine's own folder is
    warned about: its location was fixed when it was made."""
    import mlflow
    from mlflow.exceptions import MlflowException

    open_store(tracking_uri)
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        location = artifact_location(tracking_uri, name, artifact_root)
        try:
            return mlflow.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            # Another process created it between our lookup and create.
            found = mlflow.get_experiment_by_name(name)
            if found is None:
                raise
    if shared_store(tracking_uri) and str(found.artifact_location).startswith("file:"):
        log.warning(
            "MLflow experiment %r of the shared store %s keeps its artifacts in %s, a folder of each machine "
            "(it was made so): other workers' checkpoints land on their own disks; a new tracking.experiment "
            "with tracking.artifact_root=null lets the server store them",
            name,
            redact(str(tracking_uri)),
            found.artifact_location,
        )
    if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older agecls, or by hand
        mlflow.MlflowClient(tracking_uri=tracking_uri).set_experiment_tag(
            found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
        )
    return found.experiment_id


def short_value(value: Any) -> str:
    """A sampled or overridden value as the runs table shows it: 0.00032 as 3.2e-4, 0.5 as 0.5."""
    if isinstance(value, float):
        if value != 0 and not 1e-2 <= abs(value) < 1e4:
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 24 else text[:23] + "…"


def short_pairs(pairs: list[tuple[str, Any]]) -> str:
    """`key=value` pairs, each key shortened to its last part (optimizer.lr as lr) unless two would clash."""
    lasts = [key.lstrip("+~").rsplit(".", 1)[-1] for key, _ in pairs]
    return " ".join(
        f"{last if lasts.count(last) == 1 else key.lstrip('+~')}={short_value(value)}"
        for (key, value), last in zip(pairs, lasts, strict=True)
    )


def clip_name(name: str) -> str:
    return name if len(name) <= MAX_RUN_NAME_CHARS else name[: MAX_RUN_NAME_CHARS - 1] + "…"


def trial_run_name(number: int, params: dict[str, Any], prefix: str | None = None) -> str:
    """`trial-0003 lr=3.2e-4 optimizer=adam`: the trial number the leaderboard shows, and what it sampled."""
    pairs = sorted(params.items(), key=lambda kv: (kv[0].rsplit(".", 1)[-1], kv[0]))
    name = f"trial-{number:04d} {short_pairs(pairs)}".strip()
    return clip_name(f"{prefix} {name}" if prefix else name)


def overrides_run_name(overrides: list[str], fallback: str) -> str:
    """A run named by its command-line overrides (`task=gender max_epochs=2`), `fallback` without any."""
    pairs = [(key, value) for key, _, value in (o.partition("=") for o in overrides)]
    return clip_name(short_pairs(pairs)) if pairs else fallback


def command_name() -> str:
    """The command this process runs as (`agecls-train`), also when run as `python -m agecls.cli.train`."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if path.parent.name == "cli" and path.parent.parent.name == "agecls" and path.suffix == ".py":
        return f"agecls-{path.stem}"
    return path.name


def source_tags(run_dir: Path | None = None) -> dict[str, str]:
    """MLflow's standard source tags: the commit, the command, and a note with the full command line."""
    command = shlex.join([command_name(), *sys.argv[1:]])
    note = f"```\n{command}\n```\n"
    if run_dir is not None:
        note += f"\nRun folder: `{run_dir}`\n"
    return {
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": command_name(),
        "mlflow.source.type": "LOCAL",
        "mlflow.note.content": note,
    }


class ManifestMismatchError(ValueError):
    """An experiment already holds runs on a different dataset manifest (split)."""


def check_manifest(tracking: DictConfig, manifest_hash: str) -> None:
    """Refuse to add a run on another manifest to an experiment whose runs share one (comparability).

    Allowed with tracking.allow_new_manifest=true; a new tracking.experiment is the usual answer."""
    if not tracking.enabled or tracking.get("allow_new_manifest"):
        return
    import mlflow

    open_store(str(tracking.tracking_uri))
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return
    other = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`data.manifest_hash` != '{manifest_hash}'",
        max_results=1,
        output_format="list",
    )
    if other:
        found = other[0].data.tags
        raise ManifestMismatchError(
            f"MLflow experiment {tracking.experiment!r} already holds runs on another data manifest "
            f"({found.get('data.manifest_hash', '')[:12]} of {found.get('data.root')}, e.g. run "
            f"{other[0].info.run_id[:8]}); this run's manifest is {manifest_hash[:12]}. Scores would not "
            "be comparable: choose a new tracking.experiment=NAME, or set tracking.allow_new_manifest=true"
        )


def process_started(pid: int) -> str | None:
    """Start time of process `pid` (clock ticks after boot): with the pid it names one process, even once the
    pid is reused. None where there is no /proc or no such process; "zombie" for a process that has exited
    but was not yet reaped."""
    stat = proc_stat(pid)
    if stat is None:
        return None
    return "zombie" if stat[0] in ENDED else str(stat[1])


def process_identity() -> dict[str, str]:
    """The MLflow tags naming this process: pid, host and start time."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), STARTED_TAG: process_started(pid) or ""}


def process_gone(pid: int, started: str) -> str | None:
    """Why process `pid` of this host, started at `started` (`process_started`; "" if unknown), no longer
    runs; None while it does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} not running"
    except PermissionError:
        pass  # it exists, as another user's process
    now = process_started(pid)
    if now == "zombie":
        return f"pid {pid} has exited"
    if started and now is not None and now != started:
        return f"pid {pid} is now another process, started at tick {now}, not {started}"
    return None


def write_run_file(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Update the run folder's status marker `run.json` with `fields` (atomically, so a reader never sees
    half of it) and return its content. It says status (running | finished | failed | killed), the process
    (pid, host, started), the MLflow run id and store, and when it was last updated."""
    path = Path(run_dir) / RUN_FILE
    state = read_run_file(run_dir)
    state.update(fields)
    state["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_atomic(path, json.dumps(state, indent=2) + "\n")
    return state


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """The run folder's `run.json` ({} when it has none); a ValueError names a file that is not JSON."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); valid: the run marker agecls-train writes") from exc


def end_dead_runs(tracking: DictConfig) -> list[str]:
    """Mark FAILED the RUNNING MLflow runs of this host whose process is gone (killed with SIGKILL, out of
    memory, the machine restarted), with the reason in tag `agecls.ended_by`, and their run.json `failed`;
    return their ids. Only runs tagged with this host are judged (another machine's pids mean nothing
    here); one search over the store's experiments, so it is cheap enough for every run start."""
    if not tracking.enabled:
        return []
    import mlflow
    from mlflow.exceptions import MlflowException

    host = socket.gethostname()
    try:
        open_store(str(tracking.tracking_uri))
        client = mlflow.MlflowClient(tracking_uri=str(tracking.tracking_uri))
        experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        if not experiments:
            return []
        runs = client.search_runs(
            experiments,
            filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=1000,
        )
    except MlflowException as exc:
        log.warning("could not look for runs whose process died in %s: %s", tracking.tracking_uri, exc)
        return []
    ended = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if pid <= 0:  # os.kill would signal a process group
            continue
        reason = process_gone(pid, tags.get(STARTED_TAG, ""))
        if reason is None:
            continue
        why = f"process gone on host {host}: {reason}"
        client.set_tag(run.info.run_id, ENDED_BY_TAG, why)
        client.set_terminated(run.info.run_id, "FAILED")
        run_dir = tags.get("run_dir")
        if run_dir and (Path(run_dir) / RUN_FILE).is_file():
            try:
                marker = read_run_file(Path(run_dir))
            except ValueError:
                marker = {}
            if marker.get("status") == "running" and marker.get("pid") == pid:
                write_run_file(Path(run_dir), status="failed", ended_by=why)
        log.warning("MLflow run %s (%s) marked FAILED: %s", run.info.run_id[:8], run_dir or "?", why)
        ended.append(run.info.run_id)
    return ended


class Recorder:
    """Thin wrapper over the active MLflow run; every method is a no-op when tracking is disabled.

    With a shared store (`calls`), each call waits out an outage of the server, and past the patience is
    kept and made once it is back: a run never fails because tracking was away."""

    def __init__(self, enabled: bool, calls: Deferred | None = None) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.resumed = False  # a run continued by a later process (trainer.resume)
        self.calls = calls

    def _send(self, doing: str, fn, *args: Any, **kwargs: Any) -> None:
        if self.calls is None:
            fn(*args, **kwargs)
        else:
            self.calls.call(doing, fn, *args, **kwargs)

    def params(self, flat: dict[str, Any]) -> None:
        """Log params; on a resumed run only those not logged yet (MLflow keeps a param's first value), and
        a changed one (e.g. trainer.max_epochs, to extend the run) as tag `agecls.resumed.KEY`."""
        if not self.enabled:
            return
        values = {k: str(v)[:MAX_PARAM_CHARS] for k, v in flat.items()}
        if self.resumed:
            get_run = _mlflow().get_run
            run = (
                self.calls.patience.call("read the run", get_run, self.run_id)
                if self.calls
                else get_run(self.run_id)
            )
            logged = run.data.params
            changed = {f"agecls.resumed.{k}": v for k, v in values.items() if k in logged and logged[k] != v}
            values = {k: v for k, v in values.items() if k not in logged}
            if changed:
                self.tags(changed)
        if values:
            self._send(f"log {len(values)} params", _mlflow().log_params, values)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.enabled and values:
            what = f"log epoch {step}'s metrics" if step is not None else "log metrics"
            self._send(what, _mlflow().log_metrics, values, step=step)

    def tags(self, values: dict[str, Any]) -> None:
        if self.enabled:
            self._send("set tags", _mlflow().set_tags, {k: str(v) for k, v in values.items()})

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            self._send(
                f"log artifact {Path(path).name}", _mlflow().log_artifact, str(path), artifact_path=folder
            )

    def end(self, status: str) -> None:
        """End the run with `status` once what waits has landed; with the store still away past its
        patience, the run is left as it is and the log says what it lacks."""
        if not self.enabled:
            return
        if self.calls is None:
            _mlflow().end_run(status)
            return
        self.calls.call(f"end the run {status}", _mlflow().end_run, status)
        if self.calls.pending:
            log.error(
                "MLflow run %s not ended: %s still away; not logged: %s",
                (self.run_id or "?")[:8],
                self.calls.patience.store,
                self.calls.waiting(),
            )


def interrupted(exc: BaseException) -> bool:
    """Whether a run ended because it was stopped from outside (Ctrl-C, a cancelled job) rather than failed.

    Lightning's fit turns Ctrl-C into `sys.exit(1)` raised while handling the KeyboardInterrupt, and SIGTERM
    (what Slurm's scancel and the trial job wrapper pass on) into SIGTERMException, a SystemExit: without
    looking for these, an interrupted trial's run ended FAILED like a crash, on every launcher."""
    if isinstance(exc, KeyboardInterrupt | SIGTERMException):
        return True
    return isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)


def _patiently(patience: Patience | None, doing: str, fn, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs) if patience is None else patience.call(doing, fn, *args, **kwargs)


@contextmanager
def recording(
    tracking: DictConfig,
    run_name: str | None = None,
    tags: dict | None = None,
    run_id: str | None = None,
    run_dir: Path | None = None,
) -> Iterator[Recorder]:
    """One MLflow run around a training job: FAILED on an exception, KILLED when interrupted (Ctrl-C,
    SIGTERM, a cancelled trial job: see `interrupted`), else FINISHED. With `run_id`, that run is continued
    (a resumed training job) instead of a new one started. The run is tagged with this process (pid, host,
    start time: `end_dead_runs` of a later command marks it FAILED if the process dies without ending it),
    with MLflow's source tags (`source_tags`), and with `run_dir` the folder's `run.json` follows the
    same states."""
    identity = process_identity()
    patience = store_patience(tracking) if tracking.enabled else None
    recorder = Recorder(enabled=bool(tracking.enabled), calls=Deferred(patience) if patience else None)
    if patience is not None:  # MLflow's own retries short: the wait is the patience's, said in the log
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_RETRIES)
    if tracking.enabled:
        import mlflow
        from mlflow.exceptions import MlflowException

        # A REST tracking server takes tag values as protobuf strings only (an int there is a TypeError).
        tags = {key: str(value) for key, value in {**(tags or {}), **identity}.items()}
        if run_id is None:
            experiment_id = _patiently(
                patience,
                "find the experiment",
                ensure_experiment,
                tracking.tracking_uri,
                tracking.experiment,
                tracking.artifact_root,
            )
            tags = {**source_tags(run_dir), **tags}  # a caller's own values win
            # Without a name MLflow draws one from `random`, which seed_everything has just seeded: every
            # run of one seed (all trials of a study) would get the same name.
            run_name = run_name or f"{command_name()} {datetime.now():%Y-%m-%d %H:%M:%S}"
            start = mlflow.start_run
            run = _patiently(
                patience, "start the run", start, experiment_id=experiment_id, run_name=run_name, tags=tags
            )
        else:
            open_store(str(tracking.tracking_uri))
            try:
                run = mlflow.start_run(run_id=run_id)
            except MlflowException as exc:
                raise UsageError(
                    f"MLflow run {run_id} cannot be continued in {tracking.tracking_uri} ({exc}); valid: the "
                    "tracking store that recorded the run (tracking.tracking_uri)"
                ) from exc
            mlflow.set_tags(tags)
            if ENDED_BY_TAG in run.data.tags:  # it runs again: no longer ended by a dead process
                mlflow.MlflowClient().delete_tag(run_id, ENDED_BY_TAG)
            recorder.resumed = True
        recorder.run_id = run.info.run_id
    if run_dir is not None:
        write_run_file(
            run_dir,
            status="running",
            pid=int(identity[PID_TAG]),
            host=identity[HOST_TAG],
            started=identity[STARTED_TAG],
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            mlflow_run_id=recorder.run_id,
            tracking_uri=str(tracking.tracking_uri) if tracking.enabled else None,
            ended_by=None,
        )

    def end(status: str, marker: str | None = None, why: BaseException | None = None) -> None:
        recorder.end(status)
        if run_dir is not None:
            ended_by = f"{type(why).__name__}: {why}"[:500] if why is not None else None
            write_run_file(run_dir, status=marker or status.lower(), ended_by=ended_by)

    try:
        yield recorder
    except Exception as exc:
        if type(exc).__name__ != "TrialPruned":
            end("FAILED", why=exc)
            raise
        # Stopped early by an Optuna pruner: not a failure; MLflow has no PRUNED status, so tag it.
        recorder.tags({"trial_state": "PRUNED"})
        end("KILLED", "pruned")
        raise
    except BaseException as exc:
        end("KILLED" if interrupted(exc) else "FAILED", why=exc)
        raise
    end("FINISHED")


class EpochLogger(Logger):
    """Lightning logger that sends each epoch's metrics to the recorder (MLflow step = epoch, from 1)
    and writes one concise line per epoch, so runs read well with the progress bar off (sweeps).

    A logger rather than a callback: Lightning hands loggers the train-epoch metrics after the module's
    own epoch-end hook has computed them, so train and val values of one epoch share a step.
    """

    def __init__(self, recorder: Recorder, console: bool = True) -> None:
        super().__init__()
        self.recorder = recorder
        self.console = console  # False with a progress bar on: the epoch line goes to log files only
        self._pending: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "agecls"

    @property
    def version(self) -> str:
        return self.recorder.run_id or "untracked"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Params are recorded once, flattened, by the training job itself."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        epoch = int(values.pop("epoch", 0)) + 1
        self.recorder.metrics(values, step=epoch)
        self._pending.update(values)
        if any(k.startswith("train/") for k in values):  # the train values close an epoch
            shown = "  ".join(f"{k} {v:.4g}" for k, v in sorted(self._pending.items()))
            if self.console:
                log.info("epoch %d  %s", epoch, shown)
            else:
                _log_to_files(f"epoch {epoch}  {shown}")
            self._pending = {}


def _log_to_files(message: str) -> None:
    """An INFO line for the log files only: a line on the console would break the progress bar's line,
    which shows the same values."""
    if not log.isEnabledFor(logging.INFO):
        return
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, (), None)
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        logger = logger.parent if logger.propagate else None
