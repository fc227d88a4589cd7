"""MLflow recording of a run: config, per-epoch metrics, final metrics, figures and the best checkpoint.

mlflow is imported where it is used, so runs with `tracking=none` (e.g. on a lent GPU machine that has no
mlflow installed) never import it."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from agecls.config import compose_train, project_root
from agecls.files import file_lock, sqlite_lock_path

MAX_PARAM_CHARS = 6000
log = logging.getLogger("agecls.cli.train")


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
    """Return the experiment id, creating it (artifacts under artifact_root/name) if missing; race-safe.
    With artifact_root null the tracking server chooses (e.g. its --artifacts-destination)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    open_store(tracking_uri)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (Path(artifact_root) / name).resolve().as_uri() if artifact_root else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between our lookup and create.
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


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


class Recorder:
    """Thin wrapper over the active MLflow run; every method is a no-op when tracking is disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.run_id: str | None = None

    def params(self, flat: dict[str, Any]) -> None:
        if self.enabled:
            _mlflow().log_params({k: str(v)[:MAX_PARAM_CHARS] for k, v in flat.items()})

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.enabled and values:
            _mlflow().log_metrics(values, step=step)

    def tags(self, values: dict[str, Any]) -> None:
        if self.enabled:
            _mlflow().set_tags({k: str(v) for k, v in values.items()})

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            _mlflow().log_artifact(str(path), artifact_path=folder)


def interrupted(exc: BaseException) -> bool:
    """Whether a run ended because it was stopped from outside (Ctrl-C, a cancelled job) rather than failed.

    Lightning's fit turns Ctrl-C into `sys.exit(1)` raised while handling the KeyboardInterrupt, and SIGTERM
    (what Slurm's scancel and the trial job wrapper pass on) into SIGTERMException, a SystemExit: without
    looking for these, an interrupted trial's run ended FAILED like a crash, on every launcher."""
    if isinstance(exc, KeyboardInterrupt | SIGTERMException):
        return True
    return isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)


@contextmanager
def recording(
    tracking: DictConfig, run_name: str | None = None, tags: dict | None = None
) -> Iterator[Recorder]:
    """One MLflow run around a training job: FAILED on an exception, KILLED when interrupted (Ctrl-C,
    SIGTERM, a cancelled trial job: see `interrupted`), else FINISHED."""
    if not tracking.enabled:
        yield Recorder(enabled=False)
        return
    import mlflow

    experiment_id = ensure_experiment(tracking.tracking_uri, tracking.experiment, tracking.artifact_root)
    # A REST tracking server takes tag values as protobuf strings only (an int there is a TypeError).
    tags = {key: str(value) for key, value in (tags or {}).items()}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    recorder = Recorder(enabled=True)
    recorder.run_id = run.info.run_id
    try:
        yield recorder
    except Exception as exc:
        if type(exc).__name__ != "TrialPruned":
            mlflow.end_run("FAILED")
            raise
        # Stopped early by an Optuna pruner: not a failure; MLflow has no PRUNED status, so tag it.
        mlflow.set_tag("trial_state", "PRUNED")
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.end_run("KILLED" if interrupted(exc) else "FAILED")
        raise
    mlflow.end_run("FINISHED")


class EpochLogger(Logger):
    """Lightning logger that sends each epoch's metrics to the recorder (MLflow step = epoch, from 1)
    and writes one concise line per epoch, so runs read well with the progress bar off (sweeps).

    A logger rather than a callback: Lightning hands loggers the train-epoch metrics after the module's
    own epoch-end hook has computed them, so train and val values of one epoch share a step.
    """

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder
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
            log.info("epoch %d  %s", epoch, shown)
            self._pending = {}
