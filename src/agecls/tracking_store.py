"""A run's tracking store as agecls treats it: shared by several machines (a tracking server, a database) or
a local sqlite file; where a new experiment's artifacts go; and how long to wait for a shared store that is
away (tracking.server_patience_s)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from agecls.outage import Patience, database_down, redact, server_down

log = logging.getLogger(__name__)


def shared_store(tracking_uri: str) -> bool:
    """Whether the tracking store is shared by several machines: a tracking server (http, https,
    databricks) or a database other than a local sqlite file."""
    scheme = str(tracking_uri).split(":", 1)[0].split("+", 1)[0].lower()
    return "://" in str(tracking_uri) and scheme not in ("sqlite", "file")


def artifact_location(tracking_uri: str, name: str, artifact_root: str | Path | None) -> str | None:
    """Where a new experiment's artifacts go: under `artifact_root`/name when given; with none, beside a
    local sqlite store (its folder's mlartifacts/), and for a shared store wherever the tracking server
    chooses (None: its --artifacts-destination, proxied to every machine). A folder path given with a
    shared store is warned about: every machine would write under that path on its own disk."""
    if artifact_root:
        root = str(artifact_root)
        if shared_store(tracking_uri) and "://" not in root:
            log.warning(
                "tracking.artifact_root=%s is a folder of each machine, but tracking.tracking_uri=%s is "
                "shared by several: every worker writes its artifacts (checkpoints) to its own disk there, "
                "where the others and the MLflow UI cannot read them, unless all mount that folder. "
                "tracking.artifact_root=null lets the server store them (its --artifacts-destination)",
                root,
                redact(str(tracking_uri)),
            )
        return root.rstrip("/") + f"/{name}" if "://" in root else (Path(root) / name).resolve().as_uri()
    if shared_store(tracking_uri):
        return None
    if str(tracking_uri).startswith("sqlite:///"):
        store = Path(str(tracking_uri)[len("sqlite:///") :])
        return (store.parent / "mlartifacts" / name).resolve().as_uri()
    return None


# How long a shared tracking store may be away (a restarting MLflow server) before a run's logging is kept.
DEFAULT_SERVER_PATIENCE_S = 300.0
# MLflow's own retries of one request with a server store: short, so the wait is agecls's, said in the log.
MLFLOW_RETRIES = "2"


def store_patience(tracking: DictConfig) -> Patience | None:
    """Patience with a shared tracking store (tracking.server_patience_s); None for a local sqlite file."""
    uri = str(tracking.tracking_uri)
    if not shared_store(uri):
        return None
    seconds = float(tracking.get("server_patience_s", DEFAULT_SERVER_PATIENCE_S))
    server = uri.startswith(("http://", "https://"))
    return Patience(
        f"MLflow {'server' if server else 'store'} {redact(uri)}",
        "tracking.server_patience_s",
        seconds,
        server_down if server else database_down,
        then="kept to log once it is back (the run goes on)",
    )
