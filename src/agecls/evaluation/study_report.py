"""Report of one Optuna study: trials table, optimisation history, parameter importances, intermediate
values (pruning), the top trials' validation confusion matrices, and the compute the study spent."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


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
    """One row per trial: number, state, value, params, epochs, the last value it reported (a pruned trial's
    only score) with its epoch, MLflow run; ranked by value, then pruned trials by their last value."""
    from agecls.evaluation.pareto import directions, is_multi, objective_names

    multi = is_multi(study)
    names = objective_names(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        complete = t.state.name == "COMPLETE"
        # several objectives: one column per objective (named as the study names them) in place of `value`
        values = dict(zip(names, t.values or (), strict=False)) if multi and complete else {}
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                # Optuna gives a pruned trial its last reported value as `value`; ranking it among complete
                # trials would compare a short run's score with finished ones, so it is shown apart.
                **({n: values.get(n) for n in names} if multi else {"value": t.value if complete else None}),
                "last_value": t.intermediate_values[steps[-1]] if steps else None,
                "last_epoch": steps[-1] if steps else None,  # steps are 1-based epochs
                **{k: v for k, v in t.params.items()},
                **({"bins": t.user_attrs["bins"]} if "bins" in t.user_attrs else {}),
                **({"infeasible": t.user_attrs["infeasible"]} if "infeasible" in t.user_attrs else {}),
                "requeued_from": t.user_attrs.get("requeued_from"),  # a re-run of that trial's params
                "warm_start": t.user_attrs.get("warm_start"),  # enqueued to run first (optuna.enqueue)
                # a warm start the pruner would have cut at this epoch, kept to the end (prune_warm_starts)
                **(
                    {"would_cut_at": t.user_attrs["pruner_would_cut_at"]}
                    if "pruner_would_cut_at" in t.user_attrs
                    else {}
                ),
                "epochs": t.user_attrs.get("epochs_trained", len(t.intermediate_values) or None),
                "test/macro_f1": t.user_attrs.get("test/macro_f1"),
                "run": str(t.user_attrs.get("mlflow_run_id", ""))[:8],
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    if multi:  # by the first objective; the front is pareto.csv's
        first = names[0]
        ascending = directions(study)[first] == "minimize"
        return table.sort_values(
            [first, "trial"], ascending=[ascending, True], na_position="last"
        ).reset_index(drop=True)
    ascending = study.direction.name == "MINIMIZE"
    return table.sort_values(["value", "last_value"], ascending=ascending, na_position="last").reset_index(
        drop=True
    )


def study_runs(tracking_uri: str, study_name: str) -> tuple[str, pd.DataFrame] | None:
    """The MLflow runs of study `study_name` wherever its experiment is (its parent run and its trials carry
    the tag optuna.study), with that experiment's name; None when no run of the store carries it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    quote = '"' if "'" in study_name else "'"
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`optuna.study` = {quote}{study_name}{quote}",
        output_format="pandas",
    )
    if runs.empty:
        return None
    roles = runs.get("tags.agecls.role", pd.Series([None] * len(runs))).fillna("")
    parents = runs[roles == "study"]
    experiment_id = (parents if not parents.empty else runs)["experiment_id"].iloc[0]
    experiment = mlflow.get_experiment(experiment_id).name
    return experiment, runs[runs["experiment_id"] == experiment_id].reset_index(drop=True)


def bins_vary(trials: pd.DataFrame) -> bool:
    """Whether the study's trials used different age bins (a `bins` choice or drawn bin edges)."""
    cols = [c for c in trials.columns if c == "bins" or c.startswith("bins.")]
    return any(trials[c].dropna().nunique() > 1 for c in cols)


