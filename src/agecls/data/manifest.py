"""The persisted split: manifest.csv (path, labels, sha1, split) + manifest.json (hash, params, report)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from agecls.data.bins import AgeBins
from agecls.data.records import (
    AGE_RANGE,
    ETHNICITY_RANGE,
    GENDER_RANGE,
    DataError,
    apply_duplicate_policy,
    folder_fingerprint,
    hash_files,
    list_folder,
    scan_folder,
)
from agecls.data.split import SPLITS, build_split, check_filled, check_no_leak
from agecls.files import write_atomic

COLUMNS = ("path", "age", "gender", "ethnicity", "sha1", "split")
FORMAT_VERSION = 1


class ManifestError(DataError):
    """A manifest file is missing, malformed or does not match its recorded hash."""


class ManifestChangedError(DataError):
    """The data folder or the split parameters differ from what an existing manifest was made from."""


@dataclass
class Manifest:
    """One persisted split: rows (path relative to root), the folder, CSV hash, CSV path, metadata."""

    df: pd.DataFrame
    root: Path
    hash: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    def subset(self, split: str) -> pd.DataFrame:
        """Rows of one split ('train', 'val' or 'test')."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return self.df[self.df["split"] == split]

    def report(self, bins: AgeBins | None = None) -> str:
        """Counts per split, age bin, gender and ethnicity; rejected files; duplicate groups and conflicts."""
        df = self.df
        lines = [f"manifest {self.path} (sha256 {self.hash[:12]}, root {self.root})", ""]

        def table(title: str, key: pd.Series) -> None:
            tab = pd.crosstab(
                key.rename(title), df["split"], margins=True, margins_name="total", dropna=False
            )
            lines.extend([tab.reindex(columns=[*SPLITS, "total"], fill_value=0).to_string(), ""])

        per_split = ", ".join(f"{s} {int((df['split'] == s).sum())}" for s in SPLITS)
        lines[-1:] = [f"rows: {per_split} (total {len(df)})", ""]
        if bins is not None:
            labels = pd.Categorical.from_codes(bins.index(df["age"]), categories=bins.labels)
            table(f"age bin ({bins.name or bins.n})", pd.Series(labels, index=df.index))
        for col in ("gender", "ethnicity"):
            table(col, df[col].astype("string").fillna("missing"))
        scan = self.info.get("scan")
        if scan:
            lines.append(
                f"scanned {scan['n_files']} files: {scan['n_valid']} valid, {scan['n_rejected']} rejected"
            )
            lines += [f"  {n:6d}  {reason}" for reason, n in scan.get("rejected_by_reason", {}).items()]
            lines += [f"    {r['path']}: {r['reason']}" for r in scan.get("rejected", [])[:20]]
            skipped = scan.get("skipped_folders", [])
            if skipped:
                shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
                lines.append(
                    f"skipped {scan['n_skipped_folders']} sub-folder(s), not scanned (data.recursive=false): "
                    + shown
                )
        dup = self.info.get("duplicates")
        if dup:
            lines.append(
                f"duplicates: {dup['n_groups']} groups of identical files ({dup['n_files']} files), "
                f"{dup['n_conflicting']} with conflicting labels; {dup['rows_removed']} rows removed "
                f"(policy {self.info.get('policy')})"
            )
            for c in dup.get("conflicts", [])[:10]:
                lines.append(
                    "  conflict: "
                    + "; ".join(f"{p} {lab}" for p, lab in zip(c["paths"], c["labels"], strict=True))
                )
            if len(dup.get("conflicts", [])) > 10:
                lines.append(f"  ... and {len(dup['conflicts']) - 10} more conflicting groups")
        return "\n".join(lines).rstrip() + "\n"


def csv_bytes(df: pd.DataFrame) -> bytes:
    """The canonical CSV bytes of a manifest table (fixed columns, sorted by path, '\\n' line ends)."""
    out = df.loc[:, list(COLUMNS)].sort_values("path", kind="stable")
    return out.to_csv(index=False, lineterminator="\n").encode("utf-8")


