"""optimization_results.yaml: a study's best in hydra-optuna-sweeper's shape, which scripts written for that
plugin read from the sweep folder (`name: optuna`, `best_params`, `best_value`; with several objectives,
`solutions`: the Pareto front's trials, each with its `params` and `values`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


def optimization_results(study) -> dict[str, Any] | None:
    """The study's best as the plugin writes it (Optuna's best trial, or its best trials for several
    objectives); None while no trial is complete."""
    try:
        if len(study.directions) > 1:
            front = study.best_trials
            if not front:
                return None
            solutions = [{"params": dict(t.params), "values": list(t.values)} for t in front]
            return {"name": "optuna", "solutions": solutions}
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    return {"name": "optuna", "best_params": dict(best.params), "best_value": best.value}


def write_optimization_results(study, sweep_dir: Path) -> Path | None:
    """Write (or rewrite, when the study resumes) optimization_results.yaml in `sweep_dir`; returns its path,
    None when the study has no complete trial yet."""
    results = optimization_results(study)
    if results is None:
        return None
    path = Path(sweep_dir) / RESULTS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    OmegaConf.save(OmegaConf.create(results), tmp)
    tmp.replace(path)  # a script reading it never sees half a file
    log.info("%s: %s", RESULTS_FILE, path)
    return path
