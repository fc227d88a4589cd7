"""The benchmark scripts keep working: quick modes on tiny generated data, and section rendering."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, args: list[str], out: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def load_bench(name: str, monkeypatch):
    """A bench/ script as a module, with bench/ on sys.path for the test (as when the script runs)."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module(name)


def test_notes_above_the_details_marker_are_the_reading_and_the_rest_is_linked(tmp_path, monkeypatch):
    sections = load_bench("sections", monkeypatch)
    notes = tmp_path / "bench" / "x-notes.md"
    notes.parent.mkdir()
    notes.write_text("- one\n- two\n\n<!-- details -->\n- the per-run narrative\n")
    assert sections.read_notes(notes, tmp_path / "BENCHMARKS.md") == [
        "- one",
        "- two",
        "- Details: [x-notes.md](bench/x-notes.md).",
    ]
    (tmp_path / "docs").mkdir()  # a page one folder down links up to the notes
    assert (
        sections.read_notes(notes, tmp_path / "docs" / "E.md")[-1]
        == "- Details: [x-notes.md](../bench/x-notes.md)."
    )
    notes.write_text("- all of it\n")  # without the marker every line is the reading
    assert sections.read_notes(notes, tmp_path / "BENCHMARKS.md") == ["- all of it"]
    assert sections.read_notes(None) == []


