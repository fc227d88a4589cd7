"""Proposing age bins from a fine-bin run (e.g. bins=pairs): the run's validation confusion matrix grouped
into k contiguous bins by `bin_discovery`, written as a bins config with its plots (`agecls-bins propose`)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from agecls.errors import UsageError
from agecls.evaluation.bin_discovery import (
    Constraints,
    Discovery,
    DiscoveryError,
    Grouping,
    discover,
    parse_fine_ranges,
    score_ranges,
)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_SPLIT_WORDS = {"val": "validation", "train": "training"}
NOT_COMPARABLE = (
    "Expected macro-F1 is not comparable across different bin sets: fewer, wider bins score higher by "
    "construction. Use the table to see what each extra bin costs; choose k for what the bins are for."
)


def options(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as propose's options: plain values, required keys left out when unset."""
    if cfg.command != "propose":
        raise UsageError(f"command={cfg.command!r}: the only command is 'propose'")
    return {k: v for k, v in OmegaConf.to_container(cfg).items() if v != "???" and k != "command"}


def _int(opts: dict[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = opts.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{key}={value!r} must be a whole number")
    if value < minimum:
        raise UsageError(f"{key}={value} must be at least {minimum}")
    return value


def _edges(opts: dict[str, Any]) -> tuple[int, ...]:
    value = opts.get("fixed_edges")
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UsageError(f"fixed_edges={value!r} must be an age or a list of ages, e.g. fixed_edges=[18,65]")
    return tuple(sorted(set(values)))


# --- where the run's results come from -------------------------------------------------------------


def load_results(run: str, tracking_uri: str | None = None) -> tuple[dict[str, Any], str]:
    """results.json of a run given as a results.json path, a run folder or an MLflow run id."""
    path = Path(run).expanduser()
    if path.is_dir():
        path = path / "results.json"
        if not path.is_file():
            raise UsageError(f"run={run}: folder has no results.json (did the run finish?)")
    if path.is_file():
        try:
            return json.loads(path.read_text()), str(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"run={run}: not a JSON results file ({exc})") from None
    if not re.fullmatch(r"[0-9a-fA-F]{8,64}", run):
        raise UsageError(f"run={run}: no such file or folder, and not an MLflow run id")
    return _from_mlflow(run, tracking_uri)


def _from_mlflow(run_id: str, tracking_uri: str | None) -> tuple[dict[str, Any], str]:
    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow.exceptions import MlflowException

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    if tracking_uri is None:
        from agecls.tracking import default_tracking

        tracking_uri = default_tracking()[0]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        info = client.get_run(run_id)
    except MlflowException:
        raise UsageError(
            f"run={run_id}: no such file or folder, and no MLflow run with that id in {tracking_uri}"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path="evaluation/results.json",
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            return json.loads(Path(local).read_text()), f"MLflow run {run_id}"
        except (MlflowException, OSError):
            pass
    run_dir = info.data.tags.get("run_dir")
    if run_dir and (Path(run_dir) / "results.json").is_file():
        return json.loads((Path(run_dir) / "results.json").read_text()), f"MLflow run {run_id}"
    raise UsageError(
        f"run={run_id}: MLflow run has no evaluation/results.json artifact (status {info.info.status}; "
        "did it finish?)"
    )


# --- outputs ---------------------------------------------------------------------------------------


def bins_yaml(grouping: Grouping, name: str, header: list[str], fine: list[tuple[int, int]]) -> str:
    lines = [f"# {h}" for h in header]
    lines.append("# Inclusive age ranges; they must be contiguous and cover 0..116.")
    lines.append(f"name: {name}")
    if fine[0][0] != 0 or fine[-1][1] != 116:
        lines += [f"min_age: {fine[0][0]}", f"max_age: {fine[-1][1]}"]
    lines.append("ranges:")
    lines += [f"  - [{lo}, {hi}]" for lo, hi in grouping.ranges]
    return "\n".join(lines) + "\n"


def plot_blocks(
    confusion: np.ndarray, fine_labels: list[str], grouping: Grouping, path: Path, title: str
) -> Path:
    """Row-normalised fine confusion matrix with each proposed bin outlined and its expected F1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from agecls.metrics import row_normalised, save_figure

    norm = row_normalised(confusion)
    n = len(fine_labels)
    size = max(5.0, 0.32 * n + 3)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=max(float(norm.max()), 1e-9))
    ax.set_xticks(range(n), fine_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), fine_labels, fontsize=7)
    ax.set_xlabel("predicted (fine)")
    ax.set_ylabel("true (fine)")
    for (i, j), f1, label in zip(grouping.segments, grouping.f1, grouping.labels, strict=True):
        ax.add_patch(
            Rectangle((i - 0.5, i - 0.5), j - i + 1, j - i + 1, fill=False, edgecolor="crimson", linewidth=2)
        )
        ax.text(
            n - 0.3,
            (i + j) / 2,
            f" {label}: F1 {f1:.2f}",
            va="center",
            ha="left",
            fontsize=8,
            color="crimson",
        )
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.25, label="share of true class")
    return save_figure(fig, path)


def plot_tradeoff(discovery: Discovery, chosen_k: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(k, f) for k, f in discovery.tradeoff() if k >= 2 and np.isfinite(f)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if points:
        ks, f1s = zip(*points, strict=True)
        ax.plot(ks, f1s, marker="o", markersize=3)
    chosen = discovery.by_k[chosen_k]
    ax.scatter([chosen_k], [chosen.macro_f1], color="crimson", zorder=3, label=f"k={chosen_k}")
    ax.set_xlabel("number of bins k")
    ax.set_ylabel("best expected macro-F1")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(
        0.01,
        0.01,
        "Not comparable across bin sets: fewer, wider bins score higher by construction.",
        fontsize=7,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _compare_ranges(value: Any) -> tuple[str, list[tuple[int, int]]]:
    """compare=<bins name in conf/bins | YAML file | [[lo, hi], ...]> -> (label, ranges)."""
    from agecls.config import CONFIG_DIR
    from agecls.data.bins import AgeBins, BinsError

    try:
        if isinstance(value, list):
            return "given bins", list(AgeBins(value).ranges)
        path = Path(str(value))
        if not path.is_file():
            path = CONFIG_DIR / "bins" / f"{value}.yaml"
        if not path.is_file():
            raise UsageError(f"compare={value!r}: not a bins name in {CONFIG_DIR / 'bins'} nor a YAML file")
        bins = AgeBins.from_config(yaml.safe_load(path.read_text()))
        return str(bins.name or value), list(bins.ranges)
    except BinsError as exc:
        raise UsageError(f"compare={value!r}: {exc}") from None


def _table(grouping: Grouping) -> str:
    lines = [f"  {'bin':>9}  {'fine classes':>12}  {'true n':>7}  {'expected F1':>11}"]
    for (i, j), label, n, f1 in zip(
        grouping.segments, grouping.labels, grouping.support, grouping.f1, strict=True
    ):
        lines.append(f"  {label:>9}  {j - i + 1:>12}  {n:>7}  {f1:>11.3f}")
    lines.append(f"  {'macro':>9}  {'':>12}  {sum(grouping.support):>7}  {grouping.macro_f1:>11.3f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Request:
    """propose's options, checked: where the run is, what to group it into, and what to write."""

    run: str
    k: int
    constraints: Constraints
    split: str
    name: str
    install: bool
    compare: Any = None
    out: str | None = None
    tracking_uri: str | None = None


@dataclass(frozen=True)
class Found:
    """What the run's confusion matrix gave: the chosen grouping for every k, and the compared bins."""

    results: dict[str, Any]
    source: str
    class_names: list[str]
    fine: list[tuple[int, int]]
    confusion: np.ndarray
    discovery: Discovery
    compared: Grouping | None
    compare_label: str


@dataclass(frozen=True)
class Written:
    """The files propose wrote, and the best grouping of every k (the trade-off table's rows)."""

    yaml: Path
    confusion_png: Path
    tradeoff_png: Path
    tradeoff_csv: Path
    rows: list[dict[str, Any]]


def check_request(opts: dict[str, Any]) -> Request:
    """propose's options as a Request; UsageError naming the first bad one."""
    if "run" not in opts:
        raise UsageError("run=<MLflow run id | run folder | results.json> is required")
    if "k" not in opts:
        raise UsageError("k=<number of bins> is required")
    k = _int(opts, "k", None, 2)
    min_count = _int(opts, "min_count", 1, 0)
    max_width = _int(opts, "max_width", None, 1)
    constraints = Constraints(min_count=min_count, max_width=max_width, fixed_edges=_edges(opts))
    split = str(opts.get("split", "val"))
    if split == "test":
        raise UsageError("split=test: bins are selected on val (default) or train, never on the test split")
    if split not in ("val", "train"):
        raise UsageError(f"split={split!r}: choose val (default) or train")
    name = str(opts.get("name") or f"proposed_k{k}")
    if not _NAME.match(name):
        raise UsageError(f"name={name!r}: use letters, digits, '_' and '-' (it becomes bins=<name>)")
    install = opts.get("install", False)
    if not isinstance(install, bool):
        raise UsageError(f"install={install!r} must be true or false")
    return Request(
        str(opts["run"]),
        k,
        constraints,
        split,
        name,
        install,
        compare=opts.get("compare"),
        out=opts.get("out"),
        tracking_uri=opts.get("tracking_uri"),
    )


def find_bins(req: Request) -> Found:
    """The run's fine classes and confusion matrix, grouped by `discover`; the `compare` bins scored."""
    results, source = load_results(req.run, req.tracking_uri)
    if "class_names" not in results or f"confusion_{req.split}" not in results:
        raise UsageError(f"run={req.run}: {source} has no class_names / confusion_{req.split}")
    class_names = [str(c) for c in results["class_names"]]
    try:
        fine = parse_fine_ranges(class_names)
    except DiscoveryError as exc:
        raise UsageError(f"run={req.run}: {exc}") from None
    n = len(fine)
    if req.k > n:
        raise UsageError(f"k={req.k} is larger than the {n} fine classes of the run (at most k={n})")
    confusion = np.asarray(results[f"confusion_{req.split}"], dtype=np.float64)
    try:
        discovery = discover(confusion, fine, req.k, req.constraints)
    except DiscoveryError as exc:
        text = str(exc)
        named = text.startswith(("fixed_edges", "max_width", "min_count", "k=", "no grouping"))
        raise UsageError(text if named else f"run={req.run}: {text}") from None
    compared, compare_label = None, ""
    if req.compare is not None:
        compare_label, ranges = _compare_ranges(req.compare)
        try:
            compared = score_ranges(confusion, fine, ranges)
        except DiscoveryError as exc:
            raise UsageError(f"compare={req.compare!r}: {exc}") from None
    return Found(results, source, class_names, fine, confusion, discovery, compared, compare_label)


def write_outputs(req: Request, found: Found, out: Path) -> Written:
    """The bins YAML, the outlined confusion matrix, and the trade-off of every k (CSV and plot) in `out`."""
    import pandas as pd

    best, split_word = found.discovery.best, _SPLIT_WORDS[req.split]
    header = [
        f"Proposed by agecls-bins from {found.source}: the {len(found.fine)} fine classes grouped into "
        f"k={req.k} contiguous bins,",
        f"chosen on the {split_word} confusion matrix ({req.constraints.describe()}).",
        f"Expected macro-F1 {best.macro_f1:.4f} on the fine model's {req.split} predictions; "
        "not comparable across bin sets.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    yaml_path = out / f"{req.name}.yaml"
    yaml_path.write_text(bins_yaml(best, req.name, header, found.fine))
    title = f"{req.name}: k={req.k}, expected macro-F1 {best.macro_f1:.3f}"
    title += f" ({req.split} confusion of {found.source})"
    png = plot_blocks(found.confusion, found.class_names, best, out / f"{req.name}_confusion.png", title)
    rows = [
        {
            "k": kk,
            "expected_macro_f1": (g.macro_f1 if g else None),
            "bins": (" ".join(g.labels) if g else "infeasible"),
        }
        for kk, g in found.discovery.by_k.items()
        if kk >= 2
    ]
    csv = out / f"{req.name}_tradeoff.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    tradeoff_png = plot_tradeoff(
        found.discovery,
        req.k,
        out / f"{req.name}_tradeoff.png",
        f"best expected macro-F1 per k ({req.split}, {found.source})",
    )
    return Written(yaml_path, png, tradeoff_png, csv, rows)


def print_report(req: Request, found: Found, written: Written) -> float | None:
    """What was chosen and how every k compares; returns the chosen bins' test macro-F1 (a held-out check,
    never used to choose), when the run has a test matrix and the bins were chosen on val."""
    best, n = found.discovery.best, len(found.fine)
    print(f"Fine classes: {n} ({found.class_names[0]} .. {found.class_names[-1]}) from {found.source}")
    print(
        f"Selection: the {_SPLIT_WORDS[req.split]} confusion matrix ({int(found.confusion.sum())} samples); "
        "the test split is never used to choose bins."
    )
    print(f"Constraints: {req.constraints.describe()}")
    print(f"\nProposed k={req.k} bins ({req.name}):\n{_table(best)}")
    test_f1 = None
    if req.split == "val" and "confusion_test" in found.results:
        test_f1 = score_ranges(found.results["confusion_test"], found.fine, best.ranges).macro_f1
        print(f"  held-out check, not used for selection: the same bins on test score {test_f1:.3f}")
    if found.compared is not None:
        print(f"\nFor comparison, {found.compare_label} on the same {req.split} matrix:")
        print(_table(found.compared))
    print("\nBest expected macro-F1 for every k (same constraints):")
    for row in written.rows:
        f1 = row["expected_macro_f1"]
        mark = "  <-" if row["k"] == req.k else ""
        value = f"{f1:.3f}" if f1 is not None else "  -  "
        print(f"  k={row['k']:>2}  {value}  {row['bins']}{mark}")
    print(f"\nNote: {NOT_COMPARABLE}")
    print(
        "Expected = rescoring the fine model's predictions; a model trained on these bins will score "
        "differently."
    )
    print(
        f"\nWrote {written.yaml}\n      {written.confusion_png}\n      {written.tradeoff_png}\n"
        f"      {written.tradeoff_csv}"
    )
    return test_f1


def install_bins(req: Request, yaml_path: Path) -> Path | None:
    """With install=true, the YAML copied into the package's conf/bins/ (never over an existing file)."""
    if not req.install:
        usage = f"agecls-train bins={req.name} after  agecls-bins propose ... --install  (or copy the YAML)"
        print(f"Use it: {usage}")
        return None
    from agecls.config import CONFIG_DIR

    target = CONFIG_DIR / "bins" / f"{req.name}.yaml"
    if target.exists():
        raise UsageError(f"install: {target} already exists; choose another name= (never overwritten)")
    shutil.copyfile(yaml_path, target)
    print(f"Installed {target}: train with  agecls-train bins={req.name}")
    return target


def propose(opts: dict[str, Any]) -> dict[str, Any]:
    """Run `propose` with parsed options; print the report and return what was written and found."""
    req = check_request(opts)
    found = find_bins(req)
    if req.out:
        out = Path(req.out)
    else:
        from agecls.tracking import default_tracking

        out = default_tracking()[1] / "bins"
    written = write_outputs(req, found, out)
    test_f1 = print_report(req, found, written)
    return {
        "yaml": written.yaml,
        "confusion_png": written.confusion_png,
        "tradeoff_png": written.tradeoff_png,
        "installed": install_bins(req, written.yaml),
        "discovery": found.discovery,
        "test_macro_f1": test_f1,
        "compared": found.compared,
    }
