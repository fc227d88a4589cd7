"""Report of one Optuna study: trials table, optimisation history, parameter importances, intermediate
values (pruning), the top trials' validation confusion matrices, and the compute the study spent."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger("agecls.cli.report")


def compute_spent(study) -> dict[str, Any]:
    """Trials by state, epochs trained, worker hours, and the epochs pruning saved (at most)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.datetime_start and t.datetime_complete]
    epochs_run, saved = 0, 0
    for t in trials:
        if t.state == TrialState.COMPLETE:
            epochs_run += int(t.user_attrs.get("epochs_trained", len(t.intermediate_values)))
        elif t.state == TrialState.PRUNED:
            ran = len(t.intermediate_values)
            epochs_run += ran
            saved += max(0, int(t.user_attrs.get("max_epochs", ran)) - ran)
    hours = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished) / 3600
    span = 0.0
    if finished:
        span = (
            max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
        ).total_seconds()
    out = {f"trials_{s.name.lower()}": sum(t.state == s for t in trials) for s in TrialState}
    out.update(
        {
            "epochs_trained": epochs_run,
            "epochs_saved_by_pruning_at_most": saved,
            "worker_hours": round(hours, 4),
            "wall_hours": round(span / 3600, 4),
        }
    )
    return out


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, state, value, params, epochs, MLflow run, ranked by value."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                **{k: v for k, v in t.params.items()},
                **({"bins": t.user_attrs["bins"]} if "bins" in t.user_attrs else {}),
                **({"infeasible": t.user_attrs["infeasible"]} if "infeasible" in t.user_attrs else {}),
                "epochs": t.user_attrs.get("epochs_trained", len(t.intermediate_values) or None),
                "test/macro_f1": t.user_attrs.get("test/macro_f1"),
                "run": str(t.user_attrs.get("mlflow_run_id", ""))[:8],
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    ascending = study.direction.name == "MINIMIZE"
    return table.sort_values("value", ascending=ascending, na_position="last").reset_index(drop=True)


def bins_vary(trials: pd.DataFrame) -> bool:
    """Whether the study's trials used different age bins (a `bins` choice or drawn bin edges)."""
    cols = [c for c in trials.columns if c == "bins" or c.startswith("bins.")]
    return any(trials[c].dropna().nunique() > 1 for c in cols)


def write_plots(study, out: Path, tracking_uri: str | None, top: int = 3) -> list[Path]:
    """Optimisation history, importances, intermediate values; the top trials' val confusion matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    written: list[Path] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "intermediate_values": ovm.plot_intermediate_values,
    }
    if len(complete) >= 2 and len(study.best_trial.params) >= 1:
        plots["param_importances"] = ovm.plot_param_importances
    for name, plot in plots.items():
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. too few trials for importances
            log.warning("skipped %s: %s", name, exc)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if tracking_uri:
        import mlflow

        ranked = sorted(complete, key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
        for t in ranked[:top]:
            run_id = t.user_attrs.get("mlflow_run_id")
            if not run_id:
                continue
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path="evaluation/confusion_val.png", tracking_uri=tracking_uri
                )
            except Exception as exc:  # noqa: BLE001 - a missing artifact must not stop the report
                log.warning("no confusion matrix for trial %d: %s", t.number, exc)
                continue
            path = out / f"confusion_val_trial{t.number:04d}.png"
            path.write_bytes(Path(local).read_bytes())
            written.append(path)
    return written
