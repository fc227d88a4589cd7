"""Quality benchmark: the dissertation's final settings vs agecls's best configuration found under the same
compute budget, on real UTKFace, with bootstrap confidence intervals on test.

For each task (age with the 7 final bins, gender, ethnicity), two sides run at the same time, one process
and one CPU thread each, on the same persisted split and image size:

  dissertation: its final recipe (experiment=agecnn / gendercnn / ethnicitycnn), one run of `--budget`
                epochs (its early stopping may end it sooner);
  agecls:       an Optuna study (agecls's own sweeper, TPE, median pruner) over optimizer, learning rate,
                weight decay, scheduler and dropout, starting from the same recipe (same
                architecture, so an epoch costs the same; `--agecls-set` adds agecls's own starting
                recipe on top, e.g. the levers that won on validation), of
                `(--budget - --retrain) // --epochs` trials of at most `--epochs` epochs; with
                `--retrain R`, the best trial's configuration is then trained once more for the epochs the
                study left (at least R), so both sides use at most `--budget` epochs. The agecls model
                is the best on validation macro-F1 of the best trial and the retrained run; nothing is
                chosen on test.

Each run (like every agecls run) scores its best checkpoint on test at its end; this script reads those
test scores only for the two final models (the dissertation run and the study's best-on-val trial) and
adds a percentile bootstrap interval (evaluation.bootstrap.bootstrap_ci) from the test confusion matrix.
Epoch = `--fraction` of the training split (trainer.limit_train_batches; shuffled, so each epoch draws
other rows); validation and test are always whole.

    .venv/bin/python bench/quality.py --size 32 --budget 12 --epochs 3 --fraction 0.25 --write BENCHMARKS.md
    .venv/bin/python bench/quality.py --quick          # CI smoke: tiny synthetic data, a minute
    bench/gpu.sh                                       # 224 px on a lent GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sections import (
    args_record,
    current_keys,
    machine_text,
    provenance,
    read_notes,
    render_saved,
    write_section,
)  # bench/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "utkface"


def section_name(size: int, recipe: bool = False) -> str:
    """Each image size and protocol keeps its own section and results file (quality-32px[-recipe])."""
    return f"quality-{size}px" + ("-recipe" if recipe else "")


def markers(size: int, recipe: bool = False) -> tuple[str, str]:
    """The BENCHMARKS.md markers of one section."""
    name = section_name(size, recipe)
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


EXPERIMENTS = {"age": "agecnn", "gender": "gendercnn", "ethnicity": "ethnicitycnn"}
# agecls's search space (Hydra sweep syntax, read by the agecls_optuna sweeper), on top of the recipe.
SEARCH = {
    "optimizer": "choice(adam,nadam,adamw)",
    "optimizer.lr": "tag(log,interval(3e-4,3e-3))",
    "optimizer.weight_decay": "choice(0.0,1e-4,1e-2,0.1)",
    "scheduler": "choice(none,cosine,onecycle)",
    "model.dropout": "interval(0.1,0.6)",
}
QUICK_DATA = [
    "data=synthetic",
    "data.synthetic.n=300",
    "model.blocks=2",
    "model.base_channels=8",
    "model.hidden=16",
    "data.batch_size=32",
]


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Run one agecls command, its output to `log`; seconds taken; SystemExit naming the log on failure."""
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\nlog {log}:\n{tail}")
    return time.perf_counter() - started


