"""`agecls-data`: prepare or show the dataset manifest (the persisted split) a training run would use.

    agecls-data prepare [OVERRIDES]                 scan, split and persist (or reuse); print the report
    agecls-data show [OVERRIDES | --manifest PATH]  print the report of an existing manifest, no rescan

OVERRIDES are `agecls-train`'s Hydra overrides (`data=utkface data.root=/path`, `bins=four`, ...): the
command's config (conf/data.yaml) is the train config plus `command` and `manifest`, so it prepares exactly
the split a run with those overrides uses.
Exit codes: 0 done, 1 a data problem (or no manifest yet), 2 bad arguments or overrides, or a folder with too
few faces to fill train, val and test.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agecls.cli.app import App, run
from agecls.errors import UsageError

if TYPE_CHECKING:  # agecls.data imports pandas: only when a command runs, so that --help stays quick
    from agecls.data.bins import AgeBins
    from agecls.data.manifest import Manifest

OWN_KEYS = ("command", "manifest")
APP = App(
    prog="agecls-data",
    config="data",
    summary="prepare or inspect the dataset split (manifest) that agecls-train uses.",
    usage="agecls-data {prepare,show} [OVERRIDE ...] [--manifest PATH]",
    description="""\
The report: counts per age bin, gender and ethnicity per split, rejected files and why, duplicate groups and
label conflicts. prepare generates the synthetic faces when data=synthetic, scans data.root (and its
sub-folders unless data.recursive=false), resolves duplicates, splits and writes the manifest (reused when
the folder and split parameters are unchanged; data.split.force=true rewrites it); with data.path set
(data=manifest) the external split is read and reported as it is. show reads an existing manifest without
scanning the images, and names the command that creates it when there is none yet. Everything goes under
paths.output_dir (AGECLS_OUTPUT_DIR moves it).""",
    examples=(
        "agecls-data prepare                                   # the default synthetic faces",
        "agecls-data prepare data=utkface data.root=/data/UTKFace bins=four",
        "agecls-data show data=utkface data.root=/data/UTKFace",
        "agecls-data show --manifest outputs/data/manifests/utkface-1a2b3c4d",
    ),
    exit_codes="0 done, 1 data problem or no manifest yet, 2 bad arguments or overrides, or too few faces",
    positional=("command",),
    options={"--manifest": "manifest"},
    text_keys=OWN_KEYS,
    train_overrides=True,
    note="Every other key and group is agecls-train's (agecls-train --help lists the groups).",
)
PROG = APP.prog


def _bins(cfg: DictConfig) -> AgeBins:
    from agecls.data.bins import AgeBins

    try:
        return AgeBins.from_config(cfg.bins)
    except (ValueError, OmegaConfBaseException) as exc:
        raise UsageError(f"bins: {exc}") from None


def check_data_keys(cfg: DictConfig) -> None:
    """UsageError naming the override a data group still needs (data.path, data.root)."""
    from agecls.data.prepare import declares, is_set

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
    from agecls.data.prepare import data_lock, data_root, is_set, manifest_dir, resolve_manifest

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
    from agecls.data.manifest import load_manifest
    from agecls.data.prepare import data_root, import_manifest, is_set, manifest_dir
    from agecls.data.records import DataError

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


def _data(cfg: DictConfig, overrides: list[str]) -> int:
    train_overrides = [o for o in overrides if o.split("=", 1)[0] not in OWN_KEYS]
    if OmegaConf.is_missing(cfg, "command"):
        raise UsageError("command=... is required: prepare or show (agecls-data prepare ...)")
    if cfg.command not in ("prepare", "show"):
        raise UsageError(f"command={cfg.command!r}: valid: prepare or show")
    manifest_path = None if cfg.manifest is None else Path(str(cfg.manifest))
    if manifest_path is not None and cfg.command != "show":
        raise UsageError(
            "manifest=PATH (--manifest) is for show; prepare writes the manifest its data keys name"
        )
    bins = _bins(cfg)
    if cfg.command == "prepare":
        check_data_keys(cfg)
        manifest, where = prepare(cfg)
    else:
        if manifest_path is None:
            check_data_keys(cfg)
        manifest, where = show(cfg, manifest_path, train_overrides)
    print(manifest.report(bins), end="")
    print(where)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _data)


if __name__ == "__main__":
    sys.exit(main())
