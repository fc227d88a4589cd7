"""`agecls-report`: the leaderboard of an experiment and the report of its Optuna study."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from agecls.evaluation.report import leaderboard, load_runs, to_markdown
from agecls.tracking import default_tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agecls-report", description=__doc__)
    parser.add_argument("name", help="MLflow experiment (tracking.experiment) and/or Optuna study name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one agecls-train uses)")
    parser.add_argument("--storage", help="Optuna storage URL (default: optuna.storage of agecls-train)")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/reports/<name>)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri, output_dir, storage = default_tracking()
    uri, storage = args.tracking_uri or uri, args.storage or storage
    out = args.out or output_dir / "reports" / args.name
    out.mkdir(parents=True, exist_ok=True)

    from agecls.evaluation.study_report import bins_vary, compute_spent, trials_table, write_plots
    from agecls.study import find_study

    study = find_study(storage, args.name)
    try:
        runs = load_runs(uri, args.name)
    except SystemExit:
        if study is None:
            raise
        runs = None
    if runs is not None:
        table = leaderboard(runs)
        table.to_csv(out / "leaderboard.csv", index=False)
        markdown = to_markdown(table)
        (out / "leaderboard.md").write_text(markdown + "\n")
        print(f"\nLeaderboard of {args.name!r} ({len(table)} runs, ranked by validation macro-F1):\n")
        print(markdown)
    if study is not None:
        trials = trials_table(study)
        trials.to_csv(out / "trials.csv", index=False)
        spent = compute_spent(study)
        (out / "compute.json").write_text(json.dumps(spent, indent=2) + "\n")
        plots = write_plots(study, out, uri)
        print(f"\nOptuna study {args.name!r} ({storage}): {len(trials)} trials\n")
        print(to_markdown(trials.head(20)))
        if bins_vary(trials):
            print(
                "\nNote: these trials used different age bins. Macro-F1 over different bin sets is not "
                "comparable (fewer, wider bins are easier); compare trials of the same k and constraints."
            )
        print("\ncompute: " + ", ".join(f"{k} {v}" for k, v in spent.items() if v))
        print("plots: " + ", ".join(p.name for p in plots))
        print(f"Dashboard:  optuna-dashboard {storage}   (pip install optuna-dashboard)")
    print(f"\nWritten to {out}/")
    if uri.startswith("sqlite:///"):
        print(
            f"Browse every run:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
