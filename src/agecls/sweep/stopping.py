"""Stopping the processes or jobs a sweep started (trials, and the follow-up runs after them)."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from typing import Any


def stop_trials(handles: Sequence[Any], graces: tuple[float, float, float] = (10, 20, 30)) -> None:
    """Stop running trials or jobs (handles with done/signal/wait): Ctrl-C first (the run is marked KILLED),
    then SIGTERM (a process started with SIGINT ignored, e.g. from a non-interactive shell's background job),
    then SIGKILL, each round waiting its grace period for them to end. A submitit job is cancelled in the
    first round."""
    for sig, grace in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), graces, strict=True):
        alive = [handle for handle in handles if not handle.done()]
        for handle in alive:
            handle.signal(sig)
        deadline = time.monotonic() + grace
        for handle in alive:
            handle.wait(deadline - time.monotonic())
