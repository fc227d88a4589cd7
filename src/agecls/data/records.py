"""Labels from UTKFace file names, a validated scan of an image folder, and the duplicate-content policy."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from PIL import Image, UnidentifiedImageError

AGE_RANGE = (0, 116)
GENDER_RANGE = (0, 1)
ETHNICITY_RANGE = (0, 4)
LABEL_COLUMNS = ("age", "gender", "ethnicity")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CONFLICT_POLICIES = ("drop", "first", "keep")

# [age]_[gender]_[race]_[datetime] + suffix. The race field is optional (3 real names lack it); a space before
# the suffix and a missing dot (`...357jpg.chip.jpg`) occur in the real set. The datetime needs >= 4 digits so
# that a short name such as `1_0_0.jpg` is not misread as age 1, gender 0, no race, datetime 0.
_NAME_RE = re.compile(
    r"^(?P<age>\d+)_(?P<gender>\d+)(?:_(?P<race>\d{1,3}))?_(?P<stamp>\d{4,})\s*"
    r"(?:\.?jpg\.chip\.jpg|\.chip\.jpg|\.jpe?g|\.png)$",
    re.IGNORECASE,
)


class DataError(ValueError):
    """A data folder or file cannot be used as given."""


class LabelError(DataError):
    """A file name does not carry valid UTKFace labels."""


class ParsedName(NamedTuple):
    age: int | None
    gender: int | None
    ethnicity: int | None


@dataclass(frozen=True)
class ScanResult:
    """Valid records (path, age, gender, ethnicity, sha1) and rejected files (path, reason) of one folder."""

    records: pd.DataFrame
    rejected: pd.DataFrame
    root: Path
    seconds: float = 0.0
    skipped_folders: tuple[str, ...] = ()  # sub-folders left unread (recursive=False)


@dataclass
class DuplicateReport:
    """What `apply_duplicate_policy` found among byte-identical files and what it removed."""

    n_groups: int = 0
    n_files: int = 0
    n_conflicting: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    rows_removed: int = 0
    removed: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} per removed row

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_groups": self.n_groups,
            "n_files": self.n_files,
            "n_conflicting": self.n_conflicting,
            "rows_removed": self.rows_removed,
            "conflicts": self.conflicts,
        }


def _check_range(what: str, value: int, bounds: tuple[int, int]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise LabelError(f"{what} {value} out of range {bounds[0]}..{bounds[1]}")


def parse_utkface_name(name: str) -> ParsedName:
    """Labels from `[age]_[gender]_[race]_[datetime].jpg.chip.jpg`; the race may be missing (None)."""
    match = _NAME_RE.match(Path(name).name)
    if match is None:
        raise LabelError("unparseable name")
    age, gender = int(match["age"]), int(match["gender"])
    race = None if match["race"] is None else int(match["race"])
    _check_range("age", age, AGE_RANGE)
    _check_range("gender", gender, GENDER_RANGE)
    if race is not None:
        _check_range("race", race, ETHNICITY_RANGE)
    return ParsedName(age, gender, race)


@dataclass(frozen=True)
class FolderListing:
    """What a data folder holds: files (relative path, size), entries that cannot be read as files (relative
    path, reason: broken or looping links, unreadable sub-folders) and sub-folders left unscanned."""

    files: list[tuple[str, int]]
    problems: list[tuple[str, str]]
    skipped_folders: list[str]


def _link_problem(path: str) -> str:
    """Why a link (or an entry behind one) cannot be followed."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "looping link: it leads back to itself (too many levels of symbolic links)"
        if exc.errno == errno.ENOENT:
            return f"broken link: its target {os.readlink(path)} does not exist"
        return f"unreadable link: {exc.strerror or exc}"
    return "unreadable link"


