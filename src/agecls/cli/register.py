"""`agecls-register`: a run's best checkpoint, or a study's chosen trials, as registered MLflow Models that
MLflow itself can load."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from agecls.cli.app import App, run
from agecls.errors import AgeclsError, UsageError

APP = App(
    prog="agecls-register",
    config="register",
    summary="a run's best checkpoint, or a study's chosen trials, as registered MLflow Models (pyfunc).",
    usage="agecls-register (best_of=EXPERIMENT | run=RUN_ID | study=NAME [rule=RULE]) [KEY=VALUE ...]",
    description="""\
Logs the run's best checkpoint as the MLflow Model `model` of that run (signature, input example) and
registers it as a new version of `name` with `alias`. Then mlflow.pyfunc.load_model("models:/NAME@ALIAS"),
`mlflow models serve -m models:/NAME@ALIAS --env-manager local`, agecls-predict and agecls-serve all take it.
Studies register their chosen trial this way by themselves (optuna.register_best). study=NAME registers a
study's trials under agecls-NAME: a study of several objectives its front's named points (@best_f1,
@fairest, @smallest; one version per trial), one objective its best trial (@best); rule= the trial a rule
picks (@rule, or alias=), e.g. rule="min val/fairness_gap_ethnicity where val/macro_f1 >= best - 0.01".""",
    examples=(
        "agecls-register best_of=utkface                    # its best finished run -> agecls-utkface@best",
        "agecls-register run=4f0c2a9e... name=agecls-age alias=champion",
        "agecls-register study=pareto_fairness              # -> agecls-pareto_fairness@best_f1, @fairest",
        'agecls-register study=pareto_fairness rule="min val/fairness_gap_ethnicity where '
        'val/macro_f1 >= best - 0.01"',
    ),
    exit_codes="0 registered, 1 no such run, experiment or study, no checkpoint, or no trial meets the rule, "
    "2 bad arguments (a rule that cannot be read)",
    options={
        "--best-of": "best_of",
        "--run": "run",
        "--study": "study",
        "--rule": "rule",
        "--name": "name",
        "--alias": "alias",
    },
    text_keys=("best_of", "run", "study", "storage", "rule", "name", "alias", "tracking_uri"),
)


def best_run(client, experiment: str):
    """The FINISHED run of `experiment` with the highest best_val/macro_f1 (study parent runs excluded)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise AgeclsError(f"best_of={experiment}: no such MLflow experiment; experiments: {names}")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["metrics.`best_val/macro_f1` DESC"],
        max_results=50,
    )
    runs = [
        r for r in runs if r.data.tags.get("agecls.role") != "study" and "best_val/macro_f1" in r.data.metrics
    ]
    if not runs:
        raise AgeclsError(f"best_of={experiment}: no FINISHED run with a best_val/macro_f1 to register")
    return runs[0]


def _study_points(cfg: DictConfig, storage: str) -> tuple[Any, dict[str, Any]]:
    """The study named study= and {alias: trial} to register: the rule's pick, the front's named points
    (several objectives) or the best trial (one)."""
    from agecls.evaluation.pareto import (
        apply_rule,
        complete_trials,
        is_multi,
        named_points,
        objective_names,
        parse_rule,
    )
    from agecls.study import find_study

    rule = parse_rule(str(cfg.rule)) if cfg.rule is not None else None  # a bad rule fails before any lookup
    study = find_study(storage, str(cfg.study))
    if study is None:
        raise AgeclsError(f"study={cfg.study}: no such Optuna study in {storage} (storage=URL names another)")
    if not complete_trials(study):
        raise AgeclsError(f"study={cfg.study}: no COMPLETE trial to register yet")
    if rule is not None:
        return study, {str(cfg.alias or "rule"): apply_rule(rule, study)}
    if not is_multi(study):
        from agecls.sweep.selection import chosen_trial

        return study, {"best": chosen_trial(study)}
    points = named_points(study)
    if not points:
        names = ", ".join(objective_names(study))
        raise AgeclsError(
            f"study={cfg.study}: its objectives ({names}) include none of val/macro_f1, a fairness gap or "
            "worst-group F1, model/params, so its front has no named point; pick one with rule="
        )
    return study, points


def _register_study(cfg: DictConfig, uri: str) -> int:
    from agecls.evaluation.pareto import objective_names, trial_values
    from agecls.sweep.study_tracking import register_points
    from agecls.tracking import default_tracking

    if cfg.alias is not None and cfg.rule is None:
        raise UsageError(
            f"alias={cfg.alias}: with study= the aliases are best_f1, fairest, smallest (or best); "
            "alias= names the trial a rule= picks"
        )
    storage = str(cfg.storage or default_tracking()[2])
    study, points = _study_points(cfg, storage)
    name = str(cfg.name or f"agecls-{study.study_name}")
    versions = register_points(uri, name, points, detect=bool(cfg.detect), strict=True)
    names = objective_names(study)
    for alias, trial in points.items():
        values = trial_values(trial, names)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k in names or k == "val/macro_f1")
        print(
            f"registered {name} version {versions[alias]} as {name}@{alias}: trial {trial.number} "
            f"({shown}), run {trial.user_attrs.get('mlflow_run_id')}"
        )
    first = next(iter(points))
    print(f"  agecls-predict ckpt=models:/{name}@{first} tracking_uri={uri} images=PHOTO")
    print(f"  agecls-serve ckpt=models:/{name}@{first} tracking_uri={uri}")
    return 0


def _register(cfg: DictConfig, _overrides: list[str]) -> int:
    given = [key for key in ("run", "best_of", "study") if cfg.get(key) is not None]
    if len(given) != 1:
        raise UsageError("give one of run=RUN_ID, best_of=EXPERIMENT or study=NAME")
    if cfg.study is None and (cfg.rule is not None or cfg.storage is not None):
        raise UsageError(f"{'rule' if cfg.rule is not None else 'storage'}= goes with study=NAME")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from agecls.serving.mlflow_model import register_run_model
    from agecls.tracking import default_tracking

    uri = str(cfg.tracking_uri or default_tracking()[0])
    if cfg.study is not None:
        return _register_study(cfg, uri)
    alias = str(cfg.alias or "best")
    client = MlflowClient(tracking_uri=uri)
    if cfg.run is not None:
        try:
            chosen = client.get_run(str(cfg.run))
        except MlflowException:
            raise AgeclsError(f"run={cfg.run}: no such MLflow run in {uri}") from None
    else:
        chosen = best_run(client, str(cfg.best_of))
    experiment = client.get_experiment(chosen.info.experiment_id).name
    name = str(cfg.name or f"agecls-{experiment}")
    try:
        version = register_run_model(uri, chosen.info.run_id, name, alias, detect=bool(cfg.detect))
    except (FileNotFoundError, MlflowException) as exc:
        raise AgeclsError(f"run {chosen.info.run_id}: cannot register it: {exc}") from None
    score = chosen.data.metrics.get("best_val/macro_f1")
    shown = f", validation macro-F1 {score:.4f}" if score is not None else ""
    print(f"registered {name} version {version} as {name}@{alias}: run {chosen.info.run_id}{shown}")
    print(f"  agecls-predict ckpt=models:/{name}@{alias} tracking_uri={uri} images=PHOTO")
    print(f"  agecls-serve ckpt=models:/{name}@{alias} tracking_uri={uri}")
    print(f'  python: mlflow.set_tracking_uri("{uri}"); mlflow.pyfunc.load_model("models:/{name}@{alias}")')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _register)


if __name__ == "__main__":
    sys.exit(main())
