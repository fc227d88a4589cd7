"""Quality levers on validation: does a lever, added to the dissertation's final recipe for one
task, raise validation macro-F1? Each lever is one `agecls-train experiment=agecnn|gendercnn|ethnicitycnn` run
plus its overrides, on the whole persisted UTKFace split at a small image size for a few half-epochs,
`--parallel` at a time with one CPU thread each. Only validation is read (best epoch's macro-F1, no TTA):
levers are kept or dropped without looking at test, which the quality bench (bench/quality.py) then reports.

    .venv/bin/python bench/levers.py --write docs/BENCHMARKS-EARLIER.md  # the default set, ~45 min on 2 cores
    .venv/bin/python bench/levers.py --only g_ema g_ema_onecycle1e-3
    .venv/bin/python bench/levers.py --collect outputs/bench/levers/<stamp> --write docs/BENCHMARKS-EARLIER.md
    .venv/bin/python bench/levers.py --quick                        # CI smoke: generated faces, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf
from quality import DEFAULT_ROOT, EXPERIMENTS, QUICK_DATA, REPO, run_logged, thread_env
from sections import (  # on sys.path
    args_record,
    current_keys,
    machine_text,
    provenance,
    read_notes,
    render_saved,
    save_report,
)

BEGIN, END = "<!-- levers-runs:begin -->", "<!-- levers-runs:end -->"
RESULTS = Path(__file__).parent / "results"  # the committed record of the section (tests point it elsewhere)
EMA = ["callbacks.ema.enabled=true", "callbacks.ema.decay=0.995"]
ONECYCLE = ["scheduler=onecycle", "optimizer.lr=1e-3"]
EXPERTS_16 = 'hierarchy.expert_overrides=["trainer.max_epochs=16"]'
# (name, task, overrides on the task's dissertation recipe); the names are the run folders.
LEVERS = [
    ("g_none", "gender", []),
    ("g_ema", "gender", EMA),
    ("g_ema_dwd", "gender", [*EMA, "+optimizer.decoupled_weight_decay=true"]),
    ("g_ema_lr3e-4", "gender", [*EMA, "optimizer.lr=3e-4"]),
    ("g_ema_lr1e-3", "gender", [*EMA, "optimizer.lr=1e-3"]),
    ("g_ema_onecycle1e-3", "gender", [*EMA, *ONECYCLE]),
    ("g_ema_onecycle3e-3", "gender", [*EMA, "scheduler=onecycle", "optimizer.lr=3e-3"]),
    ("g_onecycle1e-3", "gender", ONECYCLE),
    ("a_none", "age", []),
    ("a_ema", "age", EMA),
    ("a_ema_onecycle1e-3", "age", [*EMA, *ONECYCLE]),
    # the dissertation's V15/V16: a router (the recipe with task=gender|ethnicity), an age expert per group
    ("a_hier_gender", "age", ["hierarchy=gender"]),
    ("a_hier_ethnicity", "age", ["hierarchy=ethnicity"]),
    ("a_ema_hier_gender", "age", [*EMA, "hierarchy=gender"]),
    # V15 with 16 epochs per expert, twice the default --epochs: an expert sees about half the faces, so it
    # then takes about as many steps as a flat run
    ("a_hier_gender_e16", "age", ["hierarchy=gender", EXPERTS_16]),
    ("e_none", "ethnicity", []),
    ("e_ema", "ethnicity", EMA),
    ("e_ema_onecycle1e-3", "ethnicity", [*EMA, *ONECYCLE]),
    ("e_ema_lr3e-4", "ethnicity", [*EMA, "optimizer.lr=3e-4"]),
]
LEVER_ORDER = {name: i for i, (name, _, _) in enumerate(LEVERS)}
QUICK = [("g_none", "gender", []), ("g_ema", "gender", EMA)]
EPOCH_LINE = re.compile(r"\bepoch (\d+) .*?val/macro_f1 ([0-9.]+)")


def command(args, task: str, overrides: list[str], run_dir: Path) -> list[str]:
    data = QUICK_DATA if args.quick else ["data=utkface", f"data.root={args.root}"]
    return [
        sys.executable,
        "-m",
        "agecls.cli.train",
        f"experiment={EXPERIMENTS[task]}",
        *data,
        f"data.image_size={args.size}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.limit_train_batches={args.fraction}",
        "trainer.enable_progress_bar=false",
        "tracking=none",
        *args.set,
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def read_run(out: Path, name: str, task: str, overrides: list[str]) -> dict:
    """One finished lever run: its best validation macro-F1 and epoch, fit time, and the per-epoch curve
    (from the run's train.log, where agecls logs each epoch's metrics). A hierarchy run (`hierarchy=...`)
    has no single curve: its score is the routed model's validation macro-F1 (every expert at its own best
    epoch on its group's validation faces), kept with the router's accuracy, the oracle routing's score and
    each stage's best epoch."""
    run_dir = out / name / "run"
    res = json.loads((run_dir / "results.json").read_text())
    config = run_dir / "config.yaml"
    if not config.is_file() and "stages" in res:  # a hierarchy run of before agecls saved its config there
        config = Path(next(iter(res["stages"].values()))["run_dir"]) / "config.yaml"
    row = {
        "name": name,
        "task": task,
        "overrides": overrides,
        "val_macro_f1": float(res["best_val/macro_f1"]),
        "fit_s": float(res["fit_seconds"]),
        "root": str(OmegaConf.load(config).data.root),
    }
    if "stages" in res:
        stages = res["stages"]
        return {
            **row,
            "best_epoch": {stage: int(r["best_epoch"]) for stage, r in stages.items()},
            "epochs_trained": max(int(r["epochs_trained"]) for r in stages.values()),
            "curve": [],
            "hierarchy": {
                "router_val_acc": float(res["val/router_acc"]),
                "oracle_val_macro_f1": float(res["val/oracle/macro_f1"]),
                "stage_val_macro_f1": {stage: float(r["best_val/macro_f1"]) for stage, r in stages.items()},
            },
            "sizes": next(iter(stages.values()))["data_sizes"],  # the router's: the whole split
        }
    curve = {int(e): float(v) for e, v in EPOCH_LINE.findall((run_dir / "train.log").read_text())}
    return {
        **row,
        "best_epoch": int(res["best_epoch"]),
        "epochs_trained": int(res["epochs_trained"]),
        "curve": [curve[e] for e in sorted(curve)],
        "sizes": res["data_sizes"],
    }