def strided_manifest(args, out: Path) -> tuple[Path, Path]:
    """(CSV, source): every `--stride`-th row of each split of UTKFace's persisted split (sorted by file name,
    so each split's age mix is kept), for `data=manifest`; rows keep their split, so test stays test."""
    from hydra import compose, initialize_config_dir

    from agecls.config import CONFIG_DIR, register_resolvers
    from agecls.data.prepare import data_lock, resolve_manifest

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=utkface", f"data.root={args.root}"])
    with data_lock(cfg.paths.data_dir):
        manifest = resolve_manifest(cfg.data, cfg.paths)
    df = manifest.df
    rows = [df[df["split"] == s].iloc[:: args.stride] for s in ("train", "val", "test")]
    path = out / f"utkface-stride{args.stride}.csv"
    cols = [c for c in ("path", "age", "gender", "ethnicity", "sha1", "split") if c in df.columns]
    # written aside and moved in: a resumed sitting rewrites it while runs of another may be reading it
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    __import__("pandas").concat(rows)[cols].to_csv(tmp, index=False)
    tmp.replace(path)
    return path, manifest.path


def agecls_overrides(a: dict, task: str) -> list[str]:
    """The agecls side's overrides for one task: `--agecls-set` (every task), then `--agecls-set-<task>`."""
    return [*a.get("agecls_set", []), *a.get(f"agecls_set_{task}", [])]


def _per_task_text(a: dict) -> str:
    """'; per task: gender also `k=v`, ...' for the tasks given their own levers ('' when none)."""
    parts = [
        f"{t} also " + _overrides_text(a[f"agecls_set_{t}"]) for t in EXPERIMENTS if a.get(f"agecls_set_{t}")
    ]
    return "; per task: " + "; ".join(parts) if parts else ""


def common(args, task: str) -> list[str]:
    if args.quick:
        data = QUICK_DATA
    elif args.stride > 1:
        data = ["data=manifest", f"data.path={args.manifest}", f"data.root={args.root}"]
    else:
        data = ["data=utkface", f"data.root={args.root}"]
    return [
        f"experiment={EXPERIMENTS[task]}",
        *data,
        f"data.image_size={args.size}",
        f"data.num_workers={args.workers}",
        f"trainer.limit_train_batches={args.fraction}",
        "trainer.enable_progress_bar=false",
        # one MLflow experiment per data manifest (agecls refuses to mix splits in one experiment)
        f"tracking.experiment=quality-{task}-{'quick' if args.quick else f'stride{args.stride}'}",
        "tracking.log_checkpoint=false",
        *args.set,
    ]


