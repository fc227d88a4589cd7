"""The errors a user can act on. Library code raises them (or its own subclasses) with a message naming the
file, key or value and what would be valid; only `agecls.cli` turns them into messages and exit codes."""

from __future__ import annotations


class AgeclsError(Exception):
    """A problem with the user's input or data that a message can explain (exit code 1)."""

    exit_code = 1


class UsageError(AgeclsError):
    """Bad, unknown or missing arguments or config values (exit code 2)."""

    exit_code = 2
