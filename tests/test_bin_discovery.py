"""Bin discovery: the exact DP against brute force, constraints, a planted structure, and `agecls-bins`."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.cli import bins as bins_cli
from agecls.data.bins import AgeBins
from agecls.evaluation.bin_discovery import (
    Constraints,
    DiscoveryError,
    SegmentScores,
    discover,
    merge_confusion,
    parse_fine_ranges,
    score_ranges,
)
from agecls.metrics import stage_report


def _fine(widths: list[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for w in widths:
        out.append((lo, lo + w - 1))
        lo += w
    return out


def _brute(cm: np.ndarray, fine, k: int, c: Constraints) -> float:
    """Best mean F1 over every contiguous grouping into k bins that satisfies the constraints."""
    n = len(fine)
    scores = SegmentScores(cm)
    best = -np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        segs = [(bounds[b], bounds[b + 1] - 1) for b in range(k)]
        starts = {fine[i][0] for i, _ in segs}
        if any(fine[0][0] < e <= fine[-1][1] and e not in starts for e in c.fixed_edges):
            continue
        if any(scores.true_count(i, j) < c.min_count for i, j in segs):
            continue
        if c.max_width is not None and any(
            j > i and fine[j][1] - fine[i][0] + 1 > c.max_width for i, j in segs
        ):
            continue
        # The F1 of each bin, computed from the merged k x k matrix (not from the segment formula).
        merged = merge_confusion(cm, segs)
        tp, rows, cols = np.diag(merged), merged.sum(1), merged.sum(0)
        f1 = np.divide(2 * tp, rows + cols, out=np.zeros(k), where=(rows + cols) > 0)
        best = max(best, float(f1.mean()))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 9))
    fine = _fine(rng.integers(1, 4, size=n).tolist())
    cm = rng.poisson(rng.uniform(0.5, 6.0, size=(n, n)) + np.eye(n) * rng.uniform(2, 12)).astype(float)
    last = fine[-1][1]
    settings = [
        Constraints(min_count=0),
        Constraints(min_count=1),
        Constraints(min_count=int(cm.sum(1).mean())),
        Constraints(max_width=int(rng.integers(2, 7))),
        Constraints(fixed_edges=(fine[int(rng.integers(1, n))][0],)),
        Constraints(
            min_count=int(cm.sum(1).min()) + 1, max_width=last // 2 + 2, fixed_edges=(fine[n // 2][0],)
        ),
    ]
    checked = 0
    for c in settings:
        for k in range(1, n + 1):
            expected = _brute(cm, fine, k, c)
            if not np.isfinite(expected):
                with pytest.raises(DiscoveryError, match="no grouping"):
                    discover(cm, fine, k, c)
                continue
            result = discover(cm, fine, k, c)
            assert result.best.macro_f1 == pytest.approx(expected, abs=1e-12), (c, k)
            # One DP gives every k: the table agrees with brute force too.
            for kk, g in result.by_k.items():
                want = _brute(cm, fine, kk, c)
                assert (g is None) == (not np.isfinite(want))
                if g is not None:
                    assert g.macro_f1 == pytest.approx(want, abs=1e-12)
            checked += 1
    assert checked >= 10


def test_constraints_are_respected():
    rng = np.random.default_rng(3)
    fine = _fine([3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 20])
    n = len(fine)
    cm = rng.poisson(4.0, size=(n, n)).astype(float) + np.diag(rng.integers(0, 30, size=n))
    c = Constraints(min_count=60, max_width=8, fixed_edges=(13,))
    result = discover(cm, fine, 5, c)
    for g in result.by_k.values():
        if g is None:
            continue
        assert 13 in [lo for lo, _ in g.ranges]
        for (i, j), (lo, hi), n_true in zip(g.segments, g.ranges, g.support, strict=True):
            assert n_true >= 60 and n_true == int(cm[i : j + 1].sum())
            assert i == j or hi - lo + 1 <= 8  # a single fine class (the 20-year one) is always allowed
        assert AgeBins(g.ranges, min_age=0, max_age=fine[-1][1]).n == g.k


def test_a_planted_block_structure_is_recovered_exactly():
    fine = _fine([3] + [2] * 14 + [10])
    blocks = [(0, 1), (2, 4), (5, 5), (6, 9), (10, 12), (13, 15)]
    n = len(fine)
    rng = np.random.default_rng(0)
    cm = rng.poisson(0.3, size=(n, n)).astype(float)  # a little noise everywhere
    for i, j in blocks:
        cm[i : j + 1, i : j + 1] += rng.integers(15, 25, size=(j - i + 1, j - i + 1))
    result = discover(cm, fine, len(blocks))
    assert result.best.segments == blocks
    assert all(f > 0.6 for f in result.best.f1)


def test_expected_f1_equals_rescoring_the_predictions_with_merged_labels():
    rng = np.random.default_rng(1)
    fine = _fine([2] * 9)
    truth = rng.integers(0, 9, size=600)
    preds = np.clip(truth + rng.integers(-2, 3, size=600), 0, 8)
    cm = stage_report(torch.tensor(preds), torch.tensor(truth), [f"{a}-{b}" for a, b in fine]).confmat
    best = discover(cm, fine, 3).best
    ids = np.concatenate([np.full(j - i + 1, b) for b, (i, j) in enumerate(best.segments)])
    rescored = stage_report(torch.tensor(ids[preds]), torch.tensor(ids[truth]), best.labels)
    assert best.macro_f1 == pytest.approx(rescored.metrics["macro_f1"], abs=1e-6)
    assert score_ranges(cm, fine, best.ranges).f1 == pytest.approx(best.f1)


def test_bad_inputs_name_the_problem():
    fine = _fine([2, 2, 2, 2])
    cm = np.eye(4) * 5 + 1
    with pytest.raises(DiscoveryError, match="k=5"):
        discover(cm, fine, 5)
    with pytest.raises(DiscoveryError, match="fixed_edges: 3 is not a boundary"):
        discover(cm, fine, 2, Constraints(fixed_edges=(3,)))
    with pytest.raises(DiscoveryError, match=r"min_count=100.*no k is feasible"):
        discover(cm, fine, 2, Constraints(min_count=100))
    with pytest.raises(DiscoveryError, match=r"max_width=2 .*feasible k under these constraints: 4"):
        discover(cm, fine, 2, Constraints(max_width=2))
    with pytest.raises(DiscoveryError, match="not age ranges"):
        parse_fine_ranges(["male", "female"])
    with pytest.raises(DiscoveryError, match="square"):
        discover(np.ones((3, 4)), fine, 2)


# --- the console script, on a real (short) run trained with bins=pairs ------------------------------


@pytest.fixture(scope="module")
def pairs_run(output_dir) -> dict:
    from agecls.training.train import train

    cfg = compose_train([*FAST_OVERRIDES, "bins=pairs", "trainer.max_epochs=2", "tracking.experiment=bins"])
    return train(cfg)


@pytest.mark.slow
def test_propose_end_to_end_writes_a_usable_bins_config(pairs_run, tmp_path, capsys):
    run_dir = Path(pairs_run["run_dir"])
    out = tmp_path / "bins"
    rc = bins_cli.main(
        ["propose", f"run={run_dir}", "k=4", "name=disc4", f"out={out}", "compare=[[0,12],[13,60],[61,116]]"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation confusion matrix" in text and "never used to choose bins" in text
    assert "not comparable" in text
    assert "For comparison, given bins" in text and "61-116" in text
    config = yaml.safe_load((out / "disc4.yaml").read_text())
    bins = AgeBins.from_config(config)
    assert bins.n == 4 and bins.name == "disc4"
    for png in ("disc4_confusion.png", "disc4_tradeoff.png"):
        assert (out / png).stat().st_size > 5000, png
    assert (out / "disc4_tradeoff.csv").read_text().count("\n") == 31 - 1 + 1  # header + k=2..31
    # The printed per-bin F1 matches the algorithm on the run's validation matrix.
    results = json.loads((run_dir / "results.json").read_text())
    fine = parse_fine_ranges(results["class_names"])
    best = discover(results["confusion_val"], fine, 4).best
    assert list(bins.ranges) == best.ranges
    assert f"{best.macro_f1:.3f}" in text

    # The same run by its results.json and by its MLflow run id give the same bins.
    for run in (run_dir / "results.json", pairs_run["mlflow_run_id"]):
        assert bins_cli.main(["propose", f"run={run}", "k=4", "name=again", f"out={out}"]) == 0
        assert AgeBins.from_config(yaml.safe_load((out / "again.yaml").read_text())) == bins


@pytest.mark.slow
def test_install_copies_into_conf_bins_and_never_overwrites(pairs_run, tmp_path, monkeypatch, capsys):
    import agecls.config

    conf = tmp_path / "conf"
    shutil.copytree(agecls.config.CONFIG_DIR / "bins", conf / "bins")
    monkeypatch.setattr(agecls.config, "CONFIG_DIR", conf)
    args = ["propose", f"run={pairs_run['run_dir']}", "k=3", f"out={tmp_path / 'o'}"]
    assert bins_cli.main([*args, "name=mine", "--install"]) == 0
    assert AgeBins.from_config(yaml.safe_load((conf / "bins" / "mine.yaml").read_text())).n == 3
    capsys.readouterr()
    assert bins_cli.main([*args, "name=seed7", "install=true"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert AgeBins.from_config(yaml.safe_load((conf / "bins" / "seed7.yaml").read_text())).n == 7


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["k=40"], "k=40 is larger than the 31 fine classes"),
        (["k=4", "min_count=100000"], "min_count=100000"),
        (["k=4", "fixed_edges=[18]"], "fixed_edges: 18 is not a boundary"),
        (["k=30", "max_width=2"], "max_width=2"),
        (["k=4", "split=test"], "split=test"),
        (["k=1"], "k=1 must be at least 2"),
        (["k=4", "colour=red"], "unknown key 'colour'"),
        (["k=4", "compare=seed7"], "compare='seed7': bin 41-65 does not fall on fine-class edges"),
    ],
)
def test_bad_arguments_give_clear_errors(pairs_run, tmp_path, capsys, extra, message):
    rc = bins_cli.main(["propose", f"run={pairs_run['run_dir']}", f"out={tmp_path}", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_a_missing_run_is_named(tmp_path, capsys, output_dir):
    assert bins_cli.main(["propose", f"run={tmp_path / 'nope'}", "k=4"]) == 2
    assert "run=" in capsys.readouterr().err
    assert bins_cli.main(["propose", "run=0123456789abcdef0123456789abcdef", "k=4"]) == 2
    assert "no MLflow run with that id" in capsys.readouterr().err
    assert bins_cli.main(["propose", "k=4"]) == 2
    assert "run=" in capsys.readouterr().err
