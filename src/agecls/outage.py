"""Waiting out an outage of a store a run talks to: the study's database (a PostgreSQL restart) or the MLflow
tracking server. A call that fails because the store is unreachable is tried again with backoff for a
bounded time, with one log line when the wait starts and one when the store is back; any other error
passes at once. Past the bound, StoreUnavailable names the store, what waited and the last error."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agecls.errors import AgeclsError

log = logging.getLogger(__name__)
T = TypeVar("T")

# What PostgreSQL, MySQL and their drivers say when the connection, not the statement, failed.
_DISCONNECT = re.compile(
    "|".join(
        [
            "terminating connection",
            "connection refused",
            "could not connect",
            "server closed the connection",
            "connection (?:is |was |has been )?(?:closed|lost|reset)",
            "connection to server .* failed",
            "the database system is (?:starting up|shutting down|in recovery mode|not yet accepting)",
            "consuming input failed",
            "ssl syscall error",
            "broken pipe",
            "lost connection to (?:mysql )?server",
            "server has gone away",
            "can't connect to",
        ]
    ),
    re.IGNORECASE,
)


class StoreUnavailable(AgeclsError):
    """A store stayed unreachable past its patience; what was written before is kept, so the same command
    run again goes on."""


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or during (Optuna wraps SQLAlchemy's errors)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def database_down(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or dropped the connection (a restart, a
    network cut), rather than that a statement was wrong: only the former is worth waiting out."""
    for error in _chain(exc):
        if getattr(error, "connection_invalidated", False):  # SQLAlchemy saw the connection die
            return True
        kind = type(error)
        if kind.__name__ in ("OperationalError", "InterfaceError") and _DISCONNECT.search(str(error)):
            return True
        if isinstance(error, ConnectionError):
            return True
    return False


def server_down(exc: BaseException) -> bool:
    """Whether `exc` says the MLflow tracking server could not be reached or answered that it is
    unavailable (after MLflow's own retries): connection refused or reset, a timeout, a 5xx answer."""
    for error in _chain(exc):
        name = type(error).__name__
        if isinstance(error, ConnectionError | TimeoutError) or name in (
            "ConnectionError",
            "MaxRetryError",
            "NewConnectionError",
            "ProtocolError",
            "Timeout",
            "ReadTimeout",
            "ConnectTimeout",
            "RetryError",
        ):
            return True
        code = getattr(error, "get_http_status_code", None)
        if callable(code) and int(code()) >= 500:
            return True
        if "Max retries exceeded" in str(error) or "Connection refused" in str(error):
            return True
    return False


class Patience:
    """Calls to one store, each retried while `is_outage` says the store is away, for up to `seconds` per
    outage (backoff from 0.5 s to 10 s). One log line starts the wait, one ends it. Once a wait has run
    out, later calls get one try each (no second wait) until one succeeds: a process that must stop does
    not wait again on its way out. Thread-safe: a heartbeat thread and the main thread share it."""

    def __init__(
        self,
        store: str,
        setting: str,
        seconds: float,
        is_outage: Callable[[BaseException], bool],
        then: str = "run the same command again once it is back",
    ) -> None:
        self.store, self.setting, self.seconds, self.is_outage = store, setting, float(seconds), is_outage
        self.then = then  # what the user can do past the patience (StoreUnavailable's last words)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._gave_up = False

    def call(self, doing: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs), waiting out an outage of the store; `doing` says what waits (log lines)."""
        delay = 0.5
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not self.is_outage(exc):
                    raise
                self._wait(doing, exc, delay)
                delay = min(delay * 2, 10.0)
                continue
            self._back(doing)
            return result

    def _wait(self, doing: str, exc: BaseException, delay: float) -> None:
        now = time.monotonic()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = now
            waited = now - (self._down_since or now)
            gave_up = self._gave_up
        if gave_up or waited >= self.seconds:
            with self._lock:
                self._gave_up = True
            raise StoreUnavailable(
                f"{self.store} unreachable for {waited:.0f} s ({self.setting}={self.seconds:g}) while it "
                f"would {doing}: {_first_line(exc)}; {self.then}"
            ) from exc
        if first:
            log.warning(
                "%s unreachable (%s): waiting up to %g s (%s) to %s",
                self.store,
                _first_line(exc),
                self.seconds,
                self.setting,
                doing,
            )
        time.sleep(min(delay, max(0.1, self.seconds - waited)))

    def _back(self, doing: str) -> None:
        if self._down_since is None and not self._gave_up:
            return
        with self._lock:
            since, self._down_since, self._gave_up = self._down_since, None, False
        if since is not None:
            log.warning("%s back after %.0f s; went on to %s", self.store, time.monotonic() - since, doing)


def _first_line(exc: BaseException) -> str:
    """The first line of the error in the chain that says the connection failed (Optuna's wrapper and
    SQLAlchemy's pool errors say little), else of the outermost one that says anything."""
    chain = [e for e in _chain(exc) if str(e).strip()] or [exc]
    error = next((e for e in chain if _DISCONNECT.search(str(e))), chain[0])
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def redact(url: str) -> str:
    """A store URL without its password (log lines): postgresql://user:***@host/db."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class Deferred:
    """Calls to a store that must not stop the work they record (an MLflow run's metrics): each is made
    patiently; one still failing past the patience is kept, in order, and made before the next call, so
    what was logged while the store was away lands once it is back. `pending` says what still waits."""

    def __init__(self, patience: Patience) -> None:
        self.patience = patience
        self.pending: list[tuple[str, Callable[..., Any], tuple, dict]] = []

    def call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """fn(*args, **kwargs) now, or later when the store is away past its patience."""
        self.pending.append((doing, fn, args, kwargs))
        self.flush()

    def flush(self) -> bool:
        """Make the kept calls in order; False (and a warning the first time) when the store is still away."""
        while self.pending:
            doing, fn, args, kwargs = self.pending[0]
            try:
                self.patience.call(doing, fn, *args, **kwargs)
            except StoreUnavailable as exc:
                if len(self.pending) == 1:
                    log.warning("%s", exc)
                return False
            self.pending.pop(0)
        return True

    def waiting(self) -> str:
        """What is still kept, as `log epoch 3's metrics, log epoch 4's metrics`."""
        return ", ".join(doing for doing, *_ in self.pending)