def _bad_rows(file: Path, col: str, bad: pd.Series, values: pd.Series, valid: str) -> ManifestError:
    rows = [f"line {i + 2}: {values[i]!r}" for i in bad[bad].index[:5]]
    more = f" and {int(bad.sum()) - 5} more" if bad.sum() > 5 else ""
    return ManifestError(
        f"{file}: column {col!r} has invalid value(s) ({'; '.join(rows)}{more}); valid: {valid}"
    )


def normalise_table(table: pd.DataFrame, file: Path) -> pd.DataFrame:
    """Validate a manifest table read as strings; return COLUMNS with Int64 labels, sorted by path."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(f"{file}: missing column(s) {missing}; a manifest needs {list(COLUMNS)}")
    table = table.reset_index(drop=True)
    out = pd.DataFrame({"path": table["path"].astype(str).str.strip()})
    if (out["path"] == "").any():
        raise _bad_rows(file, "path", out["path"] == "", out["path"], "a file path")
    dup = out["path"].duplicated(keep=False)
    if dup.any():
        raise _bad_rows(file, "path", dup, out["path"], "each path once")
    for col, (lo, hi) in (("age", AGE_RANGE), ("gender", GENDER_RANGE), ("ethnicity", ETHNICITY_RANGE)):
        text = table[col].astype(str).str.strip()
        num = pd.to_numeric(text, errors="coerce")
        ok = num.notna() & (num == num.round()) & num.between(lo, hi)
        if col == "ethnicity":
            ok |= text == ""
        if not ok.all():
            blank = " or empty" if col == "ethnicity" else ""
            raise _bad_rows(file, col, ~ok, text, f"whole numbers {lo}..{hi}{blank}")
        out[col] = num.astype("Int64")
    sha1 = table["sha1"].astype(str).str.strip().str.lower()
    bad = ~sha1.str.fullmatch(r"[0-9a-f]{40}")
    if bad.any():
        raise _bad_rows(file, "sha1", bad, table["sha1"], "40 hex digits (sha1 of the file)")
    out["sha1"] = sha1
    split = table["split"].astype(str).str.strip()
    bad = ~split.isin(SPLITS)
    if bad.any():
        raise _bad_rows(file, "split", bad, table["split"], ", ".join(SPLITS))
    out["split"] = split
    return out.sort_values("path", kind="stable").reset_index(drop=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _params(ratios, stratify, seed, dedupe, conflicts) -> tuple[dict, dict]:
    split = {
        "ratios": [float(r) for r in ratios],
        "stratify": [stratify] if isinstance(stratify, str) else [str(s) for s in stratify],
        "seed": int(seed),
        "group_col": "sha1",
    }
    return split, {"dedupe": bool(dedupe), "conflicts": str(conflicts)}


def _recorded_names(out_dir: Path) -> set[str]:
    names: set[str] = set()
    for name in ("manifest.csv", "rejected.csv"):
        file = out_dir / name
        if file.exists():
            names |= set(pd.read_csv(file, usecols=["path"], dtype=str, keep_default_na=False)["path"])
    return names


def _check_existing(out_dir: Path, root: Path, split: dict, policy: dict, recursive: bool) -> dict[str, Any]:
    """Recorded info of out_dir's manifest when root and params match; ManifestChangedError otherwise."""
    info = json.loads((out_dir / "manifest.json").read_text())
    override = "pass force=True (data.split.force=true) to rewrite it, or use another manifest folder"
    wanted = {"split": split, "policy": policy}
    recorded = {"split": info.get("split"), "policy": info.get("policy")}
    if wanted != recorded:
        raise ManifestChangedError(
            f"the manifest in {out_dir} was made with {recorded}, now asked for {wanted}; {override}"
        )
    current = folder_fingerprint(root, recursive=recursive)
    if current["sha256"] != info.get("fingerprint", {}).get("sha256"):
        listing = list_folder(root, recursive=recursive)
        now = {rel for rel, _ in listing.files} | {rel for rel, _ in listing.problems}
        before = _recorded_names(out_dir)
        added, removed = sorted(now - before), sorted(before - now)
        detail = f"{len(added)} file(s) added, {len(removed)} removed"
        if added:
            detail += f" (added e.g. {added[:3]})"
        if removed:
            detail += f" (removed e.g. {removed[:3]})"
        if not added and not removed:
            detail = "same file names but some file sizes changed"
        was = bool(info.get("scan", {}).get("recursive", False))  # manifests before sub-folders: flat
        if was != recursive:
            detail += f"; data.recursive was {str(was).lower()}, now {str(recursive).lower()}"
        raise ManifestChangedError(
            f"data folder {root} changed since the manifest in {out_dir} was written "
            f"({info.get('fingerprint', {}).get('n_files')} files then, {current['n_files']} now: {detail}); "
            + override
        )
    return info


