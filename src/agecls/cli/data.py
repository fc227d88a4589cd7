"""`agecls-data`: prepare or show the dataset manifest (the persisted split) a training run would use.

    agecls-data prepare [OVERRIDES]                 scan, split and persist (or reuse); print the report
    agecls-data show [OVERRIDES | --manifest PATH]  print the report of an existing manifest, no rescan

OVERRIDES are `agecls-train`'s Hydra overrides (`data=utkface data.root=/path`, `bins=four`, ...): the
command composes the same train config, so it prepares exactly the split a run with those overrides uses.
Exit codes: 0 done, 1 a data problem (or no manifest yet), 2 bad arguments or overrides.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from agecls.config import compose_train
from agecls.data.bins import AgeBins
from agecls.data.manifest import Manifest, load_manifest
from agecls.data.prepare import (
    data_lock,
    data_root,
    declares,
    import_manifest,
    is_set,
    manifest_dir,
    resolve_manifest,
)
from agecls.data.records import DataError
from agecls.errors import UsageError

PROG = "agecls-data"


def _bins(cfg: DictConfig) -> AgeBins:
    try:
        return AgeBins.from_config(cfg.bins)
    except (ValueError, OmegaConfBaseException) as exc:
        raise UsageError(f"bins: {exc}") from None


def check_data_keys(cfg: DictConfig) -> None:
    """UsageError naming the override a data group still needs (data.path, data.root)."""
    data = cfg.data
    if declares(data, "path") and not is_set(data, "path"):
        raise UsageError(
            f"data={data.name} needs data.path=FILE.csv (columns path, age, gender, ethnicity, split)"
        )
    if is_set(data, "path"):
        return
    try:
        root_set = is_set(data, "root")
    except OmegaConfBaseException:  # data=utkface: `root: ???` leaves synthetic's interpolation unresolvable
        root_set = False
    if not root_set:
        raise UsageError(f"data={data.name} needs data.root=/path/to/images")


def prepare(cfg: DictConfig) -> tuple[Manifest, str]:
    """Prepare (or reuse) the split of the composed config's data; returns it and a line saying where."""
    data, paths = cfg.data, cfg.paths
    if is_set(data, "path"):
        with data_lock(paths.data_dir):
            manifest = resolve_manifest(data, paths)
        return (
            manifest,
            f"external split read from {manifest.path} (data.path; used as given, nothing written)",
        )
    out_dir = manifest_dir(data, data_root(data), paths.data_dir)
    existed = (out_dir / "manifest.json").is_file() and not bool(data.split.force)
    if not existed:
        print(f"{PROG}: scanning {data.root} and writing the split to {out_dir} ...", file=sys.stderr)
    with data_lock(paths.data_dir):
        manifest = resolve_manifest(data, paths)
    verb = "reused (folder and split parameters unchanged)" if existed else "written"
    return manifest, f"manifest {verb}: {out_dir} (manifest.csv, manifest.json, rejected.csv)"


def show(cfg: DictConfig, manifest_path: Path | None, overrides: Sequence[str] = ()) -> tuple[Manifest, str]:
    """Read an existing manifest (given, or the one the composed config's data would use) without scanning."""
    if manifest_path is not None:
        # An explicit data.root=DIR says where an external CSV's relative paths start.
        root = cfg.data.root if any(o.startswith("data.root=") for o in overrides) else None
        manifest = load_manifest(manifest_path, root=root)
        return manifest, f"manifest read from {manifest.path}"
    data = cfg.data
    if is_set(data, "path"):
        manifest = import_manifest(data)
        return manifest, f"external split read from {manifest.path} (data.path)"
    out_dir = manifest_dir(data, data_root(data), cfg.paths.data_dir)
    if not (out_dir / "manifest.csv").is_file():
        args = "".join(f" {o}" for o in overrides)
        raise DataError(
            f"no manifest for data.root={data.root} yet (looked in {out_dir}); create it with "
            f"`{PROG} prepare{args}` (or any agecls-train run with the same data settings)"
        )
    manifest = load_manifest(out_dir)
    return manifest, f"manifest read from {out_dir} (not rescanned; `{PROG} prepare` checks the folder)"


def build_parser() -> argparse.ArgumentParser:
    overrides_help = (
        "agecls-train's Hydra overrides, e.g. data=utkface data.root=/path/to/UTKFace bins=four "
        "(data=manifest data.path=split.csv for an external split)"
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Prepare or inspect the dataset split (manifest) that agecls-train uses: counts per age bin, "
            "gender and ethnicity per split, rejected files and why, duplicate groups and label conflicts."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} prepare                                   # the default synthetic faces\n"
            f"  {PROG} prepare data=utkface data.root=/data/UTKFace bins=four\n"
            f"  {PROG} show data=utkface data.root=/data/UTKFace\n"
            f"  {PROG} show --manifest outputs/data/manifests/utkface-1a2b3c4d\n"
            "Everything goes under paths.output_dir (AGECLS_OUTPUT_DIR moves it).\n"
            "exit codes: 0 done, 1 data problem or no manifest yet, 2 bad arguments or overrides"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,show}")
    prep = sub.add_parser(
        "prepare",
        help="scan, split and persist the data (or reuse an unchanged manifest); print the report",
        description=(
            "Generate the synthetic faces when data=synthetic, scan data.root, resolve duplicates, split and "
            "write the manifest (reused when the folder and split parameters are unchanged; "
            "data.split.force=true rewrites it), then print its report. With data.path set (data=manifest) "
            "the external split is read and reported as it is."
        ),
    )
    prep.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=overrides_help)
    sh = sub.add_parser(
        "show",
        help="print the report of an existing manifest without rescanning",
        description=(
            "Print the report of the manifest the overrides' data settings use (or --manifest PATH: a "
            "manifest folder or CSV), without scanning the images. Fails, naming the command that creates "
            "it, when there is none yet."
        ),
    )
    sh.add_argument(
        "--manifest",
        type=Path,
        metavar="PATH",
        help="a manifest folder or CSV (an external CSV's relative paths start at data.root=DIR when given)",
    )
    sh.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=overrides_help + "; bins=... too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = compose_train(args.overrides)
        bins = _bins(cfg)
        if args.command == "prepare":
            check_data_keys(cfg)
            manifest, where = prepare(cfg)
        else:
            if args.manifest is None:
                check_data_keys(cfg)
            manifest, where = show(cfg, args.manifest, args.overrides)
        report = manifest.report(bins)
    except (UsageError, OmegaConfBaseException) as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (DataError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(report, end="")
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
