"""Every study names its objectives (`study.metric_names`), one objective included: optuna-dashboard labels
its charts with the name (val/macro_f1), not "Objective 0"."""

from __future__ import annotations

import json
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from omegaconf import OmegaConf

from agecls.errors import UsageError
from agecls.study import open_study


def _ocfg(tmp_path: Path, name: str = "one"):
    return OmegaConf.create(
        {
            "study_name": name,
            "storage": f"sqlite:///{tmp_path}/o.db",
            "heartbeat_interval": 30,
            "grace_period": 120,
            "retries": 1,
            "pruner": {"_target_": "optuna.pruners.NopPruner"},
        }
    )


def test_a_one_objective_study_is_named_and_keeps_its_name(tmp_path):
    study = open_study(_ocfg(tmp_path), directions=["maximize"], metric_names=["val/macro_f1"])
    assert study.metric_names == ["val/macro_f1"]
    again = open_study(_ocfg(tmp_path), directions=["maximize"], metric_names=["val/macro_f1"])
    assert again.metric_names == ["val/macro_f1"]
    assert open_study(_ocfg(tmp_path), "maximize").metric_names == ["val/macro_f1"]  # a command naming none
    with pytest.raises(UsageError) as refused:
        open_study(_ocfg(tmp_path), directions=["maximize"], metric_names=["val/worst_group_f1_gender"])
    assert str(refused.value) == (
        f"study 'one' in sqlite:///{tmp_path}/o.db has the objectives one objective, val/macro_f1 "
        "(maximize); this command asks for one objective, val/worst_group_f1_gender (maximize); valid: the "
        "study's own objective.metrics and objective.directions, or another optuna.study_name for a new study"
    )


def test_a_study_created_without_a_name_gets_it_when_resumed(tmp_path):
    old = open_study(_ocfg(tmp_path, "old"), "maximize")  # as agecls opened one-objective studies before
    assert old.metric_names is None
    resumed = open_study(_ocfg(tmp_path, "old"), directions=["maximize"], metric_names=["val/macro_f1"])
    assert resumed.metric_names == ["val/macro_f1"]


def test_optuna_dashboard_labels_the_objective_with_its_name(tmp_path):
    import optuna_dashboard

    study = open_study(_ocfg(tmp_path), directions=["maximize"], metric_names=["val/macro_f1"])
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, value=0.61
        )
    )
    app = optuna_dashboard.wsgi(f"sqlite:///{tmp_path}/o.db")

    def get(path: str) -> dict:
        env: dict = {"PATH_INFO": path}
        setup_testing_defaults(env)
        return json.loads(b"".join(app(env, lambda status, headers, exc=None: None)))

    (summary,) = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == "one"
    detail = get(f"/api/studies/{summary['study_id']}")
    assert detail["objective_names"] == ["val/macro_f1"]  # the charts' label; without it "Objective 0"
    assert [t["values"] for t in detail["trials"]] == [[0.61]]
