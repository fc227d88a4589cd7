"""A study's database that goes away (a PostgreSQL restart) is waited out for optuna.storage_patience_s:
every storage call of sweepers and trial processes retries connection errors, says once what it waits for,
and goes on; past the bound it stops with one line naming the setting; other errors pass at once. The
PostgreSQL tests stop the real server (tests/engines.py) and are in the `cluster` group."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import optuna
import pytest
import sqlalchemy.exc
from omegaconf import OmegaConf

from agecls.outage import Patience, StoreUnavailable, database_down, redact
from agecls.study import open_study, record_heartbeat, trial_id
from agecls.sweep.executors import Running
from agecls.sweep.recovery import stop_for_outage


def _admin_shutdown() -> Exception:
    """The error worker A died of (issue measurement): psycopg's AdminShutdown through SQLAlchemy, as
    Optuna's session helper re-raises it (StorageInternalError from it)."""
    try:
        try:
            raise sqlalchemy.exc.OperationalError(
                "UPDATE trial_heartbeats ...",
                {},
                Exception("terminating connection due to administrator command"),
            )
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
    except optuna.exceptions.StorageInternalError as wrapped:
        return wrapped


def test_connection_errors_are_outages_and_statement_errors_are_not():
    assert database_down(_admin_shutdown())
    refused = sqlalchemy.exc.OperationalError(
        "SELECT 1", {}, Exception('connection to server at "127.0.0.1", port 5 failed: Connection refused')
    )
    assert database_down(refused)
    invalidated = sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True)
    assert database_down(invalidated)
    assert database_down(ConnectionRefusedError(111, "Connection refused"))
    locked = sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    assert not database_down(locked)
    assert not database_down(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint")))
    assert not database_down(ValueError("Cannot tell a COMPLETE trial"))


def test_an_outage_is_waited_out_with_one_line_each_way(caplog):
    calls = []

    def flaky(value):
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise _admin_shutdown()
        return value * 2

    patience = Patience("optuna.storage db", "optuna.storage_patience_s", 30, database_down)
    with caplog.at_level(logging.WARNING, logger="agecls.outage"):
        assert patience.call("record heartbeat", flaky, 21) == 42
    assert len(calls) == 4
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert waits[0] >= 0.45 and waits[1] >= 0.95 and waits[2] >= 1.95  # backoff 0.5, 1, 2 s
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == (
        "optuna.storage db unreachable (OperationalError: (builtins.Exception) terminating connection due to "
        "administrator command): waiting up to 30 s (optuna.storage_patience_s) to record heartbeat"
    )
    assert lines[1].startswith("optuna.storage db back after ")


def test_a_tell_whose_answer_was_lost_is_not_failed_by_its_retry(tmp_path):
    # the database commits the COMPLETE state, then the connection drops before its answer: the retry is
    # refused as "already finished", and that is the tell having landed, not an error
    import sqlalchemy.event
    import sqlalchemy.orm

    from agecls.study import patient_storage

    path = tmp_path / "lost.db"
    dropped = []

    def drop_once_finished(session) -> None:
        with sqlite3.connect(path) as db:
            finished = db.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        if finished and not dropped:
            dropped.append(finished)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))

    rdb = optuna.storages.RDBStorage(f"sqlite:///{path}")
    storage = patient_storage(rdb, Patience("db", "optuna.storage_patience_s", 30, database_down))
    study = optuna.create_study(storage=storage, study_name="lost", direction="maximize")
    trial = study.ask()
    sqlalchemy.event.listen(sqlalchemy.orm.Session, "after_commit", drop_once_finished)
    try:
        study.tell(trial, 0.5)
    finally:
        sqlalchemy.event.remove(sqlalchemy.orm.Session, "after_commit", drop_once_finished)
    assert dropped == [1]
    again = optuna.load_study(study_name="lost", storage=f"sqlite:///{path}").trials[0]
    assert again.state.name == "COMPLETE" and again.value == 0.5


def test_other_errors_are_not_retried():
    calls = []

    def wrong():
        calls.append(1)
        raise ValueError("Cannot tell a COMPLETE trial")

    patience = Patience("optuna.storage db", "optuna.storage_patience_s", 30, database_down)
    with pytest.raises(ValueError, match="COMPLETE"):
        patience.call("tell", wrong)
    assert calls == [1]


