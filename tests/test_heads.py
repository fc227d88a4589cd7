"""Age heads (task.head): losses and decoding of each head, then a fast training run per head, checkpoint
reload and agecls-eval on a head checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.cli.eval import parse_args
from agecls.data.bins import AgeBins
from agecls.data.synthetic import generate_synthetic
from agecls.evaluation.evaluate import evaluate
from agecls.tasks.heads import (
    AGE_HEADS,
    CoralHead,
    CornHead,
    LabelDistributionHead,
    RegressionHead,
    build_head,
)
from agecls.tasks.module import FaceClassifier
from agecls.training.train import train

BINS = AgeBins.named("seed7")  # 0-2, 3-6, 7-14, 15-30, 31-40, 41-65, 66-116
K = BINS.n


def _random_labels(n: int = 64) -> torch.Tensor:
    return torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("head_cls", [CoralHead, CornHead])
def test_ordinal_heads_decode_monotonically_and_learn_their_targets(head_cls):
    head = head_cls(K)
    assert head.out_features == (1 if head_cls is CoralHead else K - 1)
    # Raising the shared score (CORAL) or every logit (CORN) never lowers the decoded bin.
    scores = torch.linspace(-8, 8, 200).unsqueeze(1)
    raw = scores if head_cls is CoralHead else scores.expand(-1, K - 1)
    decoded = head.decode(head(raw))
    assert torch.all(decoded[1:] >= decoded[:-1]) and decoded[0] == 0 and decoded[-1] == K - 1
    proba = head.proba(head(raw))
    assert proba.shape == (200, K) and torch.allclose(proba.sum(1), torch.ones(200), atol=1e-5)
    assert (proba >= 0).all()

    # Logits that say "above bin k" exactly for k < label decode to the label, with a small loss.
    labels = _random_labels()
    levels = (labels.unsqueeze(1) > torch.arange(K - 1)).float()
    if head_cls is CoralHead:
        logits = 20 * levels - 10
    else:  # conditional logits: task k is confident above the label, undefined (any) beyond it
        logits = torch.where(labels.unsqueeze(1) > torch.arange(K - 1), 10.0, -10.0)
    assert torch.equal(head.decode(logits), labels)
    assert head.loss(logits, labels) < 1e-3
    assert head.loss(-logits, labels) > 1.0


def test_corn_trains_task_k_only_on_faces_above_bin_k_minus_1():
    head = CornHead(3)
    labels = torch.tensor([0, 0, 0, 2])
    # Task 1 (above bin 1 | above bin 0) sees only the face with label 2; its wrong logit must cost.
    logits = torch.tensor([[-10.0, 99.0], [-10.0, 99.0], [-10.0, 99.0], [10.0, -10.0]])
    assert head.loss(logits, labels) > 1.0
    logits[3, 1] = 10.0
    assert head.loss(logits, labels) < 1e-3  # task 1's logits for label-0 faces do not matter


def test_regression_decodes_exact_age_into_the_configured_bins():
    head = RegressionHead(BINS, mean=30.0, std=15.0, loss="l1")
    ages = torch.tensor([0.0, 2.4, 2.6, 6.0, 14.0, 15.0, 40.4, 65.0, 66.0, 116.0, 150.0, -5.0])
    logits = ((ages - 30.0) / 15.0).unsqueeze(1)
    years = head.years(logits)
    assert years.max() <= 116 and years.min() >= 0  # clipped to the bins' range
    expected = BINS.index(np.clip(np.round(ages.numpy()), 0, 116).astype(np.int64))
    assert head.decode(logits).tolist() == expected.tolist()
    assert torch.equal(head.proba(logits).argmax(1), head.decode(logits))  # one-hot on the decoded bin
    exact = torch.tensor([20.0, 50.0])
    perfect = ((exact - 30.0) / 15.0).unsqueeze(1)
    assert head.loss(perfect, BINS_index(exact), exact) < 1e-6
    assert head.loss(perfect + 1.0, BINS_index(exact), exact) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="regression_loss"):
        RegressionHead(BINS, 30.0, 15.0, loss="huber")


def BINS_index(years: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(BINS.index(years.long().numpy()))


def test_label_distribution_expectation_bins_and_kl():
    head = LabelDistributionHead(BINS, sigma=2.0)
    assert head.out_features == 117
    years = torch.tensor([1.0, 25.0, 70.0])
    target = head.target_distribution(years)
    assert torch.allclose(target.sum(1), torch.ones(3)) and target.argmax(1).tolist() == [1, 25, 70]
    logits = target.clamp_min(1e-30).log()  # the Gaussian itself: its expectation is the age
    assert head.years(logits)[1:].tolist() == pytest.approx([25.0, 70.0], abs=1e-3)
    assert head.decode(logits).tolist() == BINS.index([1, 25, 70]).tolist()
    assert head.loss(logits, BINS_index(years), years) < 1e-5
    assert head.loss(torch.zeros(3, 117), BINS_index(years), years) > 1.0
    proba = head.proba(logits)  # the year distribution summed within each bin
    assert proba.shape == (3, K) and torch.allclose(proba.sum(1), torch.ones(3))
    # A point mass on age 10 (bin 7-14) puts all the probability on that bin.
    point = torch.full((1, 117), -50.0)
    point[0, 10] = 50.0
    assert head.proba(point)[0, 2] == pytest.approx(1.0) and head.years(point).item() == pytest.approx(10.0)


def test_build_head_names_valid_choices_and_refuses_misuse():
    with pytest.raises(ValueError, match="task.head='ordinal'; valid: classification, coral"):
        build_head("ordinal", K, bins=BINS)
    with pytest.raises(ValueError, match="age head"):
        build_head("coral", 2, target="gender")
    with pytest.raises(ValueError, match="sampler.class_weights"):
        build_head("corn", K, class_weights=[1.0] * K)
    for kind in AGE_HEADS:
        head = build_head(kind, K, bins=BINS, age_stats={"mean": 30.0, "std": 20.0})
        raw = torch.randn(5, head.out_features)
        logits = head(raw)
        assert head.decode(logits).shape == (5,) and head.proba(logits).shape == (5, K)
        assert head.loss(logits, _random_labels(5), torch.tensor([1.0, 20.0, 35.0, 60.0, 90.0])).isfinite()


# ---- end to end -------------------------------------------------------------------------------------


def _train(head: str, experiment: str = "heads", *extra: str) -> dict:
    overrides = [*FAST_OVERRIDES, "trainer.max_epochs=2", f"tracking.experiment={experiment}"]
    return train(compose_train([*overrides, f"task.head={head}", *extra]))


@pytest.fixture(scope="module")
def head_runs(output_dir) -> dict[str, dict]:
    return {head: _train(head) for head in ("coral", "corn", "regression", "label_distribution")}


@pytest.mark.slow
@pytest.mark.parametrize("head", ["coral", "corn", "regression", "label_distribution"])
def test_every_head_trains_scores_bins_and_reloads(head, head_runs):
    results = head_runs[head]
    run_dir = Path(results["run_dir"])
    for name in ("results.json", "per_class_test.csv", "confusion.png", "fairness_test.csv"):
        assert (run_dir / name).is_file(), name
    assert results["class_names"] == BINS.labels
    assert 0.0 <= results["test/macro_f1"] <= 1.0
    assert results["objective"] == pytest.approx(results["best_val/macro_f1"], abs=1e-6)
    years_head = head in ("regression", "label_distribution")
    for key in ("best_val/mae", "test/mae", "best_train/mae"):
        assert (key in results) == years_head, key
    if years_head:
        assert 0 < results["test/mae"] < 116
    assert sum(map(sum, results["confusion_test"])) == results["data_sizes"]["test"]

    model = FaceClassifier.load_from_checkpoint(results["checkpoint"], map_location="cpu")
    assert model.cfg.task.head == head and model.task.class_names == tuple(BINS.labels)
    x = torch.zeros(3, 1, 32, 32)
    proba = model.predict_proba(x)["age"]
    assert proba.shape == (3, K) and torch.allclose(proba.sum(1), torch.ones(3), atol=1e-5)
    assert model.predict(x)["age"].shape == (3,)
    assert set(model.predict_years(x)) == ({"age"} if years_head else set())


@pytest.mark.slow
def test_agecls_eval_scores_a_head_checkpoint(head_runs, tmp_path_factory):
    folder = generate_synthetic(tmp_path_factory.mktemp("fresh-heads") / "faces", 40, seed=5)
    ckpt = head_runs["label_distribution"]["checkpoint"]
    result = evaluate(parse_args([f"ckpt={ckpt}", f"data.root={folder}", "tracking.enabled=false"]))
    assert result["task"] == "age" and result["n_images"] == 40
    assert sum(map(sum, result["confusion_matrix"])) == 40
    assert 0 < result["mae"] < 116
    coral = evaluate(
        parse_args(
            [f"ckpt={head_runs['coral']['checkpoint']}", f"data.root={folder}", "tracking.enabled=false"]
        )
    )
    assert "mae" not in coral and sum(map(sum, coral["confusion_matrix"])) == 40
    json.dumps(result)  # JSON-serialisable report


def test_a_classification_checkpoint_from_before_the_heads_still_loads():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_train([*FAST_OVERRIDES, "task=gender"]), resolve=True)
    module = FaceClassifier(cfg, ["male", "female"], [0.4, 0.6])
    assert set(module.state_dict()) == {k for k in module.state_dict() if k.startswith("model.")}
    # Before the heads, the cross-entropy's class weights were saved as `loss.weight`.
    checkpoint = {"state_dict": {**module.state_dict(), "loss.weight": torch.tensor([0.4, 0.6])}}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: no unexpected key left
    assert module.heads["gender"].weight.tolist() == pytest.approx([0.4, 0.6])
