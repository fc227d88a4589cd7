"""Pareto benchmark: a `sweep=pareto_fairness` study for age on real UTKFace (validation macro-F1 against the
ethnicity fairness gap), and what its fairest front point costs and gains on test against the trial a
single-objective study on macro-F1 would choose.

One study (agecls's sweeper, TPE over two objectives, no pruner: early stopping ends trials) of `--trials`
trials of the dissertation's age model (experiment=agecnn) at `--size` px on 1 row in `--stride` of each
split of the persisted split. Everything is chosen on validation:

  best F1:  the complete trial with the highest validation macro-F1 (what a study of that one objective
            would name best from the same trials);
  fairest:  the point of the validation Pareto front with the smallest ethnicity gap;
  rule:     the fairest front point within `--within` of the best validation macro-F1.

Test is read once at the end for those points: macro-F1 and the ethnicity gap (largest minus smallest
macro-F1 across the five groups), each with a 95% bootstrap interval, and their paired differences (one set
of resampled test faces scores both models). Test group sizes are listed: small groups make gaps noisy.

    .venv/bin/python bench/pareto.py --write BENCHMARKS.md          # about 30 min on 2 CPU cores
    .venv/bin/python bench/pareto.py --quick                        # smoke: generated faces, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from quality import DEFAULT_ROOT, QUICK_DATA, REPO, run_logged, strided_manifest, thread_env
from sections import args_record, machine_text, provenance, read_notes, render_saved, write_section

NAME = "pareto-age-32px"
MARKERS = (f"<!-- {NAME}:begin -->", f"<!-- {NAME}:end -->")
F1, GAP = "val/macro_f1", "val/fairness_gap_ethnicity"
ETHNICITY = ("white", "black", "asian", "indian", "others")


def macro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Macro-F1 over the classes present in the truth or the predictions (agecls.metrics' convention)."""
    classes = np.union1d(np.unique(true), np.unique(pred))
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (true == c))
        denom = np.sum(pred == c) + np.sum(true == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def gap(pred: np.ndarray, true: np.ndarray, group: np.ndarray) -> float:
    """Largest minus smallest macro-F1 across the groups present (unknown group -1 left out)."""
    scores = [macro_f1(pred[group == g], true[group == g]) for g in np.unique(group) if g >= 0]
    return float(max(scores) - min(scores)) if len(scores) > 1 else float("nan")


def scores_with_intervals(
    frames: dict[str, pd.DataFrame], group: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """Per model: test macro-F1 and gap with 95% percentile bootstrap intervals; per pair against the
    first model: paired differences (the same resampled faces score both)."""
    names = list(frames)
    true = frames[names[0]]["label"].to_numpy()
    preds = {k: f["pred"].to_numpy() for k, f in frames.items()}
    rng = np.random.default_rng(seed)
    draws = {k: {"f1": [], "gap": []} for k in names}
    for _ in range(n):
        rows = rng.integers(0, len(true), len(true))
        for k in names:
            draws[k]["f1"].append(macro_f1(preds[k][rows], true[rows]))
            draws[k]["gap"].append(gap(preds[k][rows], true[rows], group[rows]))
    out: dict[str, dict] = {}
    for k in names:
        row = {}
        for metric, fn in (("f1", macro_f1), ("gap", None)):
            point = fn(preds[k], true) if fn else gap(preds[k], true, group)
            lo, hi = np.nanquantile(draws[k][metric], [0.025, 0.975])
            row[metric] = [point, float(lo), float(hi)]
            if k != names[0]:
                diff = np.asarray(draws[k][metric]) - np.asarray(draws[names[0]][metric])
                dlo, dhi = np.nanquantile(diff, [0.025, 0.975])
                row[f"{metric}_diff"] = [point - out[names[0]][metric][0], float(dlo), float(dhi)]
        out[k] = row
    return out


def test_frame(run_dir: Path, ethnicity_by_file: dict[str, int]) -> tuple[pd.DataFrame, np.ndarray]:
    """A trial's test predictions (label, pred), and each face's ethnicity code (-1 unknown)."""
    frame = pd.read_csv(run_dir / "predictions_test.csv")
    names = frame["path"].astype(str).map(lambda p: Path(p).name)
    return frame[["label", "pred"]], names.map(lambda n: ethnicity_by_file.get(n, -1)).to_numpy()


def run_study(args, out: Path, data: list[str]) -> tuple[float, list[str]]:
    """Run the Pareto study (resumes when its storage exists); (seconds, the command's overrides)."""
    overrides = [
        "experiment=agecnn",
        "sweep=pareto_fairness",
        *data,
        f"data.image_size={args.size}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.limit_train_batches={args.fraction}",
        f"optuna.n_trials={args.trials}",
        f"optuna.n_jobs={args.jobs}",
        f"optuna.study_name={args.study}",
        f"optuna.storage=sqlite:///{out / 'optuna.db'}",
        f"hydra.sweep.dir={out / 'sweep'}",
        f"tracking.experiment={args.study}",
        f"paths.output_dir={out / 'outputs'}",
        *args.set,
    ]
    cmd = [str(REPO / ".venv" / "bin" / "agecls-train"), "-m", *overrides]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *overrides]
    print("running:", " ".join(cmd[1:]), flush=True)
    seconds = run_logged(cmd, out / "study.log", thread_env(max(1, (os.cpu_count() or 2) // args.jobs)))
    return seconds, overrides


def choose(study) -> dict[str, object]:
    """The named points, chosen on validation: best F1, fairest front point, fairest within --within."""
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    names = list(study.metric_names or [F1, GAP])
    i_f1, i_gap = names.index(F1), names.index(GAP)
    front = study.best_trials
    best = max(complete, key=lambda t: (t.values[i_f1], -t.values[i_gap]))
    fairest = min(front, key=lambda t: (t.values[i_gap], -t.values[i_f1]))
    return {"complete": complete, "front": front, "best": best, "fairest": fairest, "i": (i_f1, i_gap)}


def measure(args) -> dict:
    import optuna

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    if args.quick:
        data, source, manifest_csv = list(QUICK_DATA), None, None
    else:
        if not (args.root / "README.md").exists() and not any(args.root.glob("*.jpg*")):
            raise SystemExit(f"--root {args.root}: no UTKFace images there; valid: the UTKFace folder")
        manifest_csv, source = strided_manifest(args, out)
        data = ["data=manifest", f"data.path={manifest_csv}", f"data.root={args.root}"]
    seconds, overrides = run_study(args, out, data)
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{out / 'optuna.db'}")
    picked = choose(study)
    i_f1, i_gap = picked["i"]
    best_val = picked["best"].values[i_f1]
    within = [t for t in picked["front"] if t.values[i_f1] >= best_val - args.within]
    rule = min(within, key=lambda t: (t.values[i_gap], -t.values[i_f1]))
    points = {"best F1": picked["best"], "fairest": picked["fairest"], f"fairest within {args.within}": rule}

    if manifest_csv is not None:
        m = pd.read_csv(manifest_csv)
        eth = dict(zip(m["path"].astype(str).map(lambda p: Path(p).name), m["ethnicity"], strict=True))
    else:  # generated faces: the run's own manifest holds their ethnicity
        eth = {}
        for path in (out / "outputs").rglob("manifest.csv"):
            m = pd.read_csv(path)
            eth.update(zip(m["path"].astype(str).map(lambda p: Path(p).name), m["ethnicity"], strict=True))
    eth = {k: int(v) if pd.notna(v) else -1 for k, v in eth.items()}
    frames, group = {}, None
    for label, t in points.items():
        frame, group = test_frame(Path(t.user_attrs["run_dir"]), eth)
        frames[label] = frame
    assert group is not None
    test = scores_with_intervals(frames, group, n=args.resamples)
    sizes = {ETHNICITY[g]: int((group == g).sum()) for g in range(len(ETHNICITY))}
    plot = out / "pareto_front.png"
    draw_front(study, picked, plot)
    kept = REPO / "bench" / "results" / f"{NAME}{'-quick' if args.quick else ''}.png"
    if not args.quick:
        shutil.copyfile(plot, kept)
    from data_pipeline import machine

    return {
        "args": args_record(args),
        "command": "python bench/pareto.py " + " ".join(sys.argv[1:]),
        "overrides": overrides,
        "machine": machine(),
        "load": os.getloadavg()[0],
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": round(seconds / 60, 1),
        "source": str(source) if source else "generated faces",
        "rows": {s: int((pd.read_csv(manifest_csv)["split"] == s).sum()) for s in ("train", "val", "test")}
        if manifest_csv is not None
        else {},
        "trials": [
            {
                "trial": t.number,
                "f1": t.values[i_f1],
                "gap": t.values[i_gap],
                "front": t.number in {f.number for f in picked["front"]},
                "params": {k: str(v) for k, v in t.params.items()},
                "epochs": t.user_attrs.get("epochs_trained"),
            }
            for t in picked["complete"]
        ],
        "points": {
            label: {"trial": t.number, "val_f1": t.values[i_f1], "val_gap": t.values[i_gap], **test[label]}
            for label, t in points.items()
        },
        "test_group_sizes": sizes,
        "plot": str(kept.relative_to(REPO)) if not args.quick else str(plot),
    }


def draw_front(study, picked: dict, path: Path) -> None:
    """Validation macro-F1 against the ethnicity gap: every complete trial, the front joined, the named
    points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    i_f1, i_gap = picked["i"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [t.values[i_gap] for t in picked["complete"]]
    ys = [t.values[i_f1] for t in picked["complete"]]
    ax.scatter(xs, ys, c="#9aa5b1", s=22, label="complete trials")
    front = sorted(picked["front"], key=lambda t: t.values[i_gap])
    xs, ys = [t.values[i_gap] for t in front], [t.values[i_f1] for t in front]
    ax.plot(xs, ys, "o-", c="#1f6feb", label="front")
    for name, t in (("best F1", picked["best"]), ("fairest", picked["fairest"])):
        ax.annotate(
            f"{name} (#{t.number})",
            (t.values[i_gap], t.values[i_f1]),
            textcoords="offset points",
            xytext=(6, 6),
        )
    ax.set_xlabel("ethnicity gap of age macro-F1 on validation (lower is fairer)")
    ax.set_ylabel("age macro-F1 on validation")
    ax.set_title(f"study {study.study_name}: {len(picked['complete'])} trials")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci(v: list[float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(v[0])} [{fmt.format(v[1])}, {fmt.format(v[2])}]"


def render(rep: dict) -> str:
    a = rep["args"]
    machine = machine_text(rep["machine"]) + f"; 1-min load {rep['load']:.1f} at the start"
    rows = rep.get("rows") or {}
    data = (
        f"real UTKFace, 1 row in {a['stride']} of each split of the persisted split (train/val/test rows "
        f"{rows.get('train')}/{rows.get('val')}/{rows.get('test')}); {a['size']} px"
        if rows
        else "generated faces (smoke run)"
    )
    # the study's own overrides; the run's absolute paths (data, storage, output folders) stay in the record
    study = " ".join(o for o in rep["overrides"] if not o.partition("=")[2].startswith(("/", "sqlite:")))
    epochs = {t["trial"]: t["epochs"] for t in rep["trials"]}
    sizes = ", ".join(f"{k} {v}" for k, v in rep["test_group_sizes"].items())
    lines = [
        MARKERS[0],
        "## Pareto study: age macro-F1 against the ethnicity gap",
        "",
        *provenance(rep["command"], machine, f"{rep['date']} ({rep['minutes']} min)"),
        f"- Setup: {data}; an epoch is {a['fraction']} of the training split. Study: `agecls-train -m "
        f"{study}`, {len(rep['trials'])} complete trials of up to {a['epochs']} epochs, {a['jobs']} at a "
        "time; objectives on validation: macro-F1 (max) and the ethnicity gap, largest minus smallest age "
        "macro-F1 across the five groups (min).",
        "- Points chosen on validation, test read once for them; intervals: 95% percentile bootstrap over "
        f"{a['resamples']} resamples of the test faces ({sizes}), paired against best F1.",
        "",
        "| point (chosen on validation) | trial | epochs | val macro-F1 | val gap | test macro-F1 [95% CI] | "
        "test gap [95% CI] | test macro-F1 vs best F1 | test gap vs best F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, p in rep["points"].items():
        df1 = _ci(p["f1_diff"], True) if "f1_diff" in p else "-"
        dgap = _ci(p["gap_diff"], True) if "gap_diff" in p else "-"
        lines.append(
            f"| {label} | {p['trial']} | {epochs.get(p['trial'], '-')} | {p['val_f1']:.3f} "
            f"| {p['val_gap']:.3f} | {_ci(p['f1'])} | {_ci(p['gap'])} | {df1} | {dgap} |"
        )
    lines += [
        "",
        f"![Pareto front]({rep['plot']})" if not rep["plot"].startswith("/") else f"Plot: {rep['plot']}",
        *rep.get("notes", []),
        MARKERS[1],
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("AGECLS_UTKFACE", DEFAULT_ROOT)))
    parser.add_argument("--stride", type=int, default=3, help="keep 1 row in n of each split")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=14)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the train split per epoch")
    parser.add_argument("--within", type=float, default=0.01, help="rule point: F1 at most this below best")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--study", default="pareto-age-32px")
    parser.add_argument("--set", nargs="*", default=[], help="more agecls-train overrides")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-pareto")
    parser.add_argument("--quick", action="store_true", help="generated faces, 16 px, 4 trials of 2 epochs")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of this Markdown file")
    parser.add_argument("--from-json", type=Path, help="render a saved result instead of running")
    parser.add_argument("--notes", type=Path, help="lines appended to the section")
    args = parser.parse_args(argv)
    if args.from_json:
        return render_saved(args.from_json, render, args.write, MARKERS, args.notes)
    if args.quick:
        args.size, args.trials, args.epochs, args.fraction, args.resamples = 16, 4, 2, 1.0, 100
        args.out = args.out.parent / "bench-pareto-quick"
        args.study = "pareto-quick"
        if args.out.exists():
            shutil.rmtree(args.out)
    t0 = time.time()
    rep = measure(args)
    if args.notes:
        rep["notes"] = read_notes(args.notes, args.write)
    saved = REPO / "bench" / "results" / f"{NAME}{'-quick' if args.quick else ''}.json"
    if not args.quick:
        saved.write_text(json.dumps(rep, indent=2))
    section = render(rep)
    print(section)
    print(f"({time.time() - t0:.0f} s)")
    if args.write and not args.quick:
        write_section(args.write, section, *MARKERS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
