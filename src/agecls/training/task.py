"""What one `agecls-train` job is: a plain run, a hierarchy of runs, or a trial of an Optuna study that
tells the study its outcome."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from agecls.training.bin_search import InfeasibleBins
from agecls.training.hierarchy import HierarchyError, run_hierarchy
from agecls.training.resume import run_dir_for
from agecls.training.train import train
from agecls.training.trial import TrialContext

log = logging.getLogger(__name__)


def run_task(cfg: DictConfig, *, validated: list[str] | None = None) -> float | None:
    """One `agecls-train` job (a plain run, a hierarchy, or a trial of a study); returns the objective so
    Hydra sweepers can optimise it.

    As a trial of an Optuna study (`optuna.trial` set by agecls's sweeper) it also tells the study the
    outcome: COMPLETE with the objective, PRUNED, or FAIL with the error (the run's exception is re-raised).
    `validated`: a plain run's warnings from a validation the caller made of this config (see train()).
    """
    trial = TrialContext.from_cfg(cfg)
    if cfg.get("hierarchy") and cfg.hierarchy.get("by"):
        if trial is not None:
            raise HierarchyError("hierarchy=... runs are not yet supported as Optuna trials; use a grid (-m)")
        return run_hierarchy(cfg, run_dir_for(cfg))["objective"]
    if trial is None:
        return train(cfg, validated=validated)["objective"]
    import optuna

    try:
        results = train(cfg, trial)
    except (optuna.TrialPruned, InfeasibleBins) as exc:
        if isinstance(exc, InfeasibleBins):
            log.warning("trial %d: infeasible bins, pruned before training: %s", trial.number, exc)
        trial.pruned()
        return None
    except Exception as exc:
        trial.failed(exc)
        raise
    attrs = {
        k: results[k] for k in ("mlflow_run_id", "run_dir", "checkpoint", "best_epoch", "epochs_trained")
    }
    attrs.update({k: results[k] for k in ("test/macro_f1", "fit_seconds") if k in results})
    trial.complete(results["objective"], attrs)
    return results["objective"]
