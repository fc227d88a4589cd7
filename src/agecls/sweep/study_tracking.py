"""MLflow side of an Optuna study: one parent run per study (trials are its child runs), summary metrics,
and the best trial's checkpoint registered in the model registry under the alias `best`; a study of several
objectives records its Pareto front instead and registers the front's named points (`best_f1`, `fairest`,
`smallest`, and `rule` for optuna.register_rule)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from agecls.errors import AgeclsError
from agecls.evaluation.pareto import (
    apply_rule,
    complete_trials,
    directions,
    is_multi,
    named_points,
    objective_names,
    pareto_table,
    parse_rule,
    trial_values,
)
from agecls.tracking import ensure_experiment, source_tags

log = logging.getLogger(__name__)


def _one_study_run(client, experiment_id: str, query: str, mine: str) -> str:
    """The study's one parent run once this worker has created `mine`: workers that start together may each
    create one (neither found the other's); all then keep the oldest and the others are deleted, so no
    duplicate is left RUNNING by a worker that is later lost."""
    found = client.search_runs([experiment_id], filter_string=query, max_results=50)
    oldest = min(found, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
    if oldest is None or oldest.info.run_id == mine:
        return mine
    client.delete_run(mine)
    log.info(
        "the study's MLflow run is %s, which another worker created at the same moment", oldest.info.run_id
    )
    return oldest.info.run_id


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
            run_id = _one_study_run(client, experiment_id, query, run_id)
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

    def close(self, study, status: str, seconds: float, followup: dict[str, Any] | None = None) -> None:
        """Summary of the study so far (trial counts by state, epochs, best value and params), then status.

        `followup` (sweep.followup.run_followups' summary): with re-seeded top trials the study's choice is
        the configuration with the best mean over seeds, and `best` is registered from that configuration's
        best seed on validation; the pruned-trial check's counts become metrics."""
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
        if completed and is_multi(study):  # no single best trial: the front and its named points
            metrics.update(self._record_front(study))
        elif completed:
            best = study.best_trial
            metrics["study/best_value"] = float(best.value)
            followup = followup or {}
            for key in ("study/pruned_checked", "study/pruned_would_win"):
                if followup.get(key) is not None:
                    metrics[key] = float(followup[key])
            run_id = best.user_attrs.get("mlflow_run_id")
            chosen = followup.get("chosen_trial")
            tags: dict[str, str] = {}
            members: list[str] = []
            if chosen is not None:  # re-seeded: the best mean over seeds, served by its best seed
                best = next((t for t in completed if t.number == int(chosen)), best)
                pick = followup.get("best_seed") or {}
                run_id = pick.get("mlflow_run_id") or best.user_attrs.get("mlflow_run_id")
                for key in ("seed_mean", "seed_std", "ensemble_val"):
                    if best.user_attrs.get(key) is not None:
                        metrics[f"study/chosen_{key}"] = float(best.user_attrs[key])
                tags["best.seed"] = str(pick.get("seed"))
                tags["best.chosen_by"] = "mean validation value over seeds"
                serve = followup.get("serve") or {}
                members = list(serve.get("members") or []) if serve.get("kind") == "ensemble" else []
                tags["best.serves"] = "seeds' ensemble" if members else "best seed"
                tags["best.serves_why"] = str(serve.get("why", ""))
            tags.update({f"best.{k}": str(v) for k, v in best.params.items()})
            tags["best.trial"] = str(best.number)
            tags["best.run_id"] = str(run_id or "")
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            if self.cfg.optuna.get("register_best") and members:
                self._register_ensemble(study.study_name, best, members, fallback=str(run_id or ""))
            elif self.cfg.optuna.get("register_best") and run_id:
                self._register(study.study_name, best, str(run_id))
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status=status)

    def _record_front(self, study) -> dict[str, float]:
        """A multi-objective study's front on its parent run: the table artifact pareto.json (MLflow's table
        view) and pareto.csv, tags pareto.size, pareto.trials and named.<alias> (trial numbers), and its
        named points registered when optuna.register_best is set; returns the best value per objective."""
        from mlflow.exceptions import MlflowException

        names, dirs = objective_names(study), directions(study)
        complete = complete_trials(study)
        metrics = {}
        for name in names:
            values = [trial_values(t, names)[name] for t in complete]
            metrics[f"study/best/{name}"] = float((max if dirs[name] == "maximize" else min)(values))
        rule = OmegaConf.select(self.cfg, "optuna.register_rule", default=None)
        try:
            table = pareto_table(study, n_boot=0, rule=parse_rule(str(rule)) if rule else None)
            points = named_points(study)
            if rule:
                points["rule"] = apply_rule(str(rule), study)
        except AgeclsError as exc:  # a rule no trial meets yet: the front is still recorded
            log.warning("%s", exc)
            table, points = pareto_table(study, n_boot=0), named_points(study)
        tags = {
            "pareto.size": str(len(table)),
            "pareto.trials": ",".join(str(n) for n in sorted(table["trial"])),
            **{f"named.{alias}": str(t.number) for alias, t in points.items()},
        }
        try:
            self.client.log_table(self.run_id, table.astype({"named": str}), "pareto.json")
            self.client.log_text(self.run_id, table.to_csv(index=False), "pareto.csv")
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
        except MlflowException as exc:  # tracking is a record, not the study: never stop a sweep over it
            log.warning("could not record the Pareto front on the study's run: %s", exc)
        if self.cfg.optuna.get("register_best"):
            register_points(str(self.cfg.tracking.tracking_uri), f"agecls-{study.study_name}", points)
        return metrics

    def _register(self, study_name: str, best, run_id: str) -> None:
        """Register the best trial's checkpoint (the MLflow run `run_id`: the trial's own, or its chosen
        configuration's best seed) as an MLflow Model (python_function flavor, so MLflow itself loads and
        serves it), a version of `agecls-<study>` with the alias `best`."""
        from mlflow.exceptions import MlflowException

        from agecls.serving.mlflow_model import register_run_model

        name = f"agecls-{study_name}"
        try:
            version = register_run_model(str(self.cfg.tracking.tracking_uri), run_id, name, "best")
            log.info("registered %s version %s (trial %d) as %s@best", name, version, best.number, name)
        except (MlflowException, FileNotFoundError, OSError) as exc:
            log.warning("could not register the best checkpoint in the MLflow model registry: %s", exc)

    def _register_ensemble(self, study_name: str, best, members: list[str], fallback: str) -> None:
        """Register the chosen configuration's seeds as one ensemble model `agecls-<study>@best` (logged on
        the study's run as `ensemble_model`); the best seed instead when that fails."""
        from mlflow.exceptions import MlflowException

        from agecls.serving.mlflow_model import register_ensemble_model

        name = f"agecls-{study_name}"
        try:
            version = register_ensemble_model(
                str(self.cfg.tracking.tracking_uri), members, name, "best", record_run=self.run_id
            )
            log.info(
                "registered %s version %s (trial %d over %d seeds, an ensemble) as %s@best",
                name,
                version,
                best.number,
                len(members),
                name,
            )
        except (MlflowException, FileNotFoundError, OSError) as exc:
            log.warning("could not register the seeds' ensemble (%s); registering the best seed", exc)
            if fallback:
                self._register(study_name, best, fallback)


def register_points(
    tracking_uri: str, name: str, points: dict[str, Any], *, detect: bool = True, strict: bool = False
) -> dict[str, str]:
    """Register each named trial's checkpoint as a version of `name` with its alias ({alias: trial});
    one version per distinct trial (its MLflow run), several aliases may point at it. Returns {alias:
    version}. A trial without a run, or one that cannot be registered, is logged and skipped (strict:
    AgeclsError naming it)."""
    from mlflow.exceptions import MlflowException

    from agecls.serving.mlflow_model import register_run_model

    versions = {}
    for alias, trial in points.items():
        run_id = trial.user_attrs.get("mlflow_run_id")
        try:
            if not run_id:
                raise FileNotFoundError(f"trial {trial.number} has no MLflow run (user attr mlflow_run_id)")
            versions[alias] = register_run_model(tracking_uri, str(run_id), name, alias, detect=detect)
            log.info(
                "registered %s version %s (trial %d) as %s@%s",
                name,
                versions[alias],
                trial.number,
                name,
                alias,
            )
        except (MlflowException, FileNotFoundError, OSError) as exc:
            if strict:
                raise AgeclsError(
                    f"{name}@{alias} (trial {trial.number}): cannot register it: {exc}"
                ) from None
            log.warning("could not register %s@%s (trial %d): %s", name, alias, trial.number, exc)
    return versions
