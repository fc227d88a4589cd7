"""A run's tracking follows a shared store: artifacts go where the tracking server says unless a root is
given (a machine's own folder with a shared store is warned about), and a tracking server that is away
delays what a run logs without failing it: the run ends FINISHED with every epoch's metrics, and the log
says what waited. The server tests relay a real `mlflow server` (tests/engines.py) through a Gate that
closes and opens it, and are in the `cluster` group."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from agecls.outage import Deferred, Patience, server_down
from agecls.tracking import recording
from agecls.tracking_store import artifact_location, shared_store


def test_shared_stores_are_servers_and_databases_but_not_a_sqlite_file(tmp_path):
    assert shared_store("http://mlflow.example:5000") and shared_store("https://mlflow.example")
    assert shared_store("postgresql+psycopg://agecls@db:5432/mlflow")
    assert not shared_store(f"sqlite:///{tmp_path}/mlflow.db")
    assert not shared_store(str(tmp_path / "mlruns"))


def test_artifacts_follow_the_tracking_store(tmp_path, caplog):
    local = f"sqlite:///{tmp_path}/out/mlflow.db"
    # nothing given: beside a sqlite store, as before; the server's choice with a shared store
    assert artifact_location(local, "e", None) == (tmp_path / "out" / "mlartifacts" / "e").resolve().as_uri()
    assert artifact_location("http://mlflow.example:5000", "e", None) is None
    assert artifact_location("postgresql://agecls@db/mlflow", "e", None) is None
    with caplog.at_level(logging.WARNING, logger="agecls.tracking_store"):
        assert artifact_location("http://mlflow.example:5000", "e", "s3://bucket/art/") == "s3://bucket/art/e"
        assert artifact_location(local, "e", str(tmp_path / "art")) == (tmp_path / "art" / "e").as_uri()
        assert caplog.records == []  # a URI every machine reaches, or a local store: nothing to say
        given = artifact_location("http://mlflow.example:5000", "e", str(tmp_path / "art"))
    assert given == (tmp_path / "art" / "e").as_uri()  # warned about, not refused: it may be a shared mount
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(
        f"tracking.artifact_root={tmp_path / 'art'} is a folder of each machine, but "
        "tracking.tracking_uri=http://mlflow.example:5000 is shared by several"
    )
    assert line.endswith(
        "tracking.artifact_root=null lets the server store them (its --artifacts-destination)"
    )


def test_the_default_config_lets_a_tracking_server_choose_where_artifacts_go(compose_cfg):
    cfg = compose_cfg(["tracking.tracking_uri=http://mlflow.example:5000"])
    assert cfg.tracking.artifact_root is None
    assert artifact_location(cfg.tracking.tracking_uri, cfg.tracking.experiment, None) is None


def test_calls_kept_past_the_patience_land_in_order_once_the_store_is_back(caplog):
    down, landed = [True], []

    def log_metrics(step):
        if down[0]:
            raise ConnectionRefusedError(111, "Connection refused")
        landed.append(step)

    calls = Deferred(Patience("MLflow server s", "tracking.server_patience_s", 0.6, server_down, then="kept"))
    with caplog.at_level(logging.WARNING, logger="agecls.outage"):
        calls.call("log epoch 1's metrics", log_metrics, 1)  # waits 0.6 s, then keeps it
        calls.call("log epoch 2's metrics", log_metrics, 2)  # one try, kept behind it
        assert landed == [] and calls.waiting() == "log epoch 1's metrics, log epoch 2's metrics"
        down[0] = False
        calls.call("log epoch 3's metrics", log_metrics, 3)
    assert landed == [1, 2, 3] and calls.pending == []
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("MLflow server s unreachable (ConnectionRefusedError: [Errno 111] Connection")
    assert lines[1].startswith(
        "MLflow server s unreachable for 1 s (tracking.server_patience_s=0.6) while it "
    )
    assert lines[1].endswith("; kept")
    assert lines[-1].startswith("MLflow server s back after ") and len(lines) == 3, lines
    with pytest.raises(ValueError):  # not an outage: raised at once
        calls.call("log", lambda: (_ for _ in ()).throw(ValueError("bad metric name")))


# -- a real tracking server going away ----------------------------------------------------------------------
OUTAGE_S = 9  # longer than MLflow's own 2 retries (~5 s): the wait is agecls's


def _tracking(uri: str, experiment: str, patience: float):
    return OmegaConf.create(
        {
            "enabled": True,
            "tracking_uri": uri,
            "experiment": experiment,
            "artifact_root": None,
            "server_patience_s": patience,
        }
    )


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.cluster
@pytest.mark.parametrize("patience", [60, 1])  # waited out; kept past the patience and logged later
def test_a_run_logs_through_a_tracking_server_outage_and_ends_finished(
    mlflow_server, tmp_path, caplog, monkeypatch, patience
):
    import mlflow
    from tests.engines import Gate

    # what recording() sets (restored after); none at all where the test wants each call to fail at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2" if patience > 1 else "0")
    gate = Gate(int(mlflow_server.uri.rsplit(":", 1)[1]))
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"weights")
    try:
        with (
            caplog.at_level(logging.WARNING),
            recording(
                _tracking(gate.uri, f"outage-{patience}", patience), run_name="outage", run_dir=tmp_path
            ) as rec,
        ):
            rec.metrics({"val/macro_f1": 0.1}, step=1)
            gate.close()
            if patience == 1:  # past the patience each call is kept at once; they land with the next one
                rec.metrics({"val/macro_f1": 0.2}, step=2)
                rec.metrics({"val/macro_f1": 0.3}, step=3)
                rec.artifact(checkpoint, "checkpoints")
                assert rec.calls.waiting() == (
                    "log epoch 2's metrics, log epoch 3's metrics, log artifact best.ckpt"
                )
                gate.open()
            else:  # waited out: the calls go on when it is back
                threading.Timer(OUTAGE_S, gate.open).start()
                started = time.monotonic()
                rec.metrics({"val/macro_f1": 0.2}, step=2)
                assert time.monotonic() - started >= OUTAGE_S - 1
                rec.metrics({"val/macro_f1": 0.3}, step=3)
                rec.artifact(checkpoint, "checkpoints")
            rec.metrics({"val/macro_f1": 0.4}, step=4)
    finally:
        gate.close()
    run = mlflow.MlflowClient(mlflow_server.uri).get_run(rec.run_id)
    assert run.info.status == "FINISHED"
    assert _history(mlflow_server.uri, rec.run_id, "val/macro_f1") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    names = [a.path for a in mlflow.MlflowClient(mlflow_server.uri).list_artifacts(rec.run_id, "checkpoints")]
    assert names == ["checkpoints/best.ckpt"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # the server's store, not this machine's
    lines = [r.getMessage() for r in caplog.records if r.name == "agecls.outage"]
    assert lines[0].startswith(f"MLflow server {gate.uri} unreachable (")
    assert "(tracking.server_patience_s) to log epoch 2's metrics" in lines[0]
    assert lines[-1].startswith(f"MLflow server {gate.uri} back after "), lines
    assert Path(tmp_path / "run.json").read_text().count('"status": "finished"') == 1