def history_plot(study, path: Path) -> Path:
    """Each trial's value by trial number, with the best so far: pruned trials are drawn (as x at the last
    value they reported), since leaving them out hides where the search spent its budget."""
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    maximize = study.direction.name == "MAXIMIZE"
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    fig, ax = plt.subplots(figsize=(8, 5))
    if complete:
        ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete", zorder=3)
        best, line = None, []
        for t in sorted(complete, key=lambda t: t.number):
            best = t.value if best is None else (max if maximize else min)(best, t.value)
            line.append((t.number, best))
        xs, ys = zip(*line, strict=True)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.scatter(
            [t.number for t in pruned], last, marker="x", color="tab:gray", label="pruned (last reported)"
        )
    failed = sum(t.state == TrialState.FAIL for t in trials)
    ax.set_title(
        f"Optimisation history: {len(complete)} complete, {len(pruned)} pruned, {failed} failed"
        + (" (not drawn)" if failed else "")
    )
    ax.set_xlabel("trial")
    ax.set_ylabel("validation objective")
    if complete or pruned:
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(
    study, out: Path, tracking_uri: str | None, top: int = 3, min_importance_trials: int = 8
) -> list[Path]:
    """Optimisation history (pruned trials included), importances (only from at least
    `min_importance_trials` complete trials: fewer give a ranking of noise), intermediate values; the top
    trials' validation confusion matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    from agecls.evaluation.pareto import is_multi, pareto_plot

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    multi = is_multi(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not multi:
        written = [history_plot(study, out / "optimization_history.png")]
    elif complete:  # several objectives: no single history; the front is the picture
        written = [pareto_plot(study, out / "pareto_front.png")]
    else:
        written = []
    plots = {}
    if any(len(t.intermediate_values) >= 2 for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = ovm.plot_intermediate_values
    else:  # one dot per trial on an empty axis shows nothing
        log.info("intermediate values not drawn: no trial reported more than one epoch")
    if len(complete) < min_importance_trials:
        log.warning(
            "param importances withheld: %d complete trials, fewer than min_importance_trials=%d",
            len(complete),
            min_importance_trials,
        )
    elif any(t.params for t in complete):
        plots["param_importances"] = ovm.plot_param_importances
    for name, plot in plots.items():
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. no intermediate values
            log.warning("skipped %s: %s", name, exc)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        if name == "param_importances":
            ax.set_title(
                f"Hyperparameter importances (fANOVA over {len(complete)} complete trials)", loc="left"
            )
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if tracking_uri:
        written += confusion_plots(study, out, tracking_uri, complete, top)
    return written


def confusion_plots(study, out: Path, tracking_uri: str, complete: list, top: int) -> list[Path]:
    """The validation confusion figures of the top trials (a Pareto study: its named points first), each
    titled with its trial, value and MLflow run."""
    import mlflow

    from agecls.evaluation.pareto import is_multi, named_points, pareto_front

    if is_multi(study):  # the named points first, then the rest of the front
        named = list({t.number: t for t in named_points(study).values()}.values())
        ranked = named + [t for t in pareto_front(study) if t.number not in {n.number for n in named}]
    else:
        ranked = sorted(complete, key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    written = []
    for t in ranked[:top]:
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        local = _confusion_figure(mlflow, run_id, tracking_uri)
        if local is None:
            log.warning("no confusion matrix for trial %d", t.number)
            continue
        path = out / f"confusion_trial{t.number:04d}.png"
        titled_figure(Path(local), path, trial_caption(study, t))
        written.append(path)
    return written


def trial_caption(study, trial) -> str:
    """'Trial 7: val/macro_f1 0.6123 (MLflow run 1a2b3c4d)'; the objectives named as the study names them, a
    study without names by its trial's objective.metric."""
    from agecls.evaluation.pareto import objective_names

    names = objective_names(study)
    if names == ["value"]:
        names = [_run_objective(trial) or "value"]
    values = ", ".join(f"{n} {v:.4f}" for n, v in zip(names, trial.values or (), strict=False))
    run = str(trial.user_attrs.get("mlflow_run_id") or "")[:8]
    return f"Trial {trial.number}: {values}" + (f" (MLflow run {run})" if run else "")


def _run_objective(trial) -> str | None:
    """objective.metric of the trial's run (its config.yaml), or None."""
    from omegaconf import OmegaConf

    config = Path(str(trial.user_attrs.get("run_dir") or "")) / "config.yaml"
    if not trial.user_attrs.get("run_dir") or not config.is_file():
        return None
    metric = OmegaConf.select(OmegaConf.load(config), "objective.metric", default=None)
    return None if metric is None else str(metric)


def titled_figure(source: Path, dest: Path, title: str) -> Path:
    """`source` (a PNG) redrawn into `dest` under a band holding `title`."""
    import matplotlib.pyplot as plt

    pixels = plt.imread(source)
    height, width = pixels.shape[:2]
    band = 36
    fig = plt.figure(figsize=(width / 100, (height + band) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, height / (height + band)))
    ax.imshow(pixels)
    ax.set_axis_off()
    fig.text(0.5, 1 - band / 2 / (height + band), title, ha="center", va="center", fontsize=13, weight="bold")
    fig.savefig(dest, dpi=100)
    plt.close(fig)
    return dest


def _confusion_figure(mlflow, run_id: str, tracking_uri: str) -> str | None:
    """A trial's confusion figure (train, val and test panels; a multitask model's age one), downloaded."""
    for name in ("confusion.png", "confusion_age.png"):
        try:
            return mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"evaluation/{name}", tracking_uri=tracking_uri
            )
        except Exception:  # noqa: BLE001, S112 - the next name, then a warning: never stop the report
            continue
    return None