def test_past_the_bound_one_line_names_the_setting_and_later_calls_do_not_wait_again():
    calls = []

    def down():
        calls.append(time.monotonic())
        raise _admin_shutdown()

    patience = Patience("optuna.storage db", "optuna.storage_patience_s", 1.2, database_down)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        patience.call("ask for a trial", down)
    assert 1.1 <= time.monotonic() - started < 5
    text = str(raised.value)
    assert (
        "optuna.storage db unreachable for 1 s (optuna.storage_patience_s=1.2) while it would ask for" in text
    )
    assert "terminating connection due to administrator command" in text
    calls.clear()
    with pytest.raises(StoreUnavailable):  # on the way out: one try, no second wait
        patience.call("tell", down)
    assert len(calls) == 1
    assert patience.call("tell", lambda: "back") == "back"  # and a success ends the outage


def test_urls_are_logged_without_their_password():
    assert (
        redact("postgresql+psycopg://agecls:s3cret@db:5432/optuna")
        == "postgresql+psycopg://agecls:***@db:5432/optuna"
    )
    assert redact("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


class _Handle:
    def __init__(self) -> None:
        self.signals: list[int] = []

    def done(self) -> bool:
        return bool(self.signals)

    def signal(self, sig: int) -> None:
        self.signals.append(sig)

    def wait(self, timeout: float) -> None:
        pass


def test_a_sweeper_that_gives_up_stops_its_trials_and_says_so_in_one_line():
    handle = _Handle()
    running = {3: Running(handle, 3, 7, {"optimizer.lr": 0.01}, 0)}
    error = StoreUnavailable("optuna.storage db unreachable for 300 s (optuna.storage_patience_s=300) ...")
    line = stop_for_outage(running, None, error)
    assert handle.signals == [2]  # Ctrl-C first: the trial's run ends KILLED
    assert line == (
        "the sweep stopped: optuna.storage db unreachable for 300 s (optuna.storage_patience_s=300) ...; "
        "1 running trial(s) stopped, re-queued when it runs again"
    )
    assert "\n" not in line


# -- a real PostgreSQL going away ---------------------------------------------------------------------------
def _cfg(url: str, patience: float):
    return OmegaConf.create(
        {
            "storage": url,
            "study_name": "outage",
            "heartbeat_interval": 4,
            "grace_period": 60,
            "retries": 1,
            "storage_patience_s": patience,
            "pruner": {"_target_": "optuna.pruners.NopPruner"},
        }
    )


@pytest.mark.cluster
def test_a_postgresql_restart_is_waited_out_by_every_kind_of_call(postgres, caplog):
    url = postgres.create_database("outage_restart")
    study = open_study(_cfg(url, 120), "maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    record_heartbeat(study, trial_id(trial))
    # before the fix: sqlalchemy.exc.OperationalError (AdminShutdown) from record_heartbeat killed worker A
    postgres.restart()
    record_heartbeat(study, trial_id(trial))
    trial.report(0.25, 1)
    trial.set_user_attr("epoch", 1)

    # down for a few seconds while the calls are made: they wait and go on
    postgres.stop()
    restart = threading.Timer(3, postgres.start)
    restart.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agecls.outage"):
        record_heartbeat(study, trial_id(trial))
        trial.report(0.5, 2)
        study.tell(trial, 0.5)
    restart.join()
    assert time.monotonic() - started >= 2.5
    again = optuna.load_study(study_name="outage", storage=url).trials[0]
    assert again.state.name == "COMPLETE" and again.value == 0.5
    assert again.intermediate_values == {1: 0.25, 2: 0.5} and again.user_attrs == {"epoch": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "agecls.outage"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"optuna.storage {url} unreachable (OperationalError: "), lines
    assert "waiting up to 120 s (optuna.storage_patience_s) to record heartbeat" in lines[0]
    assert lines[1].startswith(f"optuna.storage {url} back after "), lines


@pytest.mark.cluster
def test_past_storage_patience_the_call_fails_in_one_line_and_the_study_goes_on_later(postgres):
    url = postgres.create_database("outage_long")
    study = open_study(_cfg(url, 2), "maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    postgres.stop()
    try:
        with pytest.raises(StoreUnavailable, match=r"optuna.storage_patience_s=2\) while it would"):
            trial.report(0.5, 1)
    finally:
        postgres.start()
    study.tell(trial, 0.75)  # the database is back: the same study goes on
    assert optuna.load_study(study_name="outage", storage=url).trials[0].value == 0.75
