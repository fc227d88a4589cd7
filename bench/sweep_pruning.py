"""Benchmark: the same Optuna study with and without pruning, back to back, on the synthetic faces.

Reports best validation macro-F1, epochs trained, worker and wall time, and the epochs at which each
study first reached its best value. Writes bench/results/sweep_pruning.json; prints a Markdown table.

    .venv/bin/python bench/sweep_pruning.py [--trials 8] [--jobs 2] [--epochs 20] \\
        [--write docs/BENCHMARKS-EARLIER.md]
    .venv/bin/python bench/sweep_pruning.py --from-json bench/results/sweep_pruning.json \\
        --write docs/BENCHMARKS-EARLIER.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from sections import provenance, write_section

from agecls.evaluation.study_report import compute_spent


def run_study(out: Path, name: str, pruner: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "agecls.cli.train",
        "-m",
        "experiment=demo",
        "sweep=demo",
        f"optuna.study_name={name}",
        f"optuna.n_trials={args.trials}",
        f"optuna.n_jobs={args.jobs}",
        f"optuna/pruner={pruner}",
        f"trainer.max_epochs={args.epochs}",
        f"tracking.experiment={name}",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/optuna.db")
    spent = compute_spent(study)
    # Epochs spent (in trial order) until the study first held its best value.
    best = study.best_trial
    epochs_to_best = 0
    for t in sorted(study.trials, key=lambda t: t.number):
        epochs_to_best += len(t.intermediate_values)
        if t.number == best.number:
            break
    return {
        "pruner": pruner,
        "best_val_macro_f1": round(best.value, 4),
        "best_trial_test_macro_f1": round(float(best.user_attrs.get("test/macro_f1", float("nan"))), 4),
        "epochs_trained": spent["epochs_trained"],
        "epochs_to_best": epochs_to_best,
        "trials_complete": spent["trials_complete"],
        "trials_pruned": spent["trials_pruned"],
        "worker_hours": spent["worker_hours"],
        "wall_seconds": round(wall, 1),
    }


BEGIN, END = "<!-- sweep_pruning:begin -->", "<!-- sweep_pruning:end -->"


def section(result: dict) -> str:
    """This benchmark's BENCHMARKS.md section, from its JSON result."""
    rows = result["rows"]
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    pruned, full = rows
    settings = result["settings"]
    return "\n".join(
        [
            BEGIN,
            "## Sweep efficiency: a pruned vs an unpruned Optuna study",
            "",
            *provenance(
                f".venv/bin/python bench/sweep_pruning.py --trials {settings['trials']} "
                f"--jobs {settings['jobs']} --epochs {settings['epochs']}",
                f"{result['machine']}; torch {result['torch']}, optuna {result['optuna']}",
                result.get("date", "not recorded"),
            ),
            f"- Protocol: the `make demo` study ({settings['data']}; optimizer, learning rate and blocks "
            "searched by TPE, seed 42) run twice back to back, with `optuna/pruner=median` and "
            "`optuna/pruner=none`.",
            "",
            *table,
            "",
            f"- Pruned / unpruned: {result['epoch_ratio_pruned_over_unpruned']} of the epochs, "
            f"{result['wall_ratio_pruned_over_unpruned']} of the wall time.",
            "- The unpruned study found the better best trial on validation "
            f"({full['best_val_macro_f1']} vs {pruned['best_val_macro_f1']}); on test the two are level "
            f"({full['best_trial_test_macro_f1']} vs {pruned['best_trial_test_macro_f1']}). With "
            f"{settings['trials']} trials and a 4-epoch warm-up the median pruner also stopped trials that "
            "were still improving: it saves compute, and pays in studies of tens of trials.",
            "- One run each, with other processes on the cores: read the epoch ratio, not the seconds.",
            END,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of this Markdown file")
    parser.add_argument("--from-json", type=Path, help="render a saved result instead of running")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if args.write:
            write_section(args.write, section(result), BEGIN, END)
        print(section(result))
        return
    with tempfile.TemporaryDirectory(prefix="agecls-bench-") as tmp:
        out = Path(tmp)
        rows = [run_study(out, f"bench-{p}", p, args) for p in ("median", "none")]
    pruned, full = rows
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        + ("CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "settings": {k: vars(args)[k] for k in ("trials", "jobs", "epochs")}
        | {"data": "synthetic n=2000, 64 px grey (experiment=demo sweep=demo)"},
        "rows": rows,
        "epoch_ratio_pruned_over_unpruned": round(pruned["epochs_trained"] / full["epochs_trained"], 3),
        "wall_ratio_pruned_over_unpruned": round(pruned["wall_seconds"] / full["wall_seconds"], 3),
    }
    if args.write:
        write_section(args.write, section(result), BEGIN, END)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "sweep_pruning.json").write_text(json.dumps(result, indent=2) + "\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    print(
        f"\nepochs pruned/unpruned: {result['epoch_ratio_pruned_over_unpruned']}, "
        f"wall: {result['wall_ratio_pruned_over_unpruned']} ({result['machine']})"
    )


if __name__ == "__main__":
    main()
