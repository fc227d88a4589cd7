"""One exclusive advisory lock per file, for processes that must not do the same first-time work at once
(data preparation, creating a study database); whoever comes second waits and then finds it done."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created, with its folder, if missing) for the `with` block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_lock_path(url: str) -> Path:
    """The lock file of a `sqlite:///PATH` database: `.NAME.lock` in PATH's folder."""
    db = Path(url[len("sqlite:///") :])
    return db.parent / f".{db.name}.lock"