# heavy: seconds on an idle machine, but minutes on shared cores (a fresh store, data and cache).
@pytest.mark.heavy
def test_overhead_quick_writes_its_section(tmp_path, output_dir, monkeypatch):
    import torch

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # in-process: the modules are already imported, so this takes seconds, not a fresh interpreter's
        assert load_bench("overhead", monkeypatch).main(["--quick", "--write", str(md)]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    text = md.read_text()
    assert "kept" in text and text.count("<!-- overhead:begin -->") == 1
    assert "| tiny | 2/8/16 | 32 |" in text
    res = json.loads((output_dir / "bench" / "overhead-quick.json").read_text())
    case = res["cases"][0]
    assert len(case["runs"]["agecls"]) == len(case["runs"]["plain"]) == 2
    assert case["cpu"]["total"]["agecls"] > 0 and case["wall"]["steady"]["plain"] > 0


@pytest.mark.heavy
def test_quality_quick_runs_both_sides(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    run_bench("quality.py", ["--quick", "--write", str(md)], tmp_path / "out", timeout=900)
    (report,) = (tmp_path / "out" / "bench" / "quality").glob("*/quality.json")
    res = json.loads(report.read_text())
    sides = res["tasks"]["age"]
    assert [s["side"] for s in sides] == ["dissertation", "agecls"]
    for s in sides:
        point, lo, hi = s["test_macro_f1"]
        assert 0 <= lo <= point <= hi <= 1
    assert sides[1]["trials"] == 2
    assert "| age | 2 / 2 (2 trials" in md.read_text()
    pair = res["paired"]["age"]  # both runs wrote predictions_test.csv: the paired difference
    assert pair["lo"] <= pair["diff"] <= pair["hi"] and pair["rows"] == res["sizes"]["test"]
    assert pair["diff"] == pytest.approx(
        sides[1]["test_macro_f1"][0] - sides[0]["test_macro_f1"][0], abs=1e-9
    )
    assert "paired 95% bootstrap interval of the difference" in md.read_text()


def _saved_report(tmp_path, **extra_args):
    side = {
        "wall_s": 60.0,
        "val_macro_f1": 0.5,
        "test_macro_f1": [0.5, 0.45, 0.55],
        "test_acc": [0.6, 0.55, 0.65],
        "epochs_trained": 4,
    }
    rep = {
        "command": "python bench/quality.py",
        "date": "2026-01-01 00:00 UTC",
        "machine": {"cpu": "cpu", "nproc": "2", "gpu": "none", "torch": "2"},
        "args": {
            "size": 32,
            "fraction": 0.25,
            "budget": 4,
            "epochs": 2,
            "threads": 1,
            "parallel": 2,
            **extra_args,
        },
        "data": "real UTKFace",
        "sizes": {"train": 10, "val": 5, "test": 5},
        "load_start": 1.0,
        "n_boot": 1000,
        "tasks": {
            "age": [
                {**side, "side": "dissertation"},
                {
                    **side,
                    "side": "agecls",
                    "test_macro_f1": [0.6, 0.56, 0.64],
                    "trials": 2,
                    "pruned": 0,
                    "best_params": {"optimizer": "adam", "optimizer.lr": 0.001},
                    "trial_vals": [0.5, 0.6],
                },
            ]
        },
        "verdict": ["- age: better."],
        "seconds": 120,
    }
    saved = tmp_path / "quality.json"
    saved.write_text(json.dumps(rep))
    return saved


def _render(tmp_path, saved):
    md = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality.py"), "--from-json", str(saved), "--write", str(md)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return md.read_text()


def test_quality_section_renders_from_saved_json(tmp_path):
    text = _render(tmp_path, _saved_report(tmp_path))
    assert "<!-- quality-32px:begin -->" in text
    assert (
        "| age | 4 / 4 (2 trials, 0 pruned) | 0.5000 / 0.5000 | 0.5000 [0.4500, 0.5500] | 0.6000 [0.5600, "
        in text
    )
    assert "| optimizer=adam, optimizer.lr=0.001 |" in text  # the agecls study's best trial


def test_quality_no_search_section_has_its_own_markers_and_names_the_recipe(tmp_path):
    saved = _saved_report(tmp_path, no_search=True, agecls_set=["callbacks.ema.enabled=true"])
    rep = json.loads(saved.read_text())
    rep["tasks"]["age"][1].update(trials=0, best_params={}, trial_vals=[])
    saved.write_text(json.dumps(rep))
    text = _render(tmp_path, saved)
    assert "<!-- quality-32px-recipe:begin -->" in text and "<!-- quality-32px:begin -->" not in text
    assert (
        "| age | 4 / 4 | 0.5000 / 0.5000 | 0.5000 [0.4500, 0.5500] | 0.6000 [0.5600, 0.6400] | +0.1000 |"
        in text
    )
    assert "the same recipe plus `callbacks.ema.enabled=true`, trained once for up to 4 epochs" in text
    assert "agecls's best trial" not in text


def test_per_task_agecls_overrides_follow_the_shared_ones_and_are_named_in_the_section(tmp_path, monkeypatch):
    quality = load_bench("quality", monkeypatch)
    a = {"agecls_set": ["callbacks.ema.enabled=true"], "agecls_set_gender": ["optimizer.lr=3e-4"]}
    assert quality.agecls_overrides(a, "gender") == ["callbacks.ema.enabled=true", "optimizer.lr=3e-4"]
    assert quality.agecls_overrides(a, "age") == ["callbacks.ema.enabled=true"]
    assert quality.agecls_overrides({}, "age") == []  # reports saved before per-task overrides existed
    saved = _saved_report(tmp_path, no_search=True, **a)
    rep = json.loads(saved.read_text())
    rep["tasks"]["age"][1].update(trials=0, best_params={}, trial_vals=[])
    saved.write_text(json.dumps(rep))
    text = _render(tmp_path, saved)
    assert (
        "plus `callbacks.ema.enabled=true`; per task: gender also `optimizer.lr=3e-4`, trained once" in text
    )


def _face_predictions(run_dir: Path, preds: list[int], labels: list[int]) -> dict:
    import pandas as pd

    run_dir.mkdir(parents=True)
    pd.DataFrame({"row": range(len(labels)), "label": labels, "pred": preds}).to_csv(
        run_dir / "predictions_test.csv", index=False
    )
    return {"results": {"run_dir": str(run_dir), "class_names": ["0", "1", "2"]}}


def test_paired_verdict_reads_both_runs_face_level_predictions(tmp_path, monkeypatch):
    quality = load_bench("quality", monkeypatch)
    labels = [0, 1, 2] * 40
    diss = _face_predictions(tmp_path / "d", [0] * 120, labels)  # predicts one class
    ours = _face_predictions(tmp_path / "a", labels[:100] + [0] * 20, labels)  # right on 100 faces
    pair = quality.paired_diff(diss, ours, n=300)
    assert pair["rows"] == 120 and pair["lo"] > 0 and pair["p_a_not_better"] == 0.0
    rep = json.loads(_saved_report(tmp_path).read_text())
    rep["paired"] = {"age": pair}
    rep["tasks"]["age"][1]["tta"] = {"chosen": "flip", "val_macro_f1": {"none": 0.5, "flip": 0.52}}
    (line, tta) = quality.verdict(rep)
    assert "paired 95% bootstrap interval of the difference [+" in line and ": better;" in line
    assert "over the same 120 test faces" in line and "the separate intervals do not overlap" in line
    assert "`augment.tta=auto` chose `flip` on validation (none 0.5000, flip 0.5200)" in tta
    # A run from before face-level predictions: no pairing, the separate intervals' reading.
    assert quality.paired_diff(diss, {"results": {"run_dir": str(tmp_path / "old")}}, n=10) is None
    # Runs over different test faces are refused rather than paired.
    other = _face_predictions(tmp_path / "o", [0] * 120, [1, 0, 2] * 40)
    with pytest.raises(SystemExit, match="do not hold the same faces"):
        quality.paired_diff(diss, other, n=10)


@pytest.mark.heavy
def test_throughput_quick_times_the_cpu_variants(tmp_path):
    run_bench("throughput.py", ["--quick", "--out", str(tmp_path)], tmp_path / "out", timeout=900)
    res = json.loads((tmp_path / "throughput.json").read_text())
    names = [r["variant"] for r in res["results"]]
    assert names == ["loader-fp32", "loader-bf16-cl", "device-bf16-cl"]  # compile is skipped in quick mode
    for r in res["results"]:
        assert "error" not in r, r
        assert r["timed_steps"] == 4 and 0 < r["timed_images"] <= 4 * 32 and r["images_per_s"] > 0


# ---- bench/levers.py -------------------------------------------------------------------------------------


def _lever_run(out: Path, name: str, best: float, curve: list[float]) -> None:
    run_dir = out / name / "run"
    run_dir.mkdir(parents=True)
    results = {
        "best_val/macro_f1": best,
        "best_epoch": curve.index(best) + 1,
        "epochs_trained": len(curve),
        "fit_seconds": 12.5,
        "data_sizes": {"train": 100, "val": 40, "test": 40},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "config.yaml").write_text("data:\n  root: /faces/UTKFace\n")
    log = "\n".join(
        f"[12:00:0{e}][agecls.train][INFO] epoch {e}  lr 0.0001  train/macro_f1 0.5  val/macro_f1 {v}"
        for e, v in enumerate(curve, start=1)
    )
    (run_dir / "train.log").write_text("data: ...\n" + log + "\nbest epoch 2: val macro-F1 ...\n")


def test_levers_collect_reads_finished_runs_marks_the_best_per_task_and_skips_missing(tmp_path, monkeypatch):
    levers = load_bench("levers", monkeypatch)
    monkeypatch.setenv("AGECLS_UTKFACE", str(tmp_path / "absent"))  # collecting needs no data folder
    _lever_run(tmp_path, "g_none", 0.81, [0.7, 0.81, 0.8])
    _lever_run(tmp_path, "g_ema", 0.83, [0.72, 0.79, 0.83])
    _lever_run(tmp_path, "e_ema", 0.6, [0.5, 0.6])
    md = tmp_path / "BENCHMARKS-EARLIER.md"  # the page make bench-levers writes, its other sections kept
    md.write_text((REPO / "docs" / "BENCHMARKS-EARLIER.md").read_text())
    args = ["--collect", str(tmp_path), "--only", "g_none", "g_ema", "e_ema", "a_ema", "--write", str(md)]
    monkeypatch.setattr(levers, "RESULTS", tmp_path / "record")  # not the committed bench/results
    (tmp_path / "record").mkdir()
    assert levers.main(args) == 0
    text = md.read_text()
    assert text.count("<!-- levers-runs:begin -->") == 1
    assert text.index("<!-- recipe-followups:end -->") < text.index("<!-- levers-runs:begin -->")  # in place
    assert text.index("<!-- levers-runs:end -->") < text.index("<!-- levers:begin -->")
    assert "## Age heads on UTKFace" in text and "## Levers tried on age alone, on validation" in text
    assert "| gender | none (the dissertation's recipe) | 0.8100 | 2 of 3 | 0.700 0.810 0.800 | 12 |" in text
    ema = "`callbacks.ema.enabled=true`, `callbacks.ema.decay=0.995`"
    assert f"| gender | {ema} | **0.8300** | 3 of 3 |" in text
    assert "| ethnicity | `callbacks.ema.enabled=true`, `callbacks.ema.decay=0.995` | **0.6000** |" in text
    section = text[text.index("<!-- levers-runs:begin -->") : text.index("<!-- levers-runs:end -->")]
    assert "| age |" not in section, "a lever without a finished run is left out"
    assert "real UTKFace at /faces/UTKFace (train/val rows 100/40)" in text  # where the runs read it
    saved = json.loads((tmp_path / "levers.json").read_text())
    assert levers.render(saved).strip() in text  # --from-json renders the same section
    assert json.loads((tmp_path / "record" / "levers.json").read_text()) == saved


def test_levers_collect_reads_a_hierarchy_run_by_its_routed_score_and_stages(tmp_path, monkeypatch):
    levers = load_bench("levers", monkeypatch)
    monkeypatch.setenv("AGECLS_UTKFACE", str(tmp_path / "absent"))
    _lever_run(tmp_path, "a_none", 0.52, [0.4, 0.52])
    run_dir = tmp_path / "a_hier_gender" / "run"
    run_dir.mkdir(parents=True)
    stage = {"epochs_trained": 2, "fit_seconds": 5.0, "data_sizes": {"train": 100, "val": 40, "test": 40}}
    results = {  # the keys agecls.training.hierarchy.run_hierarchy writes (tests/test_hierarchical.py)
        "best_val/macro_f1": 0.55,
        "val/router_acc": 0.9,
        "val/oracle/macro_f1": 0.57,
        "test/macro_f1": 0.99,  # never shown: levers are read on validation only
        "fit_seconds": 15.0,
        "stages": {
            "router-gender": {
                **stage,
                "best_epoch": 2,
                "best_val/macro_f1": 0.9,
                "run_dir": str(run_dir / "router-gender"),
            },
            "expert-male": {**stage, "best_epoch": 1, "best_val/macro_f1": 0.5},
            "expert-female": {**stage, "best_epoch": 2, "best_val/macro_f1": 0.6},
        },
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    # a hierarchy run from before agecls saved its config beside results.json: the router's is read
    (run_dir / "router-gender").mkdir()
    (run_dir / "router-gender" / "config.yaml").write_text("data:\n  root: /faces/UTKFace\n")
    md = tmp_path / "BENCHMARKS.md"
    args = ["--collect", str(tmp_path), "--only", "a_none", "a_hier_gender", "--write", str(md)]
    monkeypatch.setattr(levers, "RESULTS", tmp_path / "record")  # not the committed bench/results
    (tmp_path / "record").mkdir()
    assert levers.main(args) == 0
    text = md.read_text()
    assert (
        "| age | `hierarchy=gender` | **0.5500** | router-gender 2, expert-male 1, expert-female 2 (of 2) | "
        "routed by the router's prediction (router val accuracy 0.900); oracle routing 0.5700; stages' own "
        "val macro-F1: router-gender 0.900, expert-male 0.500, expert-female 0.600 | 15 |" in text
    )
    assert "| age | none (the dissertation's recipe) | 0.5200 | 2 of 2 |" in text
    assert "0.99" not in text


def test_levers_only_names_an_unknown_lever_and_the_valid_ones(monkeypatch):
    levers = load_bench("levers", monkeypatch)
    with pytest.raises(SystemExit, match=r"--only g_fast: not a lever; valid: g_none, g_ema, "):
        levers.main(["--only", "g_fast", "--quick"])


# heavy: two 1-epoch subprocess fits on generated faces (a minute on shared cores).
@pytest.mark.heavy
def test_levers_quick_runs_two_levers(tmp_path):
    done = run_bench("levers.py", ["--quick"], tmp_path, timeout=900)
    assert "| gender | none (the dissertation's recipe) |" in done.stdout
    assert "| gender | `callbacks.ema.enabled=true`, `callbacks.ema.decay=0.995` |" in done.stdout


# ---- bench/search.py -------------------------------------------------------------------------------------


def _search_run(run_dir: Path, epochs: int, val: float, right: int) -> None:
    """A finished run's results.json and test predictions (`right` of 40 faces correct)."""
    import pandas as pd

    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "objective": val,
        "epochs_trained": epochs,
        "fit_seconds": 1.0,
        "data_sizes": {"train": 120, "val": 40, "test": 40},
        "class_names": ["0", "1"],
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    labels = [0, 1] * 20
    preds = labels[:right] + [1 - y for y in labels[right:]]
    pd.DataFrame({"row": range(40), "label": labels, "pred": preds}).to_csv(
        run_dir / "predictions_test.csv", index=False
    )


def _fake_agecls(cmd: list[str], log: Path, env: dict) -> float:
    """Stands in for agecls-train in bench/search.py: a plain run stops early on seed 1001 (3 of 4 epochs);
    a study round adds trials (even numbers complete 4 epochs, odd ones are pruned after 3); the follow-up
    round re-seeds the best trial once."""
    import optuna
    from optuna.trial import TrialState, create_trial

    args = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("optuna.enqueue"))
    if "hydra.sweep.dir" not in args:  # a plain run, not a study
        seed = int(args["seed"])
        _search_run(Path(args["hydra.run.dir"]), 3 if seed == 1001 else 4, 0.5 + seed % 10 / 100, 25)
        return 2.0
    study = optuna.create_study(
        study_name=args["optuna.study_name"],
        storage=args["optuna.storage"],
        direction="maximize",
        load_if_exists=True,
    )
    sweep = Path(args["hydra.sweep.dir"])
    while len(study.trials) < int(args["optuna.n_trials"]):
        n = len(study.trials)
        run_dir, epochs = sweep / f"trial-{n:04d}", 4 if n % 2 == 0 else 3
        _search_run(run_dir, epochs, 0.6 + n / 100, 30)
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE if n % 2 == 0 else TrialState.PRUNED,
                value=0.6 + n / 100,
                params={"optimizer.lr": 1e-3},
                distributions={"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
                intermediate_values={e: 0.5 for e in range(epochs)},
                user_attrs={"run_dir": str(run_dir), "warm_start": f"enqueue[{n}]"} if n < 2 else {},
            )
        )
    if int(args["optuna.reseed.top"]):
        from agecls.sweep.followup import set_finished_attrs

        best = study.best_trial
        seed_dir = sweep / f"trial-{best.number:04d}-seed-1001"
        _search_run(seed_dir, 4, 0.7, 34)
        run = {"value": 0.7, "run_dir": str(seed_dir)}
        mean = (best.value + 0.7) / 2
        set_finished_attrs(study, best, {"reseed_runs": {"1001": run}, "seed_mean": mean, "seed_std": 0.01})
    return 3.0


def test_search_spends_the_same_budget_per_side_and_pairs_each_with_the_recipe(tmp_path, monkeypatch):
    search = load_bench("search", monkeypatch)
    monkeypatch.setattr(search, "run_logged", _fake_agecls)
    monkeypatch.setattr(search, "RESULTS", tmp_path / "record")
    root = tmp_path / "faces"
    root.mkdir()
    md = tmp_path / "BENCHMARKS.md"
    argv = [
        "--root",
        str(root),
        "--tasks",
        "age",
        "--seeds",
        "1",
        "--budget-epochs",
        "12",
        "--run-epochs",
        "4",
    ]
    argv += ["--reseed-top", "1", "--reseed-seeds", "1", "--n-boot", "200", "--out", str(tmp_path / "out")]
    assert search.main([*argv, "--write", str(md)]) == 0
    rep = json.loads((tmp_path / "out" / "search.json").read_text())
    sides = rep["tasks"]["age"]["1"]
    # Seeded sides: 4 + 3 (early stop) + 4 epochs; a fourth run of 4 would pass the budget of 12.
    for name in ("dissertation", "recipe"):
        assert sides[name]["epochs"] == 11 and len(sides[name]["runs"]) == 3
        assert sides[name]["chosen"]["val"] == pytest.approx(0.52)  # seed 1002, the best on validation
    # Study: 4 epochs kept for the re-seed; trials 0 (4 epochs) and 1 (pruned after 3) fit the 8 left.
    study = sides["study"]
    assert study["epochs_split"] == {"trials": 7, "reseeds": 4, "continued": 0, "total": 11}
    assert study["trials"] == 2 and study["pruned"] == 1 and study["trial"] == 0
    assert study["chosen"]["val"] == pytest.approx(0.7)  # the re-seeded run beat the trial's own on val
    assert study["warm_start"] == "enqueue[0]"
    # Test: study 34/40 right vs recipe 25/40, on the same faces
    assert study["vs_recipe"]["diff"] > 0 and study["vs_recipe"]["lo"] <= study["vs_recipe"]["diff"]
    assert sides["dissertation"]["vs_recipe"]["diff"] == pytest.approx(0.0)
    assert "vs_recipe" not in sides["recipe"]
    text = md.read_text()
    assert text.count("<!-- search:begin -->") == 1
    # One row per task and seed: val and test of the three sides, each side minus the recipe on test, what the
    # study ran and chose, the seeds' means (recipe seeds 1000-1002 give 0.50, 0.51, 0.52 on validation; the
    # study's trial 0 on its own seed 0.60 and re-seeded 0.70), and the epochs each side spent.
    assert ("| age | 1 | 0.5200 / 0.5200 / 0.7000 | 0.6248 / 0.6248 / 0.8500 | +0.2252 [+") in text
    assert (
        "| +0.0000 [+0.0000, +0.0000] | 2 (1); enqueue[0] | 0.5100 / 0.6500 | 11 / 11 / 11 (12) |"
    ) in text
    # the per-run narrative stays in the record
    assert study["detail"].startswith("2 trials (1 pruned; 7 epochs), re-seeds 4 epochs, continued 0; chose")
    assert sides["recipe"]["runs_test"] == pytest.approx([0.6248] * 3, abs=1e-4)  # 25 of 40 right each
    # The by-task line: the study level+ with the recipe on val and test, significantly ahead, level+ by the
    # seeds' means and with the dissertation on test.
    assert (
        "- Study vs recipe, by task: at least level on val / test age 1 / 1; significantly ahead / behind on "
        "test age 1 / 0; at least level by the seeds' means on val age 1 of 1. Study at least level with the "
        "dissertation's settings on test: age 1 of 1."
    ) in text
    assert json.loads((tmp_path / "record" / "search.json").read_text()) == rep
    assert search.render(rep) in text  # --from-json renders the same section
    # ... and words the reading anew from the numbers, so a record of older wording gets today's lines
    (tmp_path / "old.json").write_text(json.dumps({**rep, "reading": ["- an older reading"]}))
    assert search.main(["--from-json", str(tmp_path / "old.json"), "--write", str(tmp_path / "old.md")]) == 0
    rendered = (tmp_path / "old.md").read_text()
    assert "an older reading" not in rendered and "\n".join(rep["reading"]) in rendered
    # A second sitting into the same folder reads the finished cell back and runs nothing
    monkeypatch.setattr(search, "run_logged", lambda *a: pytest.fail(f"ran again: {a[0]}"))
    assert search.main([*argv, "--write", str(md)]) == 0
    again = json.loads((tmp_path / "out" / "search.json").read_text())
    assert again["tasks"] == rep["tasks"] and "read back" in again["command"]
    # ... and refuses to mix a cell of other settings into its table
    with pytest.raises(SystemExit, match=r"cell.json: run with other settings .*'budget_epochs': \(12, 16\)"):
        search.main([*argv[:-2], "--budget-epochs", "16", "--out", str(tmp_path / "out")])
    # Another protocol keeps its own section and record beside the default one
    assert search.main([*argv, "--write", str(md), "--section", "search-4ep"]) == 0
    text = md.read_text()
    assert text.count("<!-- search:begin -->") == 1 and text.count("<!-- search-4ep:begin -->") == 1
    assert "## Search vs hand recipe at the same budget: runs of 4 epochs, 12 per side" in text
    assert (tmp_path / "record" / "search-4ep.json").is_file()
    assert json.loads((tmp_path / "record" / "search.json").read_text()) == again  # the default one untouched
    with pytest.raises(SystemExit, match="--section 'a b'"):
        search.main([*argv, "--section", "a b"])


def test_search_keeps_budget_for_the_leaders_seeds_and_asks_the_study_for_them(tmp_path, monkeypatch):
    """--leader-seeds 1: the study reserves one more run (trials get 12 - 4 re-seed - 4 leader = 4 epochs)
    and its follow-up round asks for the leader's seed after the re-seeds' (1001, then 1002). A cell
    recorded before the setting existed ran without leader seeds: it joins a table of 0, not of 1."""
    search = load_bench("search", monkeypatch)
    commands: list[list[str]] = []

    def fake(cmd, log, env):
        commands.append(cmd)
        return _fake_agecls(cmd, log, env)

    monkeypatch.setattr(search, "run_logged", fake)
    monkeypatch.setattr(search, "RESULTS", tmp_path / "record")
    root = tmp_path / "faces"
    root.mkdir()
    argv = ["--root", str(root), "--tasks", "age", "--seeds", "1", "--budget-epochs", "12"]
    argv += ["--run-epochs", "4", "--reseed-top", "1", "--reseed-seeds", "1", "--n-boot", "50"]
    argv += ["--out", str(tmp_path / "out")]
    assert search.main([*argv, "--leader-seeds", "1"]) == 0
    study = json.loads((tmp_path / "out" / "search.json").read_text())["tasks"]["age"]["1"]["study"]
    assert study["trials"] == 1 and study["epochs_split"]["trials"] == 4
    rounds = [c for c in commands if any(a.startswith("hydra.sweep.dir=") for a in c)]
    assert not any("leader_seeds" in a for a in rounds[0]), "trial rounds run no follow-ups"
    assert "optuna.reseed.seeds=[1001]" in rounds[-1] and "optuna.reseed.leader_seeds=[1002]" in rounds[-1]

    cell = tmp_path / "out" / "age" / "seed-1" / "cell.json"
    record = json.loads(cell.read_text())
    del record["settings"]["leader_seeds"]  # as recorded before the setting existed
    cell.write_text(json.dumps(record))
    monkeypatch.setattr(search, "run_logged", lambda *a: pytest.fail(f"ran again: {a[0]}"))
    with pytest.raises(SystemExit, match=r"'leader_seeds': \(0, 1\)"):
        search.main([*argv, "--leader-seeds", "1"])
    assert search.main(argv) == 0
    with pytest.raises(SystemExit, match="--leader-seeds 1: the leader is chosen among re-seeded trials"):
        search.main([*argv, "--reseed-top", "0", "--leader-seeds", "1"])


# heavy: six subprocess fits and two study rounds on generated faces (6 to 17 minutes on 2 loaded cores).
@pytest.mark.heavy
def test_search_quick_runs_three_sides_on_one_budget(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    run = tmp_path / "run"
    run_bench("search.py", ["--quick", "--out", str(run), "--write", str(md)], tmp_path / "out", timeout=1800)
    rep = json.loads((run / "search.json").read_text())
    sides = rep["tasks"]["age"]["1"]
    assert list(sides) == ["dissertation", "recipe", "study"]
    for name, side in sides.items():  # 4 epochs each: two 2-epoch seed runs, or trials plus a re-seed
        assert 3 <= side["epochs"] <= 4, (name, side["epochs"])
        assert 0 <= side["test"] <= 1
        if side.get("served") != "ensemble":  # else the seeds' ensemble, which beat them on validation
            assert side["chosen"]["val"] == max(r["val"] for r in side["runs"])
    assert len(sides["dissertation"]["runs"]) == len(sides["recipe"]["runs"]) == 2
    study = sides["study"]
    assert study["epochs_split"]["reseeds"] == 2 and study["warm_start"] == "enqueue[0]"
    assert len(study["runs"]) == 2  # the chosen trial's own run and its re-seed
    pair = sides["study"]["vs_recipe"]
    assert pair["lo"] <= pair["diff"] <= pair["hi"]
    text = md.read_text()
    assert "| task | seed | val macro-F1: dissertation / recipe / study | test macro-F1: dissertation" in text
    assert text.count("| age | 1 |") == 1
    assert re.search(r"\n- Study vs recipe, by task: at least level on val / test age \d / \d;", text)


def _member(folder: Path, p_male: dict[str, list[float]], val: float) -> Path:
    """One seed's run of a gender configuration: its config, results and val/test predictions (4 faces)."""
    import pandas as pd
    from omegaconf import OmegaConf

    folder.mkdir()
    (folder / "config.yaml").write_text(OmegaConf.to_yaml({"task": {"name": "gender", "target": "gender"}}))
    results = {"objective": val, "epochs_trained": 4, "fit_seconds": 1.0, "class_names": ["male", "female"]}
    (folder / "results.json").write_text(json.dumps(results))
    for split, p in p_male.items():
        frame = pd.DataFrame({"row": [3, 5, 8, 9], "label": [0, 1, 0, 1]})
        frame["pred"] = [0 if x >= 0.5 else 1 for x in p]
        frame["p_male"], frame["p_female"] = p, [1 - x for x in p]
        frame.to_csv(folder / f"predictions_{split}.csv", index=False)
    return folder


def test_search_scores_the_seeds_ensemble_where_the_study_serves_it(tmp_path, monkeypatch):
    """Each seed gets one face of four wrong on validation and test; their mean probabilities get all four:
    validation prefers the ensemble, so the study's model on test is the ensemble, not its best seed."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from agecls.evaluation.compare import compare_runs

    search = load_bench("search", monkeypatch)
    probs = {"a": [0.6, 0.45, 0.7, 0.55], "b": [0.55, 0.3, 0.45, 0.2]}
    a = _member(tmp_path / "a", {"val": probs["a"], "test": probs["a"]}, 0.7333)
    b = _member(tmp_path / "b", {"val": probs["b"], "test": probs["b"]}, 0.7333)
    study = optuna.create_study(direction="maximize")
    attrs = {"run_dir": str(a), "seed": 1000, "mlflow_run_id": "ra", "ensemble_val": 1.0}
    attrs["reseed_runs"] = {"1001": {"value": 0.7333, "run_dir": str(b), "mlflow_run_id": "rb"}}
    study.add_trial(
        create_trial(state=TrialState.COMPLETE, value=0.7333, params={}, distributions={}, user_attrs=attrs)
    )
    trial = study.trials[0]
    kind, why = search.serves(study, trial)
    assert kind == "ensemble" and why.startswith("the seeds' ensemble 1.0000 > the best seed 0.7333")
    pick = search.served_ensemble(trial, tmp_path / "cell")
    assert pick["val"] == 1.0 and pick["epochs"] == 8 and pick["members"] == [str(a), str(b)]
    report = compare_runs(pick["run_dir"], a, split="test", n=50, seed=0)
    assert report["macro_f1"]["A"][0] == pytest.approx(1.0) and report["faces"] == 4


def test_search_counts_the_reseeds_of_a_promoted_pruned_trial(tmp_path, monkeypatch):
    """A pruned trial continued to the end joins the study (continued_from) and may then be re-seeded as a
    top trial: its own epochs are its source's `continued`, its re-seeds are budget spent like any other."""
    import optuna
    from optuna.trial import TrialState, create_trial

    search = load_bench("search", monkeypatch)
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    source = {"continued": {"epochs": 8}}
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"x": 0.5},
            distributions=dist,
            intermediate_values={0: 0.1, 1: 0.2, 2: 0.3},
            user_attrs=source,
        )
    )
    promoted = {"continued_from": 0, "reseed_runs": {"1001": {"epochs": 8}}, "epochs_trained": 8}
    study.add_trial(create_trial(value=0.6, params={"x": 0.5}, distributions=dist, user_attrs=promoted))
    assert search.study_epochs(study) == {"trials": 3, "reseeds": 8, "continued": 5, "total": 16}


@pytest.mark.heavy  # two small studies (about a minute)
def test_trial_throughput_bench_measures_both_trial_starts(tmp_path):
    done = run_bench("trials.py", ["--parts", "overhead", "--quick"], tmp_path, timeout=900)
    assert "| template |" in done.stdout and "| fresh |" in done.stdout, done.stdout
