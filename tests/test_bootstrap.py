"""bootstrap_ci: point estimates agree with stage_report, intervals are seeded, sane and shrink with n."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agecls.evaluation.bootstrap import bootstrap_ci, bootstrap_diff
from agecls.metrics import stage_report


def noisy_preds(n: int, n_classes: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, n_classes, n)
    wrong = rng.random(n) > accuracy
    preds = np.where(wrong, rng.integers(0, n_classes, n), target)
    return preds, target


def test_perfect_predictions_have_a_zero_width_interval():
    target = np.array([0, 1, 2, 2, 1, 0, 1])
    for metric in ("macro_f1", "acc"):
        assert bootstrap_ci(target, target, 3, metric=metric, n=200) == (1.0, 1.0, 1.0)


def test_known_case_matches_hand_computed_scores():
    # class 0: tp 1, fp 1, fn 1 -> F1 0.5; class 1: tp 2, fp 1, fn 1 -> F1 2/3; class 2 absent: left out.
    preds = np.array([0, 1, 1, 1, 0])
    target = np.array([0, 1, 1, 0, 1])
    point, lo, hi = bootstrap_ci(preds, target, 3, n=500)
    assert point == pytest.approx((0.5 + 2 / 3) / 2)
    assert bootstrap_ci(preds, target, 3, metric="acc", n=50)[0] == pytest.approx(0.6)
    assert 0.0 <= lo <= point <= hi <= 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_equals_stage_report(seed):
    preds, target = noisy_preds(700, 7, 0.5, seed)
    preds[preds == 6] = 5  # a class never predicted, still present in the truth
    report = stage_report(torch.as_tensor(preds), torch.as_tensor(target), [str(i) for i in range(7)])
    for metric in ("macro_f1", "acc"):
        point, lo, hi = bootstrap_ci(preds, target, 7, metric=metric, n=300, seed=seed)
        assert point == pytest.approx(report.metrics[metric], abs=1e-6)
        assert lo <= point <= hi


def test_same_seed_same_interval_other_seed_differs():
    preds, target = noisy_preds(400, 4, 0.6, 0)
    a = bootstrap_ci(preds, target, 4, n=400, seed=3)
    assert bootstrap_ci(torch.as_tensor(preds), list(target), 4, n=400, seed=3) == a
    assert bootstrap_ci(preds, target, 4, n=400, seed=4) != a


def test_interval_narrows_with_more_rows():
    widths = []
    for rows in (200, 5000):
        preds, target = noisy_preds(rows, 7, 0.6, 1)
        _, lo, hi = bootstrap_ci(preds, target, 7, n=400)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~1/sqrt(25) = 1/5 in theory


def test_chunked_resampling_equals_unchunked(monkeypatch):
    import agecls.evaluation.bootstrap as bs

    preds, target = noisy_preds(300, 5, 0.5, 2)
    whole = bootstrap_ci(preds, target, 5, n=100, seed=9)
    monkeypatch.setattr(bs, "_MAX_CELLS", 300 * 7)  # 7 resamples per chunk
    chunked = bootstrap_ci(preds, target, 5, n=100, seed=9)
    # Same draws in the same order; only how many rows are scored at once differs.
    assert chunked[0] == whole[0]
    assert chunked[1:] == pytest.approx(whole[1:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "f2"}, "metric='f2'; valid: macro_f1, acc"),
        ({"n": 0}, "n=0"),
        ({"alpha": 1.0}, "alpha=1.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci([0, 1], [0, 1], 2, **kwargs)


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="preds .* outside 0..1"):
        bootstrap_ci([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci([0, 1, 1], [0, 1], 2)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([], [], 2)


# ---- bootstrap_diff: the paired difference of two models on the same rows ----------------------------------


def test_diff_of_a_model_with_itself_is_exactly_zero():
    preds, target = noisy_preds(500, 7, 0.5, 0)
    got = bootstrap_diff(preds, preds, target, 7, n=200)
    assert (got["diff"], got["lo"], got["hi"]) == (0.0, 0.0, 0.0)
    assert got["p_a_not_better"] == 1.0


def test_diff_point_is_the_difference_of_the_two_scores():
    preds_b, target = noisy_preds(800, 5, 0.5, 1)
    preds_a = np.where(np.random.default_rng(2).random(800) < 0.2, target, preds_b)  # A fixes 20% of rows
    for metric in ("macro_f1", "acc"):
        got = bootstrap_diff(preds_a, preds_b, target, 5, metric=metric, n=300)
        a = bootstrap_ci(preds_a, target, 5, metric=metric, n=1)[0]
        b = bootstrap_ci(preds_b, target, 5, metric=metric, n=1)[0]
        assert got["diff"] == pytest.approx(a - b)
        assert 0 < got["lo"] <= got["diff"] <= got["hi"]
        assert got["p_a_not_better"] == 0.0  # A is never worse on any resample: it only fixes rows


def test_paired_interval_is_narrower_than_the_separate_ones():
    # Two models that agree on most faces: separate intervals overlap, the paired one excludes zero.
    preds_b, target = noisy_preds(1500, 7, 0.55, 3)
    rng = np.random.default_rng(4)
    preds_a = np.where(rng.random(1500) < 0.06, target, preds_b)
    _, a_lo, a_hi = bootstrap_ci(preds_a, target, 7, n=500)
    _, b_lo, b_hi = bootstrap_ci(preds_b, target, 7, n=500)
    assert a_lo < b_hi  # the separate intervals overlap ...
    got = bootstrap_diff(preds_a, preds_b, target, 7, n=500)
    assert got["lo"] > 0  # ... the paired difference does not include zero
    assert got["hi"] - got["lo"] < (a_hi - a_lo) / 2


def test_diff_is_seeded_and_antisymmetric():
    preds_a, target = noisy_preds(400, 4, 0.6, 5)
    preds_b, _ = noisy_preds(400, 4, 0.6, 6)
    one = bootstrap_diff(preds_a, preds_b, target, 4, n=300, seed=1)
    assert bootstrap_diff(preds_a, preds_b, target, 4, n=300, seed=1) == one
    other = bootstrap_diff(preds_b, preds_a, target, 4, n=300, seed=1)
    assert other["diff"] == pytest.approx(-one["diff"])
    assert (other["lo"], other["hi"]) == pytest.approx((-one["hi"], -one["lo"]))


def test_diff_refuses_rows_of_different_lengths():
    with pytest.raises(ValueError, match=r"preds_a \(3\), preds_b \(2\) and target \(3\) differ in length"):
        bootstrap_diff([0, 1, 1], [0, 1], [0, 1, 1], 2)
    with pytest.raises(ValueError, match="metric='f2'"):
        bootstrap_diff([0], [0], [0], 2, metric="f2")
