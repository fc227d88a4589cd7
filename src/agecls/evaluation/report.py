"""`agecls-report`: a leaderboard of the MLflow runs of one experiment (what differed, val and test F1)."""

from __future__ import annotations

import pandas as pd

from agecls.errors import AgeclsError

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


class NoSuchExperiment(AgeclsError):
    """The tracking store has no MLflow experiment of that name (the message lists those it has)."""


def load_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """All runs of an experiment as one row each (params.*, metrics.*, tags.*), newest first;
    NoSuchExperiment when there is no such experiment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise NoSuchExperiment(
            f"no MLflow experiment named {experiment!r} in {tracking_uri}; experiments: {names}"
        )
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
    if "metrics.val/macro_f1" in runs and "best_val/macro_f1" in table:
        # A pruned or stopped run never logs its best_val/*; its last epoch's value is what it reached.
        unfinished = table["best_val/macro_f1"].isna()
        if unfinished.any():
            table["last_val/macro_f1"] = runs["metrics.val/macro_f1"].where(unfinished)
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