def _counts(df: pd.DataFrame) -> dict[str, Any]:
    def tally(col: str) -> dict[str, int]:
        return {
            str(k): int(v)
            for k, v in df[col].astype("string").fillna("missing").value_counts().sort_index().items()
        }

    return {
        "total": len(df),
        "split": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "gender": tally("gender"),
        "ethnicity": tally("ethnicity"),
    }


def prepare_manifest(
    root: str | Path,
    out_dir: str | Path,
    *,
    ratios: Sequence[float] = (0.6, 0.2, 0.2),
    stratify: Sequence[str] = ("age5",),
    seed: int = 42,
    dedupe: bool = True,
    conflicts: str = "drop",
    check_images: bool = True,
    force: bool = False,
    workers: int = 2,
    recursive: bool = True,
) -> Manifest:
    """Scan root, resolve duplicates, split, check for leaks and write manifest.csv/json + rejected.csv once.

    Paths are relative to root (sub-folders too unless recursive=False). EmptySplitError (a usage error) when
    too few faces leave train, val or test empty. An existing manifest in out_dir is reused when the folder's
    file paths, sizes and the parameters are the same; otherwise ManifestChangedError, unless force=True.
    """
    root, out_dir = Path(root).resolve(), Path(out_dir)
    split_params, policy = _params(ratios, stratify, seed, dedupe, conflicts)
    if not force and (out_dir / "manifest.json").exists() and (out_dir / "manifest.csv").exists():
        _check_existing(out_dir, root, split_params, policy, recursive)
        manifest = load_manifest(out_dir, root=root)
        return manifest

    fingerprint = folder_fingerprint(root, recursive=recursive)
    scan = scan_folder(root, check_images=check_images, workers=workers, recursive=recursive)
    records, dup_report = apply_duplicate_policy(scan.records, dedupe=dedupe, conflicts=conflicts)
    records = records.copy()
    split = build_split(records, ratios=ratios, stratify=stratify, seed=seed, group_col="sha1")
    where = f"data.root={root}"
    check_filled(records, split, ratios=ratios, stratify=stratify, group_col="sha1", where=where)
    records["split"] = split
    check_no_leak(records)

    data = csv_bytes(records)
    rejected = pd.concat(
        [
            scan.rejected.assign(stage="scan"),
            pd.DataFrame(dup_report.removed, columns=["path", "reason"]).assign(stage="duplicates"),
        ],
        ignore_index=True,
    ).sort_values("path", kind="stable")
    by_reason = scan.rejected["reason"].value_counts().sort_index()
    info = {
        "format": FORMAT_VERSION,
        "hash": _sha256(data),
        "root": str(root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": _counts(records),
        "split": split_params,
        "policy": policy,
        "scan": {
            "n_files": int(len(scan.records) + len(scan.rejected)),
            "n_valid": int(len(scan.records)),
            "n_rejected": int(len(scan.rejected)),
            "check_images": bool(check_images),
            "recursive": bool(recursive),
            "n_skipped_folders": len(scan.skipped_folders),
            "skipped_folders": list(scan.skipped_folders[:100]),
            "seconds": round(scan.seconds, 2),
            "rejected_by_reason": {str(k): int(v) for k, v in by_reason.items()},
            "rejected": scan.rejected.head(100).to_dict(orient="records"),
        },
        "duplicates": dup_report.to_dict(),
        "fingerprint": fingerprint,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "rejected.csv", rejected.to_csv(index=False, lineterminator="\n").encode())
    write_atomic(out_dir / "manifest.csv", data)
    write_atomic(out_dir / "manifest.json", (json.dumps(info, indent=1) + "\n").encode())
    df = normalise_table(
        pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False), out_dir / "manifest.csv"
    )
    return Manifest(df=df, root=root, hash=info["hash"], path=out_dir / "manifest.csv", info=info)


