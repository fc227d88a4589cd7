"""`agecls-report`: the leaderboard of an experiment and the report of its Optuna study."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from agecls.cli.app import App, run
from agecls.cli.args import require
from agecls.errors import AgeclsError

APP = App(
    prog="agecls-report",
    config="report",
    summary="the leaderboard of an MLflow experiment and the report of the Optuna study of that name.",
    usage="agecls-report NAME [KEY=VALUE ...]",
    description="""\
Writes leaderboard.csv/.md (runs ranked by validation macro-F1; the columns are the overrides that differed)
and, for a study, trials.csv, compute.json and plots under out=, and prints them.""",
    examples=(
        "agecls-report demo                               # after `make demo`",
        "agecls-report optuna_optimizers out=reports/opt   # leaderboard, study report, plots",
        "agecls-report name=seed_table2 tracking_uri=sqlite:///outputs/mlflow.db",
    ),
    exit_codes="0 done, 1 no such experiment or study (or another runtime problem), 2 bad arguments",
    positional=("name",),
    options={"--tracking-uri": "tracking_uri", "--storage": "storage", "--out": "out"},
    text_keys=("name", "tracking_uri", "storage", "out"),
)


def _report(cfg: DictConfig, _overrides: list[str]) -> int:
    require(cfg, "name")
    name = str(cfg.name)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from agecls.evaluation.report import leaderboard, load_runs, to_markdown
    from agecls.evaluation.study_report import bins_vary, compute_spent, trials_table, write_plots
    from agecls.study import find_study
    from agecls.tracking import default_tracking

    uri, output_dir, storage = default_tracking()
    uri, storage = str(cfg.tracking_uri or uri), str(cfg.storage or storage)
    out = Path(str(cfg.out)) if cfg.out else output_dir / "reports" / name
    out.mkdir(parents=True, exist_ok=True)

    study = find_study(storage, name)
    try:
        runs = load_runs(uri, name)
    except SystemExit as exc:  # no such experiment: fine when there is a study
        if study is None:
            raise AgeclsError(str(exc.code)) from None
        runs = None
    if runs is not None:
        table = leaderboard(runs)
        table.to_csv(out / "leaderboard.csv", index=False)
        markdown = to_markdown(table)
        (out / "leaderboard.md").write_text(markdown + "\n")
        print(f"\nLeaderboard of {name!r} ({len(table)} runs, ranked by validation macro-F1):\n")
        print(markdown)
    if study is not None:
        trials = trials_table(study)
        trials.to_csv(out / "trials.csv", index=False)
        spent = compute_spent(study)
        (out / "compute.json").write_text(json.dumps(spent, indent=2) + "\n")
        plots = write_plots(study, out, uri, min_importance_trials=int(cfg.min_importance_trials))
        print(f"\nOptuna study {name!r} ({storage}): {len(trials)} trials\n")
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


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _report)


if __name__ == "__main__":
    sys.exit(main())
