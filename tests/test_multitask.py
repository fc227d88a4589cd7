"""task=multitask: shared trunk, one head per attribute, masked missing attributes, per-attribute metrics,
one objective; a fast end-to-end run, its checkpoint and agecls-eval; the V19 experiment file."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.cli.eval import parse_args
from agecls.data.datamodule import FaceDataModule
from agecls.data.synthetic import generate_synthetic
from agecls.evaluation.evaluate import evaluate
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES
from agecls.tasks.heads import AGE_HEADS
from agecls.tasks.module import FaceClassifier
from agecls.tasks.multitask import loss_weights, objective_attribute, target_columns
from agecls.training.train import train

AGE7 = ["0-2", "3-6", "7-14", "15-30", "31-40", "41-65", "66-116"]
NAMES = {"age": AGE7, "gender": list(GENDER_NAMES), "ethnicity": list(ETHNICITY_NAMES)}


def _module(*overrides: str) -> FaceClassifier:
    cfg = compose_train([*FAST_OVERRIDES, "task=multitask", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return FaceClassifier(resolved, NAMES, age_stats={"mean": 30.0, "std": 20.0})


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 32, 32, generator=g)
    years = torch.randint(0, 100, (n,), generator=g)
    age = torch.bucketize(years, torch.tensor([3, 7, 15, 31, 41, 66]), right=True)
    gender = torch.randint(0, 2, (n,), generator=g)
    ethnicity = torch.randint(0, 5, (n,), generator=g)
    ethnicity[:2] = -1  # two faces without ethnicity (as 3 UTKFace files)
    return x, torch.stack([age, gender, ethnicity], dim=1)


def test_missing_attributes_are_masked_out_of_their_loss_only():
    module = _module()
    module.eval()
    x, y = _batch()
    with torch.no_grad():
        out = module.outputs(x)
    assert {a: t.shape for a, t in out.items()} == {"age": (6, 7), "gender": (6, 2), "ethnicity": (6, 5)}
    total, parts = module.total_loss(out, module.targets(y))
    assert len(parts["ethnicity"]["labels"]) == 4 and len(parts["age"]["labels"]) == 6
    assert total == pytest.approx(float(sum(p["loss"] for p in parts.values())))
    # The faces lacking ethnicity may predict anything for it: the loss does not change.
    changed = {**out, "ethnicity": out["ethnicity"].clone()}
    changed["ethnicity"][:2] = 100.0 * torch.randn(2, 5)
    assert module.total_loss(changed, module.targets(y))[0] == pytest.approx(float(total))
    # A batch where no face has ethnicity trains age and gender only.
    y[:, 2] = -1
    _, parts = module.total_loss(out, module.targets(y))
    assert set(parts) == {"age", "gender"}


def test_loss_weights_objective_and_columns_come_from_config():
    module = _module("task.weights.gender=0.5", "task.weights.ethnicity=0", "task.objective=gender")
    assert module.loss_weights == {"age": 1.0, "gender": 0.5, "ethnicity": 0.0}
    assert module.objective == "gender"
    x, y = _batch()
    with torch.no_grad():
        total, parts = module.total_loss(module.outputs(x), module.targets(y))
    assert total == pytest.approx(float(parts["age"]["loss"] + 0.5 * parts["gender"]["loss"]))
    task = compose_train(["task=multitask", "task.objective=height"]).task
    with pytest.raises(ValueError, match="task.objective='height'"):
        objective_attribute(task)
    task = compose_train(["task=multitask", "+task.weights.height=1"]).task
    with pytest.raises(ValueError, match="task.weights has \\['height'\\]"):
        loss_weights(task)
    assert target_columns(compose_train(["task=multitask", "task.head=regression"]).task) == [
        "age",
        "gender",
        "ethnicity",
        "age_years",
    ]


@pytest.mark.parametrize("head", AGE_HEADS)
def test_every_age_head_fits_on_the_shared_trunk(head):
    module = _module(f"task.head={head}")
    x, y = _batch()
    if head in ("regression", "label_distribution"):
        y = torch.cat([y, torch.tensor([[1], [5], [20], [33], [50], [90]])], dim=1)
    total, _ = module.total_loss(module.outputs(x), module.targets(y))
    total.backward()
    assert module.model.features[0][0].weight.grad is not None  # the trunk learns from every head
    proba = module.predict_proba(x)
    assert {a: p.shape for a, p in proba.items()} == {"age": (6, 7), "gender": (6, 2), "ethnicity": (6, 5)}


def test_datamodule_keeps_a_face_that_lacks_one_attribute():
    images = np.zeros((6, 8, 8, 1), dtype=np.uint8)
    labels = np.array([[0, 1, 2], [1, 0, -1], [2, 1, 0], [0, 0, 1], [-1, -1, -1], [1, 1, 1]])
    split = np.array(["train", "train", "train", "val", "train", "test"])
    dm = FaceDataModule(images, labels, split, 7, batch_size=8, weighted_sampler=True)
    assert dm.indices["train"].tolist() == [0, 1, 2]  # row 4 has no label at all
    assert dm.split_labels("train").tolist() == [0, 1, 2]
    x, y = next(iter(dm.eval_dataloader("train")))
    assert y.tolist() == labels[:3].tolist()
    assert len(next(iter(dm.train_dataloader()))[1]) == 3


@pytest.fixture(scope="module")
def multitask_run(output_dir) -> dict:
    overrides = [*FAST_OVERRIDES, "trainer.max_epochs=2", "tracking.experiment=multitask", "task=multitask"]
    return train(compose_train(overrides))


@pytest.mark.slow
def test_multitask_trains_scores_every_attribute_and_reloads(multitask_run, output_dir):
    results = multitask_run
    run_dir = Path(results["run_dir"])
    for attr in ("age", "gender", "ethnicity"):
        for split in ("train", "val", "test"):
            assert (run_dir / f"per_class_{split}_{attr}.csv").is_file()
        assert (run_dir / f"confusion_{attr}.png").is_file(), "one figure per attribute, a panel per split"
        for key in ("best_val", "test", "best_train"):
            assert 0.0 <= results[f"{key}/{attr}/macro_f1"] <= 1.0
        assert sum(map(sum, results["confusion_test"][attr])) == results["data_sizes"]["test"]
    assert results["class_names"] == NAMES
    # The objective attribute (age) is also scored unprefixed: objective, checkpoint, early stopping.
    assert results["test/macro_f1"] == results["test/age/macro_f1"]
    assert results["objective"] == pytest.approx(results["best_val/age/macro_f1"], abs=1e-6)
    assert (run_dir / "fairness_test.csv").is_file()  # age macro-F1 by gender and by ethnicity
    assert {row["attribute"] for row in results["fairness_test"]} == {"gender", "ethnicity"}
    assert json.loads((run_dir / "results.json").read_text())["test/gender/macro_f1"] == pytest.approx(
        results["test/gender/macro_f1"]
    )
    # Face-level predictions: every attribute's label, prediction and probabilities in one line per face.
    table = pd.read_csv(run_dir / "predictions_test.csv")
    assert len(table) == results["data_sizes"]["test"]
    for attr in ("age", "gender", "ethnicity"):
        proba = table[[f"p_{attr}_{name}" for name in NAMES[attr]]].to_numpy()
        assert abs(proba.sum(axis=1) - 1).max() < 1e-3
        known = table[f"label_{attr}"] >= 0
        cm = pd.crosstab(table.loc[known, f"label_{attr}"], table.loc[known, f"pred_{attr}"])
        assert int(cm.to_numpy().sum()) == sum(map(sum, results["confusion_test"][attr]))

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    run = client.get_run(results["mlflow_run_id"])
    for key in ("val/age/macro_f1", "val/gender/macro_f1", "val/ethnicity/acc", "val/macro_f1"):
        assert key in run.data.metrics, key
    assert "test/age/macro_f1_by_gender/male" in run.data.metrics

    model = FaceClassifier.load_from_checkpoint(results["checkpoint"], map_location="cpu")
    assert model.multitask and model.attributes == ("age", "gender", "ethnicity")
    x = torch.zeros(2, 1, 32, 32)
    assert {a: t.shape for a, t in model(x).items()} == {"age": (2, 7), "gender": (2, 2), "ethnicity": (2, 5)}
    assert {a: p.shape[1] for a, p in model.predict_proba(x).items()} == {
        "age": 7,
        "gender": 2,
        "ethnicity": 5,
    }


@pytest.mark.slow
def test_agecls_eval_scores_every_attribute_of_a_multitask_checkpoint(multitask_run, tmp_path_factory):
    folder = generate_synthetic(tmp_path_factory.mktemp("fresh-mt") / "faces", 40, seed=9)
    ckpt = multitask_run["checkpoint"]
    result = evaluate(parse_args([f"ckpt={ckpt}", f"data.root={folder}", "tracking.enabled=false"]))
    assert result["task"] == "multitask" and result["objective_attribute"] == "age"
    assert set(result["attributes"]) == {"age", "gender", "ethnicity"}
    assert result["macro_f1"] == result["attributes"]["age"]["macro_f1"]
    assert sum(map(sum, result["attributes"]["gender"]["confusion_matrix"])) == 40


def test_the_v19_experiment_composes():
    cfg = compose_train(["experiment=multitaskcnn"])
    assert cfg.task.name == "multitask" and list(cfg.task.attributes) == ["age", "gender", "ethnicity"]
    assert cfg.model.name == "basic_cnn" and cfg.model.hidden == 132 and cfg.model.blocks == 4
    assert cfg.optimizer._target_ == "torch.optim.NAdam" and cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.objective.metric == "val/macro_f1" and cfg.task.objective == "age"


def test_prediction_table_of_a_head_predicting_years():
    from agecls.evaluation.splits import prediction_table

    predicted = {
        "age": {
            "preds": torch.tensor([0, 2]),
            "labels": torch.tensor([0, 1]),
            "proba": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
            "years": torch.tensor([1.234, 40.0]),
            "true_years": torch.tensor([2, 20]),
        }
    }
    paths = np.array(["a.jpg", "b.jpg", "c.jpg"])
    table = prediction_table(predicted, np.array([2, 0]), paths, False, {"age": ["0-2", "3-30", "31-116"]})
    assert list(table.columns) == [
        "row", "path", "label", "pred", "years", "pred_years", "p_0-2", "p_3-30", "p_31-116"
    ]  # fmt: skip
    assert table["path"].tolist() == ["c.jpg", "a.jpg"] and table["pred_years"].tolist() == [1.23, 40.0]
    assert table["p_31-116"].tolist() == [0.0, 1.0]
