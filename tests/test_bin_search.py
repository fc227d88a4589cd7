"""bins=search: Optuna draws age-bin edges per trial under constraints (agecls.training.bin_search)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES

from agecls.data.bins import AgeBins, BinsError
from agecls.evaluation.study_report import bins_vary, trials_table
from agecls.training.bin_search import EdgeSearch, InfeasibleBins, check_counts, draw_bins, search_spec


def _trials(n: int, seed: int = 0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        yield study.ask()


def test_drawn_bins_are_ordered_and_respect_width_limits():
    spec = EdgeSearch(k=6, lowest=2, highest=70, min_width=3, max_width=20)
    seen = set()
    for trial in _trials(200):
        cuts = spec.suggest(trial)
        ranges = spec.ranges(cuts)  # never infeasible without fixed edges
        bins = AgeBins(ranges)
        assert bins.n == 6 and cuts[0] >= 2 and cuts[-1] <= 70
        widths = [hi - lo + 1 for lo, hi in ranges]
        assert min(widths) >= 3 and max(widths[:-1]) <= 20
        assert list(trial.params) == [f"bins.cut{i}" for i in range(1, 6)]
        seen.add(tuple(cuts))
    assert len(seen) > 150, "the draws explore the space"


def test_fixed_edges_are_always_cuts_and_clashes_are_infeasible():
    spec = EdgeSearch(k=5, lowest=1, highest=80, min_width=2, fixed_edges=(18,))
    feasible = infeasible = 0
    for trial in _trials(200, seed=1):
        cuts = spec.suggest(trial)
        assert 18 in cuts and len(cuts) == 4
        try:
            ranges = spec.ranges(cuts)
        except InfeasibleBins as exc:
            assert "min_width" in str(exc) or "increasing" in str(exc)
            infeasible += 1
            continue
        assert [18, 116] in [[lo, hi] for lo, hi in ranges] or any(lo == 18 for lo, _ in ranges)
        feasible += 1
    assert feasible > 100 and infeasible > 0


def test_ranges_are_exact_and_constraints_named():
    spec = EdgeSearch(k=3, min_width=2, max_width=30)
    assert spec.ranges([10, 20]) == [(0, 9), (10, 19), (20, 116)], "last bin is open-ended (no max_width)"
    with pytest.raises(InfeasibleBins, match="max_width=30"):
        spec.ranges([40, 50])
    with pytest.raises(InfeasibleBins, match="min_width=2"):
        spec.ranges([10, 11])
    with pytest.raises(InfeasibleBins, match="increasing"):
        spec.ranges([20, 10])


@pytest.mark.parametrize(
    ("search", "match"),
    [
        ({"lowest": 1}, "k is required"),
        ({"k": 1}, "at least 2"),
        ({"k": 3, "bogus": 1}, "unknown key"),
        ({"k": 3, "min_width": 0}, "min_width"),
        ({"k": 3, "min_width": 5, "max_width": 2}, "max_width"),
        ({"k": 3, "lowest": 50, "highest": 10}, "lowest/highest"),
        ({"k": 3, "fixed_edges": [30, 18]}, "sorted"),
        ({"k": 3, "fixed_edges": [90]}, "within lowest..highest"),
        ({"k": 2, "fixed_edges": [10, 20]}, "no room"),
        ({"k": 30, "lowest": 1, "highest": 20, "min_width": 2}, "do not fit"),
        ({"k": "seven"}, "integer"),
    ],
)
def test_bad_search_config_names_the_key(search, match):
    with pytest.raises(BinsError, match=match):
        EdgeSearch.from_config(search)


def test_draw_bins_fills_the_config_and_needs_a_study():
    cfg = OmegaConf.create({"name": "search", "ranges": None, "search": {"k": 4, "min_width": 3}})
    with pytest.raises(BinsError, match="inside an Optuna study"):
        draw_bins(cfg, None)
    trial = next(_trials(1))
    draw_bins(cfg, trial)
    bins = AgeBins.from_config(cfg)
    assert bins.n == 4 and cfg.name.startswith("search-")
    assert trial.user_attrs["bins"] == ",".join(bins.labels)
    fixed = OmegaConf.create({"name": "seed7", "ranges": [[0, 50], [51, 116]]})
    draw_bins(fixed, trial)  # a fixed bin set is left alone
    assert search_spec(fixed) is None and fixed.ranges == [[0, 50], [51, 116]]


def test_check_counts_names_the_short_bins():
    bins = AgeBins([(0, 9), (10, 19), (20, 116)])
    labels = np.array([0] * 5 + [1] * 60 + [2] * 80)
    check_counts(bins, labels, 5)
    with pytest.raises(InfeasibleBins, match=r"0-9 \(5\)"):
        check_counts(bins, labels, 50)


@pytest.mark.slow
def test_bin_edge_study_trains_drawn_bins_and_prunes_infeasible_ones(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "agecls.cli.train",
        "-m",
        *FAST_OVERRIDES,
        "data.synthetic.n=300",
        "trainer.max_epochs=1",
        "sweep=optuna_bin_edges",
        "optuna.study_name=edges",
        "optuna.n_trials=3",
        "optuna.n_jobs=2",  # two trials at once: most of a trial is its process start-up, on one core
        "optuna/pruner=none",
        "optuna/sampler=random",
        "bins.search.k=3",
        "bins.search.highest=60",
        "bins.search.min_width=5",
        # The synthetic set's ages are spread over 1..90: a high minimum makes some draws infeasible.
        "bins.search.min_count=40",
    ]
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="edges", storage=f"sqlite:///{out}/optuna.db")
    trials = study.get_trials()
    assert len(trials) == 3 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    for t in trials:
        assert {"bins.cut1", "bins.cut2"} <= set(t.params)
        if t.state.name == "PRUNED":
            assert "min_count=40" in t.user_attrs["infeasible"]
            continue
        run_cfg = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        cuts = [t.params["bins.cut1"], t.params["bins.cut2"]]
        assert run_cfg["bins"]["ranges"] == [[0, cuts[0] - 1], [cuts[0], cuts[1] - 1], [cuts[1], 116]]
        assert t.user_attrs["bins"] == ",".join(f"{lo}-{hi}" for lo, hi in run_cfg["bins"]["ranges"])
    table = trials_table(study)
    assert {"bins.cut1", "bins.cut2"} <= set(table.columns) and bins_vary(table), "report warns"
