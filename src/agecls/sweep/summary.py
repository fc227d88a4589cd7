"""What a study leaves in its sweep folder when it ends: trials.csv, optimization_results.yaml and best.txt
(the best trial, the one chosen by its mean over seeds, or the Pareto front of several objectives)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agecls.study import find_trial
from agecls.sweep.console import objective_value, pareto_front, trial_view
from agecls.sweep.results import write_optimization_results
from agecls.sweep.space import format_value

log = logging.getLogger(__name__)


def write_summary(study, sweep_dir: Path, followup: dict[str, Any] | None = None) -> None:
    """The study's trials as CSV (one `values_<objective>` column per objective when there are several),
    optimization_results.yaml, and the best trial (several objectives: the Pareto front's trials, each with
    its objectives; re-seeded top trials: the one chosen by its mean over seeds), in the sweep folder."""
    frame = study.trials_dataframe()
    if len(study.directions) == 1:  # one named objective: Optuna calls its column value_<name>
        frame = frame.rename(columns={f"value_{n}": "value" for n in study.metric_names or []})
    frame.to_csv(sweep_dir / "trials.csv", index=False)
    write_optimization_results(study, sweep_dir)  # what scripts written for hydra-optuna-sweeper read
    if len(study.directions) > 1:
        _write_front(study, sweep_dir)
        return
    try:
        best = study.best_trial
    except ValueError:
        log.warning("no trial of study %r completed", study.study_name)
        return
    chosen = (followup or {}).get("chosen_trial")
    if chosen is not None and find_trial(study, int(chosen)) is not None:
        best = find_trial(study, int(chosen))
        mean, std = best.user_attrs.get("seed_mean"), best.user_attrs.get("seed_std")
        seeds = "" if mean is None else f", mean over seeds {mean:.4f} ± {std:.4f}"
        pick = (followup or {}).get("best_seed") or {}
        text = (
            f"chosen trial {best.number}: value {best.value:.4f}{seeds} (chosen by its mean over seeds); "
            f"its best seed on validation: {pick.get('seed')} ({pick.get('value')}, {pick.get('run_dir')})\n"
        )
    else:
        text = f"best trial {best.number}: value {best.value:.4f}\n"
    text += "".join(f"  {k}={format_value(v)}\n" for k, v in best.params.items())
    (sweep_dir / "best.txt").write_text(text)
    log.info("%s", text.rstrip())


def _write_front(study, sweep_dir: Path) -> None:
    """best.txt of a study with several objectives: its Pareto front, by trial number, each trial with its
    objectives and parameters."""
    from optuna.trial import TrialState

    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    directions = [d.name.lower() for d in study.directions]
    views = [trial_view(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    front = pareto_front(views, directions)
    if not front:
        log.warning("no trial of study %r completed", study.study_name)
        return
    shown = ", ".join(f"{n} ({d})" for n, d in zip(names, directions, strict=True))
    lines = [f"Pareto front: {len(front)} of {len(views)} complete trials; objectives {shown}"]
    for trial in front:
        values = ", ".join(
            f"{n} {objective_value(v)}" for n, v in zip(names, trial.values or (), strict=True)
        )
        lines.append(f"trial {trial.number}: {values}")
        lines += [f"  {k}={format_value(v)}" for k, v in trial.params.items()]
    text = "\n".join(lines) + "\n"
    (sweep_dir / "best.txt").write_text(text)
    log.info("%s", text.rstrip())
