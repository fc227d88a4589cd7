"""The errors a user can act on. Library code raises them (or its own subclasses) with a message naming the
file, key or value and what would be valid; only `agecls.cli` turns them into messages and exit codes."""

from __future__ import annotations


class AgeclsError(Exception):
    """A problem with the user's input or data that a message can explain (exit code 1)."""

    exit_code = 1


class UsageError(AgeclsError):
    """Bad, unknown or missing arguments or config values (exit code 2)."""

    exit_code = 2


class CarriedError(BaseException):
    """An AgeclsError carried past a framework that reports every Exception its own way (Hydra's
    run_and_report: a traceback and exit code 1) to agecls.cli, which reports `error` as one line."""

    def __init__(self, error: AgeclsError) -> None:
        super().__init__(str(error))
        self.error = error
