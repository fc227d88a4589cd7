"""Which trial a single-objective study names as its best, once re-seeds may exist (`optuna.reseed`).

A trial re-run on other seeds carries the user attributes `reseeds` ({seed: value}), `seed_mean` (over its
own seed and the re-seeds) and `seed_std`; `reseed_runs` holds each re-seed's run folder and MLflow run.
The chosen trial is the best by seed mean (ties: the better single value); without re-seeds it is
`study.best_trial`. Kept free of training imports: the report and the sweeper both read it.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from agecls.errors import UsageError


def _check_single(study) -> None:
    if len(study.directions) > 1:
        raise UsageError(
            f"study {study.study_name!r} has {len(study.directions)} objectives: it names no single best "
            "trial (its Pareto front is study.best_trials); valid: a single-objective study"
        )


def maximizes(study) -> bool:
    """Whether the study's (single) objective is maximised."""
    import optuna

    _check_single(study)
    return study.direction == optuna.study.StudyDirection.MAXIMIZE


def _complete(study) -> list[Any]:
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(float(t.value))
    ]


def chosen_trial(study):
    """The trial the study names as best: by `seed_mean` among re-seeded trials (ties: the better single
    value, then the lower number), else `study.best_trial`. UsageError for a multi-objective study;
    ValueError when no trial completed."""
    sign = 1.0 if maximizes(study) else -1.0
    seeded = [t for t in _complete(study) if t.user_attrs.get("seed_mean") is not None]
    if not seeded:
        return study.best_trial
    return max(
        seeded, key=lambda t: (sign * float(t.user_attrs["seed_mean"]), sign * float(t.value), -t.number)
    )


def seed_runs(trial) -> dict[int, dict[str, Any]]:
    """{seed: {value, run_dir, mlflow_run_id, checkpoint}} of a trial: its own run and its re-seeds."""
    own = {
        "value": float(trial.value),
        "run_dir": trial.user_attrs.get("run_dir"),
        "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
        "checkpoint": trial.user_attrs.get("checkpoint"),
    }
    runs: dict[int, dict[str, Any]] = {}
    if trial.user_attrs.get("seed") is not None:
        runs[int(trial.user_attrs["seed"])] = own
    for seed, run in (trial.user_attrs.get("reseed_runs") or {}).items():
        runs[int(seed)] = dict(run)
    return runs or {-1: own}


def best_seed_run(study, trial) -> tuple[int, str | None, str | None, float]:
    """(seed, MLflow run id, run folder, validation value) of the best run of `trial`'s configuration: its
    own run or one of its re-seeds, in the study's direction (ties: the trial's own run, then lower seed)."""
    sign = 1.0 if maximizes(study) else -1.0
    runs = seed_runs(trial)
    own_seed = trial.user_attrs.get("seed")
    seed = max(runs, key=lambda s: (sign * float(runs[s]["value"]), s == own_seed, -s))
    run = runs[seed]
    return seed, run.get("mlflow_run_id"), run.get("run_dir"), float(run["value"])


def served(study, trial) -> tuple[str, list[str], str]:
    """What the study's `@best` serves of the chosen configuration: ("ensemble", its runs' MLflow ids, why)
    when its seeds' ensemble (user attr ensemble_val, mean class probabilities) beats its best seed on
    validation, else ("seed", [], why). An ensemble is served as the argmax of its members' mean
    probabilities, which is how ensemble_val decodes a classification head; for ordinal and year heads
    (decoded otherwise) and for runs without an MLflow run it is not offered."""
    runs = seed_runs(trial)
    ens = trial.user_attrs.get("ensemble_val")
    best = best_seed_run(study, trial)[3]
    if ens is None or len(runs) < 2:
        return "seed", [], "no seeds' ensemble scored"
    if not maximizes(study) or float(ens) <= best:
        return "seed", [], f"the best seed {best:.4f} >= the seeds' ensemble {float(ens):.4f} on validation"
    ids = [str(r.get("mlflow_run_id") or "") for _, r in sorted(runs.items())]
    head = _head(trial.user_attrs.get("run_dir"))  # its seeds run the same config
    if head != "classification":
        return "seed", [], f"the ensemble would be served by argmax, which the {head} head does not decode by"
    if not all(ids):
        return "seed", [], "a seed's run has no MLflow run to register"
    return "ensemble", ids, f"the seeds' ensemble {float(ens):.4f} > the best seed {best:.4f} on validation"


def _head(run_dir: str | None) -> str:
    """task.head of a run's config.yaml (classification for tasks without a head to choose)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    config = Path(str(run_dir or "")) / "config.yaml"
    if not config.is_file():
        return "unknown"
    return str(OmegaConf.select(OmegaConf.load(config), "task.head") or "classification")


def selection_table(study) -> pd.DataFrame:
    """One row per COMPLETE trial and per continued pruned trial: trial, state, value, each seed's value
    (`seed_<S>`), mean, std, continued value, ensemble_val, chosen; the chosen first, then by mean, value."""
    from optuna.trial import TrialState

    sign = 1.0 if maximizes(study) else -1.0
    trials = [
        t
        for t in study.get_trials(deepcopy=False)
        if (t.state == TrialState.COMPLETE and t.value is not None)
        or (t.state == TrialState.PRUNED and t.user_attrs.get("continued"))
    ]
    chosen = chosen_trial(study).number if _complete(study) else None
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "value": t.value}
        if t.state == TrialState.COMPLETE:
            for seed, run in sorted(seed_runs(t).items()):
                if seed >= 0:
                    row[f"seed_{seed}"] = run["value"]
        row["mean"] = t.user_attrs.get("seed_mean")
        row["std"] = t.user_attrs.get("seed_std")
        continued = t.user_attrs.get("continued") or {}
        row["continued"] = continued.get("value")
        row["continued_from"] = t.user_attrs.get("continued_from")
        row["ensemble_val"] = t.user_attrs.get("ensemble_val")
        row["chosen"] = t.number == chosen
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame

    def key(column: pd.Series) -> pd.Series:
        return -sign * column.astype(float).fillna(-sign * math.inf)

    frame = frame.sort_values(["mean", "value"], key=key, kind="stable")
    seeds = sorted((c for c in frame.columns if c.startswith("seed_")), key=lambda c: int(c[5:]))
    head = ["trial", "state", "value", *seeds, "mean", "std", "continued", "continued_from", "ensemble_val"]
    frame = pd.concat([frame[frame["chosen"]], frame[~frame["chosen"]]])
    return frame[[*head, "chosen"]].reset_index(drop=True)
