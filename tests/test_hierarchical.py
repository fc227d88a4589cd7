"""Hierarchical models (hierarchy=gender|ethnicity): router + per-group age experts, leak-free."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.data.datamodule import FaceDataModule
from agecls.data.prepare import subset_labels
from agecls.data.records import DataError
from agecls.training.hierarchy import HierarchyError, run_hierarchy, stage_configs


def test_stage_configs_route_by_gender_to_one_expert_per_gender(output_dir):
    cfg = compose_train(["hierarchy=gender", 'hierarchy.router_overrides=["model.blocks=3"]'])
    stages = stage_configs(cfg, parent_run_id="abc")
    assert [s.name for s in stages] == ["router-gender", "expert-male", "expert-female"]
    router, *experts = stages
    assert router.cfg.task.target == "gender" and router.cfg.model.blocks == 3
    assert [e.cfg.data.subset for e in experts] == [{"gender": 0}, {"gender": 1}]
    assert all(e.cfg.task.target == "age" and e.cfg.model.blocks == cfg.model.blocks for e in experts)
    assert all(s.cfg.tracking.tags["mlflow.parentRunId"] == "abc" for s in stages)
    assert all(s.cfg.hierarchy.by is None for s in stages), "a stage is a flat run"
    eth = stage_configs(compose_train(["hierarchy=ethnicity"]))
    assert len(eth) == 6 and eth[0].cfg.task.target == "ethnicity"


def test_bad_hierarchy_settings_are_named(output_dir):
    with pytest.raises(HierarchyError, match="hierarchy.by='age'"):
        stage_configs(compose_train(["hierarchy=gender", "hierarchy.by=age"]))
    with pytest.raises(HierarchyError, match="task.target='gender'"):
        stage_configs(compose_train(["hierarchy=gender", "task=gender"]))
    df = pd.DataFrame({"gender": [0, 1, None], "age": [3, 30, 50]})
    assert subset_labels(np.array([0, 1, 2]), df, {"gender": 1}).tolist() == [-1, 1, -1]
    with pytest.raises(DataError, match="data.subset.race"):
        subset_labels(np.array([0, 1, 2]), df, {"race": 1})
    with pytest.raises(DataError, match="selects no row"):
        subset_labels(np.array([0, 1, 2]), df, {"gender": 7})


@pytest.mark.slow
def test_hierarchy_trains_only_on_training_faces_of_one_split(output_dir, tmp_path, monkeypatch):
    """The leak test: every stage's training rows are training-split rows of the one persisted manifest
    (experts: only their group's), all stages read the same manifest, and MLflow nests them."""
    seen: list[np.ndarray] = []
    original = FaceDataModule.train_dataloader

    def spy(self):
        seen.append(self.indices["train"].copy())
        return original(self)

    monkeypatch.setattr(FaceDataModule, "train_dataloader", spy)
    cfg = compose_train(
        [
            *FAST_OVERRIDES,
            "trainer.max_epochs=2",
            "hierarchy=gender",
            "tracking.experiment=hier",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/art",
        ]
    )
    summary = run_hierarchy(cfg, tmp_path / "run")

    from agecls.data.prepare import prepare_data

    df = prepare_data(cfg.data, cfg.paths).manifest.df
    assert len(seen) == 3, "router + 2 experts each built one training loader"
    for rows in seen:
        assert set(df["split"].iloc[rows]) == {"train"}, "a stage trained on a val/test face"
    router_rows, male_rows, female_rows = seen
    assert len(router_rows) == int((df["split"] == "train").sum())
    assert set(df["gender"].iloc[male_rows]) == {0} and set(df["gender"].iloc[female_rows]) == {1}
    assert len(male_rows) + len(female_rows) == len(router_rows)

    stages = summary["stages"]
    assert set(stages) == {"router-gender", "expert-male", "expert-female"}
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")  # the hierarchy's own composed config
    assert saved.hierarchy.by == "gender" and saved.task.target == "age"
    for r in stages.values():  # what bench/levers.py reads of a hierarchy run
        assert r["best_epoch"] >= 1 and r["epochs_trained"] >= 1 and r["fit_seconds"] > 0, r
        assert set(r["data_sizes"]) >= {"train", "val"}
    assert 0.0 <= summary["test/macro_f1"] <= 1.0 and 0.0 <= summary["test/router_acc"] <= 1.0
    assert "test/oracle/macro_f1" in summary and summary["objective"] == summary["val/macro_f1"]
    assert (
        json.loads((tmp_path / "run" / "results.json").read_text())["mlflow_run_id"]
        == summary["mlflow_run_id"]
    )

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["hier"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("agecls.role") == "hierarchy"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["data.manifest_hash"] for r in children}) == 1, "one persisted split"
    assert "test/macro_f1" in parent[0].data.metrics
