"""MLflow side of an Optuna study: one parent run per study (trials are its child runs), summary metrics,
and the best trial's checkpoint registered in the model registry under the alias `best`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from agecls.tracking import ensure_experiment, source_tags

log = logging.getLogger("agecls.sweep.sweeper")


@dataclass
class StudyRun:
    client: Any
    run_id: str
    cfg: DictConfig
    experiment_id: str = ""
    study_name: str = ""

    @classmethod
    def open(cls, cfg: DictConfig, study_name: str) -> StudyRun:
        """The study's parent run: reopened when the study is resumed, created otherwise."""
        from mlflow import MlflowClient

        tracking = cfg.tracking
        experiment_id = ensure_experiment(tracking.tracking_uri, tracking.experiment, tracking.artifact_root)
        client = MlflowClient(tracking_uri=tracking.tracking_uri)
        query = f"tags.`optuna.study` = '{study_name}' and tags.`agecls.role` = 'study'"
        found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {
                **source_tags(),
                "optuna.study": study_name,
                "agecls.role": "study",
                "optuna.storage": str(cfg.optuna.storage),
            }
            run_id = client.create_run(experiment_id, run_name=f"study {study_name}", tags=tags).info.run_id
        return cls(client=client, run_id=run_id, cfg=cfg, experiment_id=experiment_id, study_name=study_name)

    def end_orphan_runs(self, study) -> list[str]:
        """End FAILED the trial runs still RUNNING whose Optuna trial has failed: a trial process killed
        outright (SIGKILL, out of memory, a lost node) cannot end its own MLflow run, and the sweeper fails
        its trial instead. Trials still RUNNING in the study (this or another worker's) are left alone.
        Returns the run ids ended."""
        from mlflow.exceptions import MlflowException
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        # why each failed: recorded when the sweeper failed it, or on its re-queued copy (a stale trial)
        fails = [t for t in trials if t.state == TrialState.FAIL]
        why = {str(t.number): t.user_attrs.get("failed_because") for t in fails}
        for t in trials:
            origin = str(t.user_attrs.get("requeued_from"))
            if origin in why and not why[origin]:
                why[origin] = t.user_attrs.get("requeue_reason")
        failed = set(why)
        if not failed or not self.experiment_id:
            return []
        query = f"tags.`optuna.study` = '{self.study_name}' and attributes.status = 'RUNNING'"
        ended = []
        try:
            for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000):
                tags = run.data.tags
                if tags.get("agecls.role") == "study" or tags.get("optuna.trial") not in failed:
                    continue
                number = tags["optuna.trial"]
                reason = why[number] or "the trial process died without ending its run"
                self.client.set_tag(run.info.run_id, "agecls.ended_by", f"sweeper: {reason}")
                self.client.set_terminated(run.info.run_id, status="FAILED")
                ended.append(run.info.run_id)
        except MlflowException as exc:  # tracking is a record, not the study: never stop a sweep over it
            log.warning("could not end the MLflow runs of failed trials: %s", exc)
        if ended:
            log.info("ended %d MLflow run(s) of failed trials as FAILED", len(ended))
        return ended

    def close(self, study, status: str, seconds: float) -> None:
        """Summary of the study so far (trial counts by state, epochs, best value and params), then status."""
        from optuna.trial import TrialState

        self.end_orphan_runs(study)
        trials = study.get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
        epochs = sum(int(t.user_attrs.get("epochs_trained", 0)) for t in trials)
        pruned_epochs = sum(
            max(t.intermediate_values or {0: 0}) for t in trials if t.state == TrialState.PRUNED
        )
        metrics = {f"study/n_{k}": float(v) for k, v in counts.items()}
        metrics.update({"study/epochs": float(epochs + pruned_epochs), "study/last_session_seconds": seconds})
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if completed:
            best = study.best_trial
            metrics["study/best_value"] = float(best.value)
            tags = {f"best.{k}": str(v) for k, v in best.params.items()}
            tags["best.trial"] = str(best.number)
            tags["best.run_id"] = str(best.user_attrs.get("mlflow_run_id", ""))
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            if self.cfg.optuna.get("register_best") and best.user_attrs.get("mlflow_run_id"):
                self._register(study.study_name, best)
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status=status)

    def _register(self, study_name: str, best) -> None:
        """Register the best trial's checkpoint as an MLflow Model (python_function flavor, so MLflow itself
        loads and serves it), a version of `agecls-<study>` with the alias `best`."""
        from mlflow.exceptions import MlflowException

        from agecls.serving.mlflow_model import register_run_model

        name = f"agecls-{study_name}"
        try:
            version = register_run_model(
                str(self.cfg.tracking.tracking_uri), best.user_attrs["mlflow_run_id"], name, "best"
            )
            log.info("registered %s version %s (trial %d) as %s@best", name, version, best.number, name)
        except (MlflowException, FileNotFoundError, OSError) as exc:
            log.warning("could not register the best checkpoint in the MLflow model registry: %s", exc)
