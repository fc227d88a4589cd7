"""`agecls-report`: a leaderboard of the MLflow runs of one experiment (what differed, val and test F1)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

# Params that differ between runs without being a choice (locations, derived sizes).
_NOISE_PREFIXES = ("paths.", "tracking.", "data.n_", "data.root", "data.manifest_dir", "hydra", "optuna.")
_METRICS = (
    "best_val/macro_f1",
    "test/macro_f1",
    "best_val/acc",
    "test/acc",
    "best_epoch",
    "epochs_trained",
    "fit_seconds",
)


def default_tracking(overrides: list[str] | None = None) -> tuple[str, Path, str]:
    """Tracking URI, output folder and Optuna storage from the same config `agecls-train` composes."""
    from hydra import compose, initialize_config_dir

    from agecls.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides or []))
    return cfg.tracking.tracking_uri, Path(cfg.paths.output_dir), str(cfg.optuna.storage)


def load_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """All runs of an experiment as one row each (params.*, metrics.*, tags.*), newest first."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise SystemExit(f"no MLflow experiment named {experiment!r} in {tracking_uri}; experiments: {names}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="pandas")


def _override_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """One column per override key whose value differs between runs (e.g. optimizer, model.blocks)."""
    parsed = []
    for text in runs.get("tags.overrides", pd.Series([None] * len(runs))).fillna(""):
        pairs = (item.split("=", 1) for item in str(text).split() if "=" in item)
        parsed.append({k.lstrip("+~"): v for k, v in pairs})
    table = pd.DataFrame(parsed, index=runs.index)
    keep = [
        c
        for c in table.columns
        if table[c].astype(str).nunique(dropna=False) > 1 and not c.startswith(_NOISE_PREFIXES)
    ]
    return table[keep]


def _param_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """Fallback for runs started without Hydra overrides: every resolved param that differs."""
    params = [c for c in runs.columns if c.startswith("params.")]
    varying = [
        c
        for c in params
        if runs[c].astype(str).nunique(dropna=False) > 1
        and not c[len("params.") :].startswith(_NOISE_PREFIXES)
    ]
    return runs[varying].rename(columns=lambda c: c[len("params.") :])


def leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs ranked by validation macro-F1 (the selection metric), with the config that differed."""
    if "tags.agecls.role" in runs:  # an Optuna study's parent run summarises its trials; it is not one
        runs = runs[runs["tags.agecls.role"].fillna("") != "study"].reset_index(drop=True)
    if runs.empty:
        return pd.DataFrame()
    status = runs["status"]
    if "tags.trial_state" in runs:  # MLflow has no PRUNED status: pruned trials are KILLED + tagged
        status = runs["tags.trial_state"].fillna(status)
    table = pd.DataFrame({"run": runs["run_id"].str[:8], "status": status})
    differing = _override_columns(runs)
    if differing.empty:
        differing = _param_columns(runs)
    for c in differing.columns:
        table[c] = differing[c]
    for m in _METRICS:
        if f"metrics.{m}" in runs:
            table[m] = runs[f"metrics.{m}"]
    sort_key = "best_val/macro_f1" if "best_val/macro_f1" in table else "run"
    return table.sort_values(sort_key, ascending=False, na_position="last").reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-style Markdown table (no extra dependency)."""

    def cell(v) -> str:
        if isinstance(v, float):
            if pd.isna(v):
                return ""
            return f"{v:.0f}" if v.is_integer() and abs(v) >= 1 else f"{v:.4g}"
        if isinstance(v, str) and len(v) > 8:
            try:  # long numeric override text, e.g. a sampled learning rate
                return f"{float(v):.4g}"
            except ValueError:
                return v
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agecls-report", description=__doc__)
    parser.add_argument("name", help="MLflow experiment (tracking.experiment) and/or Optuna study name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one agecls-train uses)")
    parser.add_argument("--storage", help="Optuna storage URL (default: optuna.storage of agecls-train)")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/reports/<name>)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri, output_dir, storage = default_tracking()
    uri, storage = args.tracking_uri or uri, args.storage or storage
    out = args.out or output_dir / "reports" / args.name
    out.mkdir(parents=True, exist_ok=True)

    from agecls.study_report import bins_vary, compute_spent, find_study, trials_table, write_plots

    study = find_study(storage, args.name)
    try:
        runs = load_runs(uri, args.name)
    except SystemExit:
        if study is None:
            raise
        runs = None
    if runs is not None:
        table = leaderboard(runs)
        table.to_csv(out / "leaderboard.csv", index=False)
        markdown = to_markdown(table)
        (out / "leaderboard.md").write_text(markdown + "\n")
        print(f"\nLeaderboard of {args.name!r} ({len(table)} runs, ranked by validation macro-F1):\n")
        print(markdown)
    if study is not None:
        trials = trials_table(study)
        trials.to_csv(out / "trials.csv", index=False)
        spent = compute_spent(study)
        (out / "compute.json").write_text(json.dumps(spent, indent=2) + "\n")
        plots = write_plots(study, out, uri)
        print(f"\nOptuna study {args.name!r} ({storage}): {len(trials)} trials\n")
        print(to_markdown(trials.head(20)))
        if bins_vary(trials):
            print(
                "\nNote: these trials used different age bins. Macro-F1 over different bin sets is not "
                "comparable (fewer, wider bins are easier); compare trials of the same k and constraints."
            )
        print("\ncompute: " + ", ".join(f"{k} {v}" for k, v in spent.items() if v))
        print("plots: " + ", ".join(p.name for p in plots))
        print(f"Dashboard:  optuna-dashboard {storage}   (pip install optuna-dashboard)")
    print(f"\nWritten to {out}/")
    if uri.startswith("sqlite:///"):
        print(
            f"Browse every run:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