def dissertation(args, task: str, out: Path) -> dict:
    run_dir = out / task / "dissertation"
    cmd = [sys.executable, "-m", "agecls.cli.train", *common(args, task), f"trainer.max_epochs={args.budget}"]
    cmd.append(f"hydra.run.dir={run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    wall = run_logged(cmd, out / task / "dissertation.log", thread_env(args.threads))
    return read_dissertation(task, out, wall)


def read_dissertation(task: str, out: Path, wall: float = float("nan")) -> dict:
    res = json.loads((out / task / "dissertation" / "results.json").read_text())
    return {"side": "dissertation", "wall_s": wall, "results": res, "epochs_trained": res["epochs_trained"]}


def recipe(args, task: str, out: Path) -> dict:
    """`--no-search`: the agecls side is the dissertation's recipe plus `--agecls-set` (levers chosen on
    validation beforehand), trained once for the whole budget."""
    run_dir = out / task / "recipe"
    cmd = [sys.executable, "-m", "agecls.cli.train", *common(args, task), *agecls_overrides(vars(args), task)]
    cmd += [f"trainer.max_epochs={args.budget}", f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    wall = run_logged(cmd, out / task / "recipe.log", thread_env(args.threads))
    return read_recipe(task, out, wall)


def read_recipe(task: str, out: Path, wall: float = float("nan")) -> dict:
    res = json.loads((out / task / "recipe" / "results.json").read_text())
    return {
        "side": "agecls",
        "wall_s": wall,
        "results": res,
        "epochs_trained": res["epochs_trained"],
        "trials": 0,
        "pruned": 0,
        "best_params": {},
        "trial_vals": [],
    }


def search(args, task: str, out: Path) -> dict:
    trials = max(1, (args.budget - args.retrain) // args.epochs)
    name = f"quality-{task}-{out.name}"
    storage = f"sqlite:///{out / 'optuna.db'}"
    cmd = [
        sys.executable,
        "-m",
        "agecls.cli.train",
        "-m",
        *common(args, task),
        f"trainer.max_epochs={args.epochs}",
    ]
    cmd += ["hydra/sweeper=agecls_optuna", f"optuna.study_name={name}", f"optuna.storage={storage}"]
    cmd += [f"optuna.n_trials={trials}", "optuna.n_jobs=1", "optuna.register_best=false"]
    cmd += [f"hydra.sweep.dir={out / task / 'study'}", *(f"{k}={v}" for k, v in SEARCH.items())]
    cmd += agecls_overrides(vars(args), task)
    wall = run_logged(cmd, out / task / "study.log", thread_env(args.threads))
    side = read_study(task, out, wall)
    return retrain(args, task, out, side) if args.retrain else side


def retrain(args, task: str, out: Path, side: dict) -> dict:
    """Train the study's best configuration once more for the epochs the study left of the budget."""
    epochs = args.budget - side["epochs_trained"]
    run_dir = out / task / "retrain"
    cmd = [sys.executable, "-m", "agecls.cli.train", *common(args, task)]
    cmd += [*agecls_overrides(vars(args), task), *(f"{k}={v}" for k, v in side["best_params"].items())]
    cmd += [f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    wall = run_logged(cmd, out / task / "retrain.log", thread_env(args.threads))
    return read_retrain(task, out, side, wall)


def read_retrain(task: str, out: Path, side: dict, wall: float = float("nan")) -> dict:
    """The agecls side after the retrain: the better on validation of the best trial and the retrained run."""
    res = json.loads((out / task / "retrain" / "results.json").read_text())
    trial_val = float(side["results"]["best_val/macro_f1"])
    side = {**side, "epochs_trained": side["epochs_trained"] + res["epochs_trained"]}
    side["retrain"] = {"epochs_trained": res["epochs_trained"], "val": float(res["best_val/macro_f1"])}
    side["wall_s"] = side["wall_s"] + wall
    if float(res["best_val/macro_f1"]) >= trial_val:
        side["results"], side["chosen"] = res, "retrained run"
    else:
        side["chosen"] = "best trial (it beat the retrained run on validation)"
    return side


def read_study(task: str, out: Path, wall: float = float("nan")) -> dict:
    """The agecls side from a finished (or interrupted) study: its best trial on validation."""
    import optuna

    name = f"quality-{task}-{out.name}"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    best = study.best_trial  # by validation macro-F1 (the study's objective)
    res = json.loads((Path(best.user_attrs["run_dir"]) / "results.json").read_text())
    return {
        "side": "agecls",
        "wall_s": wall,
        "results": res,
        "epochs_trained": sum(len(t.intermediate_values) for t in done),
        "trials": len(done),
        "pruned": sum(t.state.name == "PRUNED" for t in done),
        "best_params": best.params,
        "trial_vals": [round(float(t.value), 4) for t in done if t.value is not None],
    }


def with_ci(side: dict, n: int) -> dict:
    """Test macro-F1 and accuracy with 95% bootstrap intervals, from the run's test confusion matrix."""
    from agecls.evaluation.bootstrap import bootstrap_ci

    res = side["results"]
    cm = np.asarray(res["confusion_test"], dtype=np.int64)
    k = len(cm)
    target = np.repeat(np.arange(k), cm.sum(axis=1))
    preds = np.concatenate([np.repeat(np.arange(k), cm[i]) for i in range(k)])
    side["test_macro_f1"] = bootstrap_ci(preds, target, k, "macro_f1", n=n, seed=0)
    side["test_acc"] = bootstrap_ci(preds, target, k, "acc", n=n, seed=0)
    side["val_macro_f1"] = float(res["best_val/macro_f1"])
    side["test_rows"] = int(cm.sum())
    side["best_epoch"] = res["best_epoch"]
    if res.get("tta"):
        side["tta"] = res["tta"]
    side["fit_s"] = res["fit_seconds"]
    return side


def paired_diff(dissertation: dict, agecls: dict, n: int) -> dict | None:
    """agecls minus dissertation test macro-F1 with a paired bootstrap interval (`evaluation.compare`, as
    `agecls-compare --split test` reports it), from the two runs' face-level test predictions; None when a
    run predates them."""
    from agecls.evaluation.compare import CompareError, compare_runs

    files = [Path(s["results"].get("run_dir", "")) / "predictions_test.csv" for s in (agecls, dissertation)]
    if not all(f.is_file() for f in files):
        return None
    try:
        report = compare_runs(*files, split="test", n=n, seed=0)
    except CompareError as exc:
        raise SystemExit(f"cannot pair the two runs' test predictions: {exc}") from exc
    return report["macro_f1"]["A-B"] | {"rows": report["faces"]}


def _study_text(rep: dict) -> str:
    """The agecls side's protocol when it searches: study, search space, retrain."""
    a = rep["args"]
    return (
        f"an Optuna study (TPE, median pruner) of "
        f"{max(1, (a['budget'] - a.get('retrain', 0)) // a['epochs'])} trials of up to {a['epochs']} "
        f"epoch{'s' if a['epochs'] != 1 else ''} on the same recipe"
        + (" plus " + _overrides_text(a["agecls_set"]) if a.get("agecls_set") else "")
        + _per_task_text(a)
        + ", searching "
        + ", ".join(f"`{k}={v}`" for k, v in rep.get("search", SEARCH).items())
        + (
            f"; then the best trial's configuration trained again for the epochs left (at least "
            f"{a['retrain']}), the better of the two on validation being the agecls model. "
            if a.get("retrain")
            else "; the best trial on validation is the agecls model. "
        )
        + rep.get("schedule", f"Runs went {a['parallel']} at a time (studies first)")
        + f", {a['threads']} CPU thread each."
    )


def _overrides_text(overrides: list[str]) -> str:
    return ", ".join(f"`{current_keys(o)}`" for o in overrides)


def _difference_cells(rep: dict, task: str, d: dict, g: dict) -> list[str]:
    """agecls minus dissertation on test (with the paired interval when both runs wrote face-level
    predictions) and how often agecls was no better over the resamples, with the reading."""
    diff = g["test_macro_f1"][0] - d["test_macro_f1"][0]
    pair = rep.get("paired", {}).get(task)
    if pair:
        sign = "better" if pair["lo"] > 0 else "worse" if pair["hi"] < 0 else "not significant"
        return [
            f"{diff:+.4f} [{pair['lo']:+.4f}, {pair['hi']:+.4f}]",
            f"{pair['p_a_not_better']:.1%} ({sign})",
        ]
    overlap = (
        g["test_macro_f1"][1] <= d["test_macro_f1"][2] and d["test_macro_f1"][1] <= g["test_macro_f1"][2]
    )
    return [f"{diff:+.4f}", f"- (separate intervals {'overlap' if overlap else 'do not overlap'})"]


def _tta_cell(g: dict) -> str:
    tta = g.get("tta")
    if not tta:
        return "-"
    return f"{tta['chosen']} (" + ", ".join(f"{m} {v:.4f}" for m, v in tta["val_macro_f1"].items()) + ")"


def _wall(s: dict) -> str:
    return "-" if s["wall_s"] != s["wall_s"] else str(round(s["wall_s"] / 60, 1))


def _best_trial_cell(g: dict) -> str:
    """The agecls study's best trial (chosen on validation), and the retrain when there was one."""
    params = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in g["best_params"].items()
    )
    if g.get("retrain"):
        params += f"; retrained {g['retrain']['epochs_trained']} ep, val {g['retrain']['val']:.4f}"
    return params or "-"


def render(rep: dict) -> str:
    a = rep["args"]
    m = rep["machine"]
    f = lambda t: f"{t[0]:.4f} [{t[1]:.4f}, {t[2]:.4f}]"  # noqa: E731
    no_search = bool(a.get("no_search"))
    begin, end = markers(a["size"], no_search)
    size, budget = a["size"], a["budget"]
    agecls = (
        "the same recipe plus "
        + _overrides_text(a.get("agecls_set", []))
        + _per_task_text(a)
        + f", trained once for up to {budget} epochs (levers chosen on validation beforehand: levers "
        "sections of docs/BENCHMARKS-EARLIER.md). "
        + rep.get("schedule", f"Runs went {a['parallel']} at a time")
        + f", {a['threads']} CPU thread each."
        if no_search
        else _study_text(rep)
    )
    lines = [
        begin,
        f"## Quality at {size} px: the dissertation's recipe vs "
        + ("agecls's recipe, same budget, no search" if no_search else "an agecls search, same budget"),
        "",
        *provenance(
            rep["command"],
            f"{machine_text(m)}; 1-min load {rep['load_start']} at the start, niceness {rep.get('nice', 10)}",
            f"{rep['date']} "
            + (
                f"(rendered from the finished runs in `{a['collect']}`)"
                if a.get("collect")
                else f"({rep['seconds'] / 60:.0f} min in all)"
            ),
        ),
        f"- Setup: {rep['data']} (train/val/test rows "
        f"{rep['sizes']['train']}/{rep['sizes']['val']}/{rep['sizes']['test']}); {size} px greyscale; an "
        f"epoch is {a['fraction']:g} of the training split, validation and test whole; {budget} epochs per "
        "task and side. Dissertation: `experiment=agecnn|gendercnn|ethnicitycnn` trained once. agecls: "
        + agecls,
        "- Test chose nothing: only the final models' test scores are read; intervals: 95% percentile "
        f"bootstrap over {rep['n_boot']} resamples of the test rows"
        + (
            ", for a difference the paired 95% bootstrap interval of the difference over the same test faces "
            "(`agecls-compare --split test`)."
            if rep.get("paired")
            else "."
        ),
        "",
        "| task | epochs: dissertation / agecls | val macro-F1: dissertation / agecls "
        "| test macro-F1 [95% CI]: dissertation | test macro-F1 [95% CI]: agecls "
        "| agecls − dissertation, test | agecls no better in | test accuracy: dissertation / agecls "
        "| `augment.tta=auto` chose (val macro-F1) | wall, min: dissertation / agecls |"
        + ("" if no_search else " agecls's best trial |"),
        "|---|---|---|---|---|---|---|---|---|---|" + ("" if no_search else "---|"),
    ]
    for task, sides in rep["tasks"].items():
        d, g = (next(x for x in sides if x["side"] == s) for s in ("dissertation", "agecls"))
        searched = f" ({g['trials']} trials, {g['pruned']} pruned)" if g.get("trials") else ""
        cells = [
            task,
            f"{d['epochs_trained']} / {g['epochs_trained']}{searched}",
            f"{d['val_macro_f1']:.4f} / {g['val_macro_f1']:.4f}",
            f(d["test_macro_f1"]),
            f(g["test_macro_f1"]),
            *_difference_cells(rep, task, d, g),
            f"{d['test_acc'][0]:.4f} / {g['test_acc'][0]:.4f}",
            _tta_cell(g),
            f"{_wall(d)} / {_wall(g)}",
            *([] if no_search else [_best_trial_cell(g)]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [*(["", *rep["notes"]] if rep.get("notes") else []), end]
    return "\n".join(lines) + "\n"


def verdict(rep: dict) -> list[str]:
    """One line per task: the test macro-F1 difference, and whether it is significant by the paired
    bootstrap (when both runs wrote face-level predictions) or else by the separate intervals."""
    out = []
    for task, sides in rep["tasks"].items():
        d, g = (next(x for x in sides if x["side"] == s) for s in ("dissertation", "agecls"))
        diff = g["test_macro_f1"][0] - d["test_macro_f1"][0]
        overlap = (
            g["test_macro_f1"][1] <= d["test_macro_f1"][2] and d["test_macro_f1"][1] <= g["test_macro_f1"][2]
        )
        pair = rep.get("paired", {}).get(task)
        if pair:
            sign = "better" if pair["lo"] > 0 else "worse" if pair["hi"] < 0 else "not significant"
            reading = (
                f"paired 95% bootstrap interval of the difference [{pair['lo']:+.4f}, {pair['hi']:+.4f}] "
                f"over the same {pair['rows']} test faces, agecls no better in "
                f"{pair['p_a_not_better']:.1%} of resamples: {sign}; the separate intervals "
                + ("overlap" if overlap else "do not overlap")
            )
        else:
            reading = "intervals overlap" if overlap else "intervals do not overlap"
        out.append(
            f"- {task}: agecls {'+' if diff >= 0 else ''}{diff:.4f} test macro-F1 vs the dissertation's "
            f"settings ({reading})."
        )
        if g.get("tta"):
            scores = ", ".join(f"{m} {v:.4f}" for m, v in g["tta"]["val_macro_f1"].items())
            out.append(
                f"  - agecls's `augment.tta=auto` chose `{g['tta']['chosen']}` on validation ({scores})."
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("AGECLS_UTKFACE", DEFAULT_ROOT)))
    parser.add_argument("--size", type=int, default=32, help="image side in px (224: the dissertation's)")
    parser.add_argument("--budget", type=int, default=12, help="epochs per side and task")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per agecls search trial")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the train split per epoch")
    parser.add_argument(
        "--retrain", type=int, default=0, help="epochs kept back to retrain the best trial's configuration"
    )
    parser.add_argument(
        "--stride", type=int, default=1, help="keep every n-th row of each split (1: the whole split)"
    )
    parser.add_argument("--tasks", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs (or studies) at a time")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for both sides")
    parser.add_argument(
        "--agecls-set",
        nargs="*",
        default=[],
        help="overrides for the agecls side only (its starting recipe: levers kept because they won on "
        "validation), applied to every trial and the retrain",
    )
    for task in EXPERIMENTS:
        parser.add_argument(
            f"--agecls-set-{task}",
            nargs="*",
            default=[],
            help=f"overrides for the agecls side's {task} runs only, after --agecls-set (levers that won on "
            f"validation for {task})",
        )
    parser.add_argument(
        "--no-search",
        action="store_true",
        help="agecls side: the recipe plus --agecls-set trained once for the budget (own section)",
    )
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny synthetic data, 2+2 epochs")
    parser.add_argument("--out", type=Path, help="folder for runs, logs and the study (default outputs/)")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of a markdown file")
    parser.add_argument("--from-json", type=Path, help="render a saved bench/results/quality-*.json instead")
    parser.add_argument("--notes", type=Path, help="Markdown lines to append to the section")
    parser.add_argument("--schedule", help="how the runs were scheduled, when not --parallel at a time")
    parser.add_argument(
        "--collect", type=Path, help="read the finished runs of an earlier (interrupted) run's folder instead"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved_markers = lambda rep: markers(rep["args"]["size"], rep["args"].get("no_search"))  # noqa: E731
        return render_saved(args.from_json, render, args.write, saved_markers, args.notes)
    if args.quick:  # one task, a 2-epoch budget: the dissertation run and a study of 2 one-epoch trials
        args.size, args.budget, args.epochs, args.fraction = 32, 2, 1, 1.0
        args.tasks = args.tasks if "--tasks" in (argv if argv is not None else sys.argv) else ["age"]
    elif not args.root.is_dir():
        raise SystemExit(f"UTKFace folder not found: {args.root} (--root or AGECLS_UTKFACE)")
    from data_pipeline import machine

    began = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(os.environ.get("AGECLS_OUTPUT_DIR", REPO / "outputs"))
    out = args.collect or (args.out or base / "bench" / "quality") / stamp
    for task in args.tasks:
        (out / task).mkdir(parents=True, exist_ok=True)
    args.manifest = source = None
    if args.stride > 1 and not args.quick and args.collect:
        args.manifest = out / f"utkface-stride{args.stride}.csv"
        source = "(from the run folder)"
    elif args.stride > 1 and not args.quick:
        args.manifest, source = strided_manifest(args, out)
        print(f"1 row in {args.stride} of each split of {source}: {args.manifest}", flush=True)
    # The longest jobs first, `--parallel` at a time (the searches cost a few runs' start-up and scoring).
    jobs = [(recipe if args.no_search else search, t) for t in args.tasks]
    jobs += [(dissertation, t) for t in args.tasks]
    if args.collect:  # only tasks whose two sides both finished
        finished = []
        for t in args.tasks:
            try:
                study = read_recipe(t, out) if args.no_search else read_study(t, out)
                if args.retrain and not args.no_search:
                    study = read_retrain(t, out, study)
                finished += [(t, read_dissertation(t, out)), (t, study)]
            except (OSError, KeyError, ValueError) as exc:
                print(f"{t}: not finished in {out} ({exc}); left out", flush=True)
                finished = [f for f in finished if f[0] != t]
        args.tasks = [t for t in args.tasks if any(f[0] == t for f in finished)]
    else:
        print(f"{len(jobs)} jobs, {args.parallel} at a time, under {out}", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [(t, pool.submit(fn, args, t, out)) for fn, t in jobs]
            finished = [(t, f.result()) for t, f in futures]
    tasks: dict[str, list[dict]] = {t: [] for t in args.tasks}
    for t, side in sorted(finished, key=lambda x: x[1]["side"] != "dissertation"):
        tasks[t].append(with_ci(side, args.n_boot))
    for task, sides in tasks.items():
        for s in sides:
            print(
                f"{task:10s} {s['side']:12s} val {s['val_macro_f1']:.4f}  test macro-F1 "
                f"{s['test_macro_f1'][0]:.4f} [{s['test_macro_f1'][1]:.4f}, {s['test_macro_f1'][2]:.4f}]  "
                f"{s['wall_s'] / 60:.1f} min",
                flush=True,
            )
    first = tasks[args.tasks[0]][0]["results"]
    rep = {
        "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "args": args_record(args),
        "data": "generated synthetic faces (quick mode)"
        if args.quick
        else f"real UTKFace at {args.root}"
        + (f", 1 row in {args.stride} of each split of the persisted split {source}" if source else ""),
        "sizes": first["data_sizes"],
        "load_start": load_start,
        "nice": os.nice(0),
        "n_boot": args.n_boot,
        "search": SEARCH,
        "tasks": tasks,
        "out": str(out),
        "seconds": time.perf_counter() - began,
    }
    pairs = {
        t: paired_diff(
            *(next(x for x in ss if x["side"] == s) for s in ("dissertation", "agecls")), args.n_boot
        )
        for t, ss in tasks.items()
    }
    rep["paired"] = {t: p for t, p in pairs.items() if p}
    rep["verdict"] = verdict(rep)
    if args.notes:
        rep["notes"] = read_notes(args.notes, args.write)
    if args.schedule:
        rep["schedule"] = args.schedule
    section = render(rep)
    print(section)
    (out / "quality.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    if args.write and not args.quick:  # the committed record of a section; side runs keep only quality.json
        results = Path(__file__).parent / "results"
        results.mkdir(exist_ok=True)
        slim = {
            **rep,
            "tasks": {
                t: [{k: v for k, v in s.items() if k != "results"} for s in ss] for t, ss in tasks.items()
            },
        }
        (results / f"{section_name(args.size, args.no_search)}.json").write_text(
            json.dumps(slim, indent=1, default=str) + "\n"
        )
    if args.write:
        write_section(args.write, section, *markers(args.size, args.no_search))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