def _external_paths(paths: pd.Series, root: Path | None, csv_path: Path) -> tuple[pd.Series, Path]:
    """Paths relative to a root: the given one, else the common folder of absolute paths, else the CSV's."""
    paths = paths.str.replace("\\", "/", regex=False)
    absolute = paths.map(lambda p: Path(p).is_absolute())
    if root is None:
        if absolute.any():
            root = Path(os.path.commonpath([str(Path(p).parent) for p in paths[absolute]]))
        else:
            root = csv_path.parent
    root = Path(root).resolve()

    def rel(p: str) -> str:
        if not Path(p).is_absolute():
            return Path(p).as_posix()
        try:
            return Path(p).resolve().relative_to(root).as_posix()
        except ValueError:
            raise ManifestError(f"{csv_path}: path {p} is not under the root folder {root}") from None

    return paths.map(rel), root


def load_manifest(path: str | Path, *, root: str | Path | None = None, allow_leaks: bool = False) -> Manifest:
    """Read and validate a manifest (CSV or its folder); a CSV without a sidecar JSON is imported as external.

    External CSV: columns path, age, gender, ethnicity, split (sha1 optional: computed from the files).
    """
    csv_path = Path(path)
    if csv_path.is_dir():
        csv_path = csv_path / "manifest.csv"
    if not csv_path.is_file():
        raise ManifestError(
            f"manifest {csv_path} not found (give a manifest CSV or the folder holding manifest.csv)"
        )
    raw = csv_path.read_bytes()
    try:
        table = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{csv_path}: not a readable CSV ({exc})") from None
    sidecar = csv_path.with_suffix(".json")

    if sidecar.is_file():
        info = json.loads(sidecar.read_text())
        digest = _sha256(raw)
        if digest != info.get("hash"):
            raise ManifestError(
                f"{csv_path} does not match the hash recorded in {sidecar} ({digest[:12]} != "
                f"{str(info.get('hash'))[:12]}): the CSV was edited after it was written; rewrite it with "
                f"force=True (data.split.force=true), or delete {sidecar.name} to import it as external"
            )
        df = normalise_table(table, csv_path)
        check_no_leak(df)
        base = Path(root).resolve() if root is not None else Path(info["root"])
        return Manifest(df=df, root=base, hash=digest, path=csv_path, info=info)

    if "path" in table.columns:
        table["path"], base = _external_paths(table["path"], None if root is None else Path(root), csv_path)
    else:
        base = Path(root).resolve() if root is not None else csv_path.parent.resolve()
    if "sha1" not in table.columns and "path" in table.columns:
        try:
            table["sha1"] = hash_files([base / p for p in table["path"]])
        except DataError as exc:
            raise ManifestError(f"{csv_path} has no sha1 column and {exc} (is root={base} right?)") from None
    df = normalise_table(table, csv_path)
    if not allow_leaks:
        try:
            check_no_leak(df)
        except DataError as exc:
            raise type(exc)(
                f"{csv_path}: {exc}\n(load with allow_leaks=True to use this split anyway)"
            ) from None
    data = csv_bytes(df)
    info = {
        "source": "external",
        "csv": str(csv_path),
        "root": str(base),
        "hash": _sha256(data),
        "counts": _counts(df),
    }
    return Manifest(df=df, root=base, hash=info["hash"], path=csv_path, info=info)