def list_folder(root: str | Path, *, recursive: bool = True) -> FolderListing:
    """Non-hidden files under `root` (in its sub-folders too when `recursive`), as posix paths relative to it.

    Linked folders are followed, each real folder once, so a link back to a parent cannot loop; real folders
    are walked before linked ones, so a face keeps its real path when a link leads to it as well.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    files: list[tuple[str, int]] = []
    problems: list[tuple[str, str]] = []
    skipped: list[str] = []
    top = root.stat()
    seen = {(top.st_dev, top.st_ino)}
    real_dirs: list[str] = [""]  # relative folders still to walk, popped from the end
    linked_dirs: list[tuple[str, tuple[int, int]]] = []
    while real_dirs or linked_dirs:
        if real_dirs:
            rel_dir = real_dirs.pop()
        else:
            rel_dir, key = linked_dirs.pop(0)
            if key in seen:
                reason = "linked folder already scanned (a link loop or a second way in)"
                problems.append((rel_dir + "/", reason))
                continue
            seen.add(key)
        try:
            with os.scandir(root / rel_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.append((rel_dir + "/", f"unreadable folder: {exc.strerror or exc}"))
            continue
        sub_real: list[str] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                info = entry.stat()  # follows links
            except OSError as exc:
                reason = _link_problem(entry.path) if entry.is_symlink() else f"unreadable: {exc.strerror}"
                problems.append((rel, reason))
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if not recursive:
                    skipped.append(rel)
                elif entry.is_symlink():
                    linked_dirs.append((rel, key))
                elif key in seen:
                    problems.append((rel + "/", "folder already scanned (mounted twice)"))
                else:
                    seen.add(key)
                    sub_real.append(rel)
            elif stat.S_ISREG(info.st_mode):
                files.append((rel, info.st_size))
            else:
                problems.append((rel, "not a regular file (a device, socket or pipe)"))
        real_dirs.extend(reversed(sub_real))
        linked_dirs.sort()
    return FolderListing(sorted(files), sorted(problems), sorted(skipped))


def folder_fingerprint(root: str | Path, *, recursive: bool = True) -> dict[str, Any]:
    """A cheap fingerprint (paths and sizes, no content) of the files `scan_folder` would read."""
    listing = list_folder(root, recursive=recursive)
    digest = hashlib.sha256()
    total = 0
    for rel, size in listing.files:
        total += size
        digest.update(f"{rel}\t{size}\n".encode())
    for rel, reason in listing.problems:  # a link that is fixed later changes the folder
        digest.update(f"{rel}\t!{reason}\n".encode())
    return {"sha256": digest.hexdigest(), "n_files": len(listing.files), "total_bytes": total}


def hash_files(paths: Sequence[str | Path], *, workers: int = 2) -> list[str]:
    """Hex sha1 of each file's bytes; DataError naming the first file that cannot be read."""

    def one(path: str | Path) -> str:
        try:
            return hashlib.sha1(Path(path).read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, paths, chunksize=64))


