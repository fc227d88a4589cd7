"""The console of a running study (agecls.sweep.console) and where epoch lines go beside a progress bar."""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from agecls.sweep.console import (
    StatusConsole,
    TrialView,
    duration,
    running_lines,
    status_line,
    time_left,
    trial_view,
)
from agecls.tracking import EpochLogger

PARAMS = {"optimizer": "adam", "optimizer.lr": 0.0012345}


def _state() -> list[TrialView]:
    """8 trials wanted: 2 complete (60 s and 100 s), 1 pruned (20 s), 1 failed, 2 running."""
    return [
        TrialView(0, "COMPLETE", 0.41, PARAMS, 20, 0.41, 20, 60.0),
        TrialView(1, "COMPLETE", 0.52, {"optimizer": "nadam", "optimizer.lr": 3e-4}, 20, 0.52, 20, 100.0),
        TrialView(2, "PRUNED", None, PARAMS, 4, 0.2, 20, 20.0),
        TrialView(3, "FAIL", None, PARAMS, None, None, 20, 5.0),
        TrialView(4, "RUNNING", None, PARAMS, 4, 0.4123, 20, 30.0),
        TrialView(5, "RUNNING", None, PARAMS, None, None, 20, 2.0),
    ]


def test_status_line_counts_best_with_params_elapsed_and_time_left():
    line = status_line(_state(), target=8, slots=2, elapsed=252.0)
    # mean of the finished trials (60, 100, 20 s) is 60 s; the running ones need 30 + 58 s more, the three
    # still to start 180 s (a failed trial is not counted): 268 s over 2 slots
    assert time_left(_state(), 8, 2) == 134.0
    assert line == (
        "3/8 done (2 complete, 1 pruned), 2 running, 1 failed | 4m12s elapsed, ~2m14s left | "
        "best 0.5200 (trial 1: optimizer=nadam optimizer.lr=0.0003)"
    )
    minimized = status_line(_state(), target=8, slots=2, elapsed=252.0, maximize=False)
    assert "best 0.4100 (trial 0: optimizer=adam optimizer.lr=0.00123)" in minimized
    assert running_lines(_state()) == ["trial 4: epoch 4/20 val 0.4123", "trial 5: starting"]


def test_status_line_before_any_trial_ends_and_when_done():
    starting = [TrialView(0, "RUNNING", seconds=3.0), TrialView(1, "RUNNING", seconds=1.0)]
    assert status_line(starting, target=4, slots=2, elapsed=3.0) == (
        "0/4 done (0 complete, 0 pruned), 2 running, 0 failed | "
        "3s elapsed, time left known once a trial ends | best: none yet"
    )
    done = [TrialView(0, "COMPLETE", 0.5, {}, seconds=10.0), TrialView(1, "PRUNED", seconds=4.0)]
    assert status_line(done, target=2, slots=2, elapsed=3725.0) == (
        "2/2 done (1 complete, 1 pruned), 0 running, 0 failed | 1h02m elapsed | best 0.5000 (trial 0)"
    )
    assert [duration(s) for s in (0.4, 59, 60, 3599, 3600)] == ["0s", "59s", "1m00s", "59m59s", "1h00m"]


def test_trial_view_reads_an_optuna_trial():
    start = datetime(2026, 1, 1, 12, 0, 0)
    frozen = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params={"optimizer": "adam", "optimizer.lr": 1e-3},
        distributions={
            "optimizer": CategoricalDistribution(["adam", "nadam"]),
            "optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        },
        intermediate_values={1: 0.3, 2: 0.35, 3: 0.33},
        user_attrs={"max_epochs": 20},
    )
    frozen.datetime_start = start
    view = trial_view(frozen, now=(start + timedelta(seconds=42)).timestamp())
    assert (view.state, view.epoch, view.epoch_value, view.max_epochs, view.seconds) == (
        "RUNNING",
        3,
        0.33,
        20,
        42.0,
    )
    assert running_lines([view]) == [f"trial {frozen.number}: epoch 3/20 val 0.3300"]


def test_console_redraws_in_place_on_a_terminal_and_throttles_plain_lines(caplog):
    tty = io.StringIO()
    console = StatusConsole(tty, tty=True)
    console.show("status A", ["trial 0: starting"])
    console.show("status B", ["trial 0: epoch 1/2 val 0.5000"])
    up = "\x1b[1A\x1b[2K"
    assert tty.getvalue() == (
        "status A\n  trial 0: starting\n" + up * 2 + "\rstatus B\n  trial 0: epoch 1/2 val 0.5000\n"
    )
    console.keep()
    console.show("status C", [])
    assert tty.getvalue().endswith("0.5000\nstatus C\n"), "a kept block is not erased"

    plain = StatusConsole(io.StringIO(), every_s=30.0, tty=False)
    with caplog.at_level(logging.INFO, logger="agecls.sweep.console"):
        plain.show("s1", ["trial 0: starting"])  # the first line is shown
        plain.show("s2", [])  # within 30 s and no event: not shown
        plain.show("s3", [], event=True)
    assert [r.getMessage() for r in caplog.records] == ["status: s1 | trial 0: starting", "status: s3"]
    assert plain.stream.getvalue() == ""


class _Recorder:
    run_id = "r1"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.steps.append(step)


def test_epoch_lines_stay_off_the_console_while_a_progress_bar_is_on(tmp_path):
    logger = logging.getLogger("agecls.tracking")
    console, log_file = io.StringIO(), tmp_path / "train.log"
    handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in handlers:
        logger.addHandler(handler)
    try:
        for on_console in (True, False):
            epochs = EpochLogger(_Recorder(), console=on_console)
            epochs.log_metrics({"val/macro_f1": 0.25, "epoch": 0})
            epochs.log_metrics({"train/loss": 1.5, "epoch": 0})
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    line = "epoch 1  train/loss 1.5  val/macro_f1 0.25\n"
    assert console.getvalue() == line, "with the bar on, nothing reaches the console"
    assert log_file.read_text() == line * 2, "the log file has the line either way"
