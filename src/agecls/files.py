"""Files that several processes share: an exclusive advisory lock per file (whoever comes second waits and
then finds the first-time work done), and atomic writes (a reader never sees half a file, and a failed
write leaves the old file and no temporary file behind)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, with its folder, if missing) for the `with` block: flock
    on POSIX, msvcrt's lock on Windows (filelock), so that importing agecls needs no `fcntl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def sqlite_lock_path(url: str) -> Path:
    """The lock file of a `sqlite:///PATH` database: `.NAME.lock` in PATH's folder."""
    db = Path(url[len("sqlite:///") :])
    return db.parent / f".{db.name}.lock"


def _umask() -> int:
    """The process's umask. Read from /proc where there is one: os.umask can only be read by setting it, and
    for that moment every file another thread (a server's worker, MLflow's uploader) creates is world
    writable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the brief window errs towards private, never towards world-writable
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (folders created) to write to; renamed over `path` when the block
    ends without an error, removed when it fails. The file gets the permissions a plain `open` would give
    (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """`data` (text or bytes) into `path` through a synced temporary file renamed over it."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