def _check_file(path: str, check_images: bool) -> tuple[str | None, str | None]:
    """(sha1, None) for a usable file, (None, reason) otherwise."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if not data:
        return None, "empty file"
    if check_images:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except UnidentifiedImageError:
            return None, "not an image: cannot identify image file"
        except OSError as exc:
            if "truncated" in str(exc):
                return None, "truncated image"
            return None, f"corrupt image: {exc}"
        except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return None, f"corrupt image: {exc}"
    return hashlib.sha1(data).hexdigest(), None


def scan_folder(
    root: str | Path, *, check_images: bool = True, workers: int = 2, recursive: bool = True
) -> ScanResult:
    """Parse labels from every file name under `root`, hash the bytes and (optionally) fully decode images.

    Paths are relative to `root` (`part1/25_0_1_...jpg` in a sub-folder); a broken or looping link is a
    rejected row. With recursive=False the sub-folders are not read and are listed in `skipped_folders`.
    """
    start = time.perf_counter()
    root = Path(root)
    listing = list_folder(root, recursive=recursive)
    rel_paths = [rel for rel, _ in listing.files]
    if not rel_paths and not listing.problems:
        unscanned = (
            f"; its {len(listing.skipped_folders)} sub-folder(s) are not scanned (data.recursive=false)"
            if listing.skipped_folders
            else ""
        )
        raise DataError(
            f"data folder {root} holds no files (expected UTKFace images such as 25_0_1_<date>.jpg)"
            + unscanned
        )

    rejected: list[tuple[str, str]] = list(listing.problems)
    parsed: dict[str, ParsedName] = {}
    for rel in rel_paths:
        suffix = Path(rel).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            rejected.append(
                (rel, f"unsupported suffix '{suffix}' (expected one of {', '.join(IMAGE_SUFFIXES)})")
            )
            continue
        try:
            parsed[rel] = parse_utkface_name(rel)
        except LabelError as exc:
            rejected.append((rel, str(exc)))

    names = list(parsed)
    full = [str(root / rel) for rel in names]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checked = list(pool.map(lambda p: _check_file(p, check_images), full, chunksize=64))

    rows = []
    for rel, (sha1, reason) in zip(names, checked, strict=True):
        if reason is not None:
            rejected.append((rel, reason))
        else:
            rows.append((rel, *parsed[rel], sha1))
    if not rows:
        raise DataError(
            f"data folder {root} holds {len(rel_paths) + len(listing.problems)} files but no valid image "
            f"(first rejection: {rejected[0][0]!r}: {rejected[0][1]})"
        )
    records = records_frame(rows)
    rejected_df = pd.DataFrame(sorted(rejected), columns=["path", "reason"])
    return ScanResult(records, rejected_df, root, time.perf_counter() - start, tuple(listing.skipped_folders))


def records_frame(rows: Iterable[tuple]) -> pd.DataFrame:
    """A records DataFrame (path, age, gender, ethnicity as nullable Int64, sha1) sorted by path."""
    df = pd.DataFrame(list(rows), columns=["path", *LABEL_COLUMNS, "sha1"])
    for col in LABEL_COLUMNS:
        df[col] = df[col].astype("Int64")
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _labels(row: pd.Series) -> list[int | None]:
    return [None if pd.isna(row[c]) else int(row[c]) for c in LABEL_COLUMNS]


def apply_duplicate_policy(
    records: pd.DataFrame, *, dedupe: bool = True, conflicts: str = "drop"
) -> tuple[pd.DataFrame, DuplicateReport]:
    """Resolve byte-identical files (same sha1): keep one copy when labels agree, apply `conflicts` when not.

    conflicts: "drop" removes the whole group, "first" gives every copy the first path's labels (then deduped
    like an agreeing group), "keep" keeps all rows as they are (the split keeps a sha1 group together).
    """
    if conflicts not in CONFLICT_POLICIES:
        raise DataError(
            f"unknown duplicate conflict policy {conflicts!r}; valid: {', '.join(CONFLICT_POLICIES)}"
        )
    missing = {"path", "sha1", *LABEL_COLUMNS} - set(records.columns)
    if missing:
        raise DataError(f"records lack column(s) {sorted(missing)}; have {list(records.columns)}")

    report = DuplicateReport()
    df = records.sort_values("path", kind="stable")
    sizes = df.groupby("sha1", sort=False)["path"].transform("size")
    dup = df[sizes > 1]
    drop_index: list[Any] = []
    relabel: dict[Any, list[int | None]] = {}
    for sha1, group in dup.groupby("sha1", sort=True):
        report.n_groups += 1
        report.n_files += len(group)
        labels = [_labels(row) for _, row in group.iterrows()]
        first_path = group["path"].iloc[0]
        agree = all(lab == labels[0] for lab in labels)
        if not agree:
            report.n_conflicting += 1
            report.conflicts.append({"sha1": sha1, "paths": list(group["path"]), "labels": labels})
            if conflicts == "drop":
                drop_index.extend(group.index)
                report.removed += [
                    {"path": p, "reason": "conflicting labels in identical files"} for p in group["path"]
                ]
                continue
            if conflicts == "keep":
                continue
            relabel.update({i: labels[0] for i in group.index[1:]})
        if dedupe:
            drop_index.extend(group.index[1:])
            report.removed += [
                {"path": p, "reason": f"duplicate of {first_path}"} for p in group["path"].iloc[1:]
            ]

    out = records.drop(index=drop_index)
    for idx, labs in relabel.items():
        if idx in out.index:
            out.loc[idx, list(LABEL_COLUMNS)] = labs
    for col in LABEL_COLUMNS:
        out[col] = out[col].astype("Int64")
    report.rows_removed = len(records) - len(out)
    return out, report