def _epoch_and_curve(r: dict) -> tuple[str, str]:
    """The table's 'best epoch' and 'per epoch' cells; a hierarchy run shows its stages instead."""
    if "hierarchy" not in r:
        return f"{r['best_epoch']} of {r['epochs_trained']}", " ".join(f"{v:.3f}" for v in r["curve"])
    h = r["hierarchy"]
    epochs = ", ".join(f"{stage} {e}" for stage, e in r["best_epoch"].items())
    stages = ", ".join(f"{stage} {v:.3f}" for stage, v in h["stage_val_macro_f1"].items())
    return f"{epochs} (of {r['epochs_trained']})", (
        f"routed by the router's prediction (router val accuracy {h['router_val_acc']:.3f}); "
        f"oracle routing {h['oracle_val_macro_f1']:.4f}; stages' own val macro-F1: {stages}"
    )


def run_one(args, out: Path, name: str, task: str, overrides: list[str]) -> dict:
    run_dir = out / name / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_logged(command(args, task, overrides, run_dir), out / name / "log.txt", thread_env(args.threads))
    return read_run(out, name, task, overrides)


def render(rep: dict) -> str:
    a, m = rep["args"], rep["machine"]
    runs = rep["runs"]
    best = {t: max(r["val_macro_f1"] for r in runs if r["task"] == t) for t in {r["task"] for r in runs}}
    sizes = runs[0]["sizes"]
    load = (
        "" if a.get("collect") else f"; 1-min load {rep['load_start']} at the start, niceness {rep['nice']}"
    )
    lines = [
        BEGIN,
        "## Quality levers per task, on validation",
        "",
        *provenance(
            rep["command"],
            machine_text(m) + load,
            rep["date"]
            + (
                f" (rendered from the finished runs in `{rep['out']}`; fit times are theirs)"
                if a.get("collect")
                else f" ({rep['seconds'] / 60:.0f} min in all)"
            ),
        ),
        "- Runs: `agecls-train experiment=agecnn|gendercnn|ethnicitycnn` (the dissertation's final recipe "
        f"for the task) on {rep['data']} (train/val rows {sizes['train']}/{sizes['val']}), {a['size']} px, "
        f"{a['epochs']} epochs of {a['fraction']:g} of the training split, "
        + (f"`{' '.join(a['set'])}`, " if a.get("set") else "")
        + f"plus the row's overrides; {a['parallel']} at a time, {a['threads']} CPU thread each, seed 42. "
        "Validation macro-F1 without TTA at the best epoch decides (bold: the task's best); test is not "
        "read.",
        "",
        "| task | overrides on the recipe | best val macro-F1 | best epoch | val macro-F1 per epoch "
        "| fit, s |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (list(EXPERIMENTS).index(r["task"]), LEVER_ORDER.get(r["name"], 99))):
        shown = (
            ", ".join(f"`{current_keys(o)}`" for o in r["overrides"]) or "none (the dissertation's recipe)"
        )
        score = f"{r['val_macro_f1']:.4f}"
        score = f"**{score}**" if r["val_macro_f1"] == best[r["task"]] else score
        epoch, curve = _epoch_and_curve(r)
        lines.append(f"| {r['task']} | {shown} | {score} | {epoch} | {curve} | {r['fit_s']:.0f} |")
    lines += ["", *rep.get("notes", []), END, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("AGECLS_UTKFACE", DEFAULT_ROOT)))
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the train split per epoch")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--set", nargs="*", default=["data.pipeline=device"], help="overrides for every run")
    parser.add_argument("--only", nargs="+", help="run only these levers (names in LEVERS)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: generated faces, two 1-epoch runs")
    parser.add_argument("--out", type=Path, help="folder for the runs (default outputs/bench/levers/<stamp>)")
    parser.add_argument("--collect", type=Path, help="read the finished runs of an earlier run's folder")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of a markdown file")
    parser.add_argument("--notes", type=Path, help="Markdown lines to append to the section")
    parser.add_argument("--from-json", type=Path, help="render a saved bench/results/levers.json instead")
    args = parser.parse_args(argv)
    if args.from_json:
        return render_saved(args.from_json, render, args.write, (BEGIN, END), args.notes)
    levers = QUICK if args.quick else LEVERS
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _, _ in LEVERS})
        if unknown:
            valid = ", ".join(name for name, _, _ in LEVERS)
            raise SystemExit(f"--only {unknown[0]}: not a lever; valid: {valid}")
        levers = [lever for lever in LEVERS if lever[0] in args.only]
    if args.quick:
        args.size, args.epochs, args.fraction = 32, 1, 1.0
    elif not args.collect and not args.root.is_dir():
        raise SystemExit(f"UTKFace folder not found: {args.root} (--root or AGECLS_UTKFACE)")
    from data_pipeline import machine

    began, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    base = Path(os.environ.get("AGECLS_OUTPUT_DIR", REPO / "outputs"))
    out = args.collect or args.out or base / "bench" / "levers" / time.strftime("%Y%m%d-%H%M%S")
    if args.collect:
        runs = []
        for name, task, overrides in levers:
            try:
                runs.append(read_run(out, name, task, overrides))
            except (OSError, KeyError, ValueError) as exc:
                print(f"{name}: not finished in {out} ({exc}); left out", flush=True)
        if not runs:
            raise SystemExit(f"no finished lever runs in {out}")
    else:
        print(f"{len(levers)} runs, {args.parallel} at a time, under {out}", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(run_one, args, out, *lever) for lever in levers]
            runs = [f.result() for f in futures]
    for r in runs:
        print(
            f"{r['name']:22s} {r['task']:10s} val {r['val_macro_f1']:.4f} epoch {r['best_epoch']}", flush=True
        )
    rep = {
        "command": "python bench/levers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "args": args_record(args),
        "data": "generated synthetic faces (quick mode)"
        if args.quick
        else f"the whole persisted split of real UTKFace at {runs[0]['root']}",
        "load_start": load_start,
        "nice": os.nice(0),
        "runs": runs,
        "out": str(out),
        "seconds": time.perf_counter() - began,
    }
    if args.notes:
        rep["notes"] = read_notes(args.notes, args.write)
    section = render(rep)
    print(section)
    save_report(rep, "levers", out, RESULTS, section, args.write, (BEGIN, END), args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
