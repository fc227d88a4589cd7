"""`agecls-register`: a run's best checkpoint as a registered MLflow Model that MLflow itself can load."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from agecls.cli.app import App, run
from agecls.errors import AgeclsError, UsageError

APP = App(
    prog="agecls-register",
    config="register",
    summary="a run's best checkpoint as a registered MLflow Model (python_function flavor).",
    usage="agecls-register (best_of=EXPERIMENT | run=RUN_ID) [KEY=VALUE ...]",
    description="""\
Logs the run's best checkpoint as the MLflow Model `model` of that run (signature, input example) and
registers it as a new version of `name` with `alias`. Then mlflow.pyfunc.load_model("models:/NAME@ALIAS"),
`mlflow models serve -m models:/NAME@ALIAS --env-manager local`, agecls-predict and agecls-serve all take it.
Studies register their chosen trial this way by themselves (optuna.register_best).""",
    examples=(
        "agecls-register best_of=utkface                    # its best finished run -> agecls-utkface@best",
        "agecls-register run=4f0c2a9e... name=agecls-age alias=champion",
        "agecls-register best_of=demo detect=false           # inputs are face crops, not photos",
    ),
    exit_codes="0 registered, 1 no such run or experiment, or no checkpoint, 2 bad arguments",
    options={"--best-of": "best_of", "--run": "run", "--name": "name", "--alias": "alias"},
    text_keys=("best_of", "run", "name", "alias", "tracking_uri"),
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


def _register(cfg: DictConfig, _overrides: list[str]) -> int:
    if (cfg.run is None) == (cfg.best_of is None):
        raise UsageError("give one of run=RUN_ID or best_of=EXPERIMENT")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from agecls.serving.mlflow_model import register_run_model
    from agecls.tracking import default_tracking

    uri = str(cfg.tracking_uri or default_tracking()[0])
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
        version = register_run_model(uri, chosen.info.run_id, name, str(cfg.alias), detect=bool(cfg.detect))
    except (FileNotFoundError, MlflowException) as exc:
        raise AgeclsError(f"run {chosen.info.run_id}: cannot register it: {exc}") from None
    score = chosen.data.metrics.get("best_val/macro_f1")
    shown = f", validation macro-F1 {score:.4f}" if score is not None else ""
    print(f"registered {name} version {version} as {name}@{cfg.alias}: run {chosen.info.run_id}{shown}")
    print(f"  agecls-predict ckpt=models:/{name}@{cfg.alias} tracking_uri={uri} images=PHOTO")
    print(f"  agecls-serve ckpt=models:/{name}@{cfg.alias} tracking_uri={uri}")
    print(
        f'  python: mlflow.set_tracking_uri("{uri}"); mlflow.pyfunc.load_model("models:/{name}@{cfg.alias}")'
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _register)


if __name__ == "__main__":
    sys.exit(main())
