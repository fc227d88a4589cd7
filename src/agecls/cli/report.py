"""`agecls-report`: the leaderboard of an experiment and the report of its Optuna study."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from agecls.cli.app import App, run
from agecls.cli.args import require

APP = App(
    prog="agecls-report",
    config="report",
    summary="the leaderboard of an MLflow experiment and the report of the Optuna study of that name.",
    usage="agecls-report NAME [KEY=VALUE ...]",
    description="""\
Writes leaderboard.csv/.md (runs ranked by validation macro-F1; the columns are the overrides that differed)
and, for a study, trials.csv, compute.json and plots under out=, and prints them; a study's report ends with
its best trial's checkpoint and the agecls-predict and agecls-serve commands that use it. A study of several
objectives gets its Pareto front instead: pareto_front.png, pareto.csv (each front trial's objectives with 95%
bootstrap intervals on validation) and its named points (best_f1, fairest, smallest; rule= adds one).""",
    examples=(
        "agecls-report demo                               # after `make demo`",
        "agecls-report optuna_optimizers out=reports/opt   # leaderboard, study report, plots",
        "agecls-report name=seed_table2 tracking_uri=sqlite:///outputs/mlflow.db",
        "agecls-report pareto_fairness n_boot=200        # a Pareto study: pareto.csv, pareto_front.png",
    ),
    exit_codes="0 done, 1 no such experiment or study (or another runtime problem), 2 bad arguments",
    positional=("name",),
    options={"--tracking-uri": "tracking_uri", "--storage": "storage", "--out": "out"},
    text_keys=("name", "tracking_uri", "storage", "out", "rule"),
)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _shown(path: Path) -> str:
    """A path as a command should name it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _program(name: str) -> str:
    """A command of this environment as the user can type it wherever they stand: its name when PATH finds
    this environment's, else its absolute path beside this interpreter (a checkout's .venv/bin off PATH)."""
    beside = Path(os.path.abspath(sys.executable)).parent / name  # not resolved: a venv's python links out
    found = shutil.which(name)
    if not beside.is_file():
        return name
    return name if found and Path(found).resolve() == beside.resolve() else str(beside)


def _installed(name: str) -> bool:
    """Whether the command `name` is beside this interpreter or on PATH."""
    return (Path(os.path.abspath(sys.executable)).parent / name).is_file() or shutil.which(name) is not None


def _run_key(run_dir: Path, key: str) -> str | None:
    """A key of the run's resolved config.yaml, or None."""
    from omegaconf import OmegaConf

    config = run_dir / "config.yaml"
    value = OmegaConf.select(OmegaConf.load(config), key, default=None) if config.is_file() else None
    return None if value is None else str(value)


def _a_photo(run_dir: Path) -> Path | None:
    """One face image of the folder the run trained on (its config's data.root), or None."""
    root = _run_key(run_dir, "data.root")
    if not root or not Path(str(root)).is_dir():
        return None
    names = sorted(
        e.name for e in os.scandir(str(root)) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
    )
    return Path(str(root)) / names[0] if names else None


def _registered(uri: str, name: str, alias: str, run_id: Any) -> str | None:
    """`models:/NAME@ALIAS` when that alias points at the run's version, else None."""
    try:
        from mlflow import MlflowClient

        version = MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no registry, no such model or alias: the checkpoint path serves
        return None
    return f"models:/{name}@{alias}" if run_id and version.run_id == run_id else None


def _interval(row: Any, name: str) -> str:
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    return "" if lo is None or hi is None or lo != lo else f" [{lo:.4f}, {hi:.4f}]"


def pareto_lines(
    study, uri: str, front: Any, rule: str | None = None, storage: str | None = None
) -> list[str]:
    """The named points of a multi-objective study's front (pareto.csv rows): each one's objectives with
    their validation intervals and the agecls-serve command that serves it (its registered alias when there
    is one, else its checkpoint), then the agecls-register command for those not registered yet."""
    from agecls.evaluation.pareto import objective_names

    names, model = objective_names(study), f"agecls-{study.study_name}"
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    lines, unregistered = ["\nNamed points of the front (validation; [95% bootstrap interval]):"], []
    for _, row in front.iterrows():
        trial = trials[int(row["trial"])]
        run_dir = Path(str(trial.user_attrs.get("run_dir") or ""))
        ckpt = Path(str(trial.user_attrs.get("checkpoint") or run_dir / "checkpoints" / "best.ckpt"))
        for alias in [a for a in str(row.get("named") or "").split(",") if a]:
            shown = ", ".join(f"{n} {row[n]:.4g}{_interval(row, n)}" for n in names if row.get(n) is not None)
            registered = _registered(uri, model, alias, trial.user_attrs.get("mlflow_run_id"))
            if not registered:
                unregistered.append(alias)
            lines.append(f"  {alias}: trial {trial.number}: {shown}")
            if registered:
                lines.append(f"    {_program('agecls-serve')} ckpt={registered} tracking_uri={uri}")
            elif trial.user_attrs.get("run_dir") and ckpt.is_file():
                lines.append(f"    {_program('agecls-serve')} ckpt={_shown(ckpt)}")
            else:
                lines.append(f"    (no checkpoint at {_shown(ckpt)})")
    if unregistered:
        command = f"{_program('agecls-register')} study={study.study_name} tracking_uri={uri}"
        command += f" storage={storage}" if storage else ""
        named = [a for a in unregistered if a != "rule"]
        commands = [f"{command}   ({model}@{', @'.join(named)})"] if named else []
        if rule and "rule" in unregistered:
            commands.append(f'{command} rule="{rule}"   ({model}@rule)')
        lines.append("Register them: " + "\n               ".join(commands))
    return lines


def best_model_lines(study, uri: str) -> list[str]:
    """How to use a study's best trial: its checkpoint, its registered MLflow model (alias `best`) when there
    is one, and the agecls-predict / agecls-serve commands that run it on a photo of its own data. A study
    of several objectives has no single best trial: none (pareto_lines names its points)."""
    from agecls.evaluation.pareto import is_multi

    if is_multi(study):
        return []
    try:
        best = study.best_trial
    except ValueError:
        return []
    run_dir = Path(str(best.user_attrs.get("run_dir", "")))
    ckpt = Path(str(best.user_attrs.get("checkpoint") or run_dir / "checkpoints" / "best.ckpt"))
    if not best.user_attrs.get("run_dir") or not ckpt.is_file():
        return [f"\nThe best trial ({best.number}) left no checkpoint at {ckpt}."]
    name = f"agecls-{study.study_name}"
    registered = _registered(uri, name, "best", best.user_attrs.get("mlflow_run_id"))
    source = f"ckpt={registered} tracking_uri={uri}" if registered else f"ckpt={_shown(ckpt)}"
    lines = [
        f"\nUse the best model (trial {best.number}, {_run_key(run_dir, 'objective.metric') or 'value'} "
        f"{best.value:.4f}):",
        f"  checkpoint: {_shown(ckpt)}",
    ]
    if registered:
        lines.append(f"  registered: {registered} in {uri}")
    photo = _a_photo(run_dir)
    # the training folder holds face crops: no face detection on them
    images = f"images={_shown(photo)} detect=false" if photo else "images=PHOTO.jpg"
    lines += [
        f"  {_program('agecls-predict')} ckpt={_shown(ckpt)} {images} out=predictions",
        f"  {_program('agecls-serve')} {source}{' detect=false' if photo else ''}"
        "   # then open http://127.0.0.1:8000/ and upload a photo",
    ]
    return lines


def _leaderboard(uri: str, name: str, study, out: Path) -> None:
    """leaderboard.csv/.md of experiment `name`, else of study `name`'s runs in the experiment they went to
    (a study named apart from its experiment); NoSuchExperiment when neither exists, a note when only the
    study does."""
    from agecls.evaluation.report import NoSuchExperiment, leaderboard, load_runs, to_markdown
    from agecls.evaluation.study_report import study_runs

    what = repr(name)
    try:
        runs = load_runs(uri, name)
    except NoSuchExperiment as missing:
        if study is None:
            raise
        found = study_runs(uri, name)
        if found is None:
            print(
                f"\nNo leaderboard: {missing}, and none of its runs is tagged optuna.study={name}. Pass the "
                "store the study's runs went to: tracking_uri=... (its tracking.tracking_uri)."
            )
            return
        experiment, runs = found
        what = f"study {name!r} (its runs in MLflow experiment {experiment!r})"
    table = leaderboard(runs)
    table.to_csv(out / "leaderboard.csv", index=False)
    markdown = to_markdown(table)
    (out / "leaderboard.md").write_text(markdown + "\n")
    print(f"\nLeaderboard of {what} ({len(table)} runs, ranked by validation macro-F1):\n")
    print(markdown)


def _study_report(cfg: DictConfig, study, storage: str, uri: str, out: Path, rule) -> list[str]:
    """trials.csv, compute.json, the plots and (several objectives) pareto.csv of the study, printed; returns
    the lines that say how to use its best model (or its front's named points)."""
    from agecls.evaluation.pareto import is_multi, pareto_table
    from agecls.evaluation.report import to_markdown
    from agecls.evaluation.study_report import bins_vary, compute_spent, trials_table, write_plots

    name, best_lines = study.study_name, []
    trials = trials_table(study)
    trials.to_csv(out / "trials.csv", index=False)
    spent = compute_spent(study)
    (out / "compute.json").write_text(json.dumps(spent, indent=2) + "\n")
    plots = write_plots(study, out, uri, min_importance_trials=int(cfg.min_importance_trials))
    print(f"\nOptuna study {name!r} ({storage}): {len(trials)} trials\n")
    print(to_markdown(trials.head(20)))
    if is_multi(study):
        front = pareto_table(study, n_boot=int(cfg.n_boot), rule=rule)
        front.to_csv(out / "pareto.csv", index=False)
        if front.empty:
            print("\nPareto front: no complete trial yet")
        else:
            print(f"\nPareto front: {len(front)} trials (pareto.csv, pareto_front.png)\n")
            short = front["mlflow_run_id"].map(lambda v: str(v)[:8] if v else "")
            print(to_markdown(front.drop(columns=["run_dir", "mlflow_run_id"]).assign(run=short)))
            best_lines = pareto_lines(
                study, uri, front, rule.text if rule else None, str(cfg.storage) if cfg.storage else None
            )
    if bins_vary(trials):
        print(
            "\nNote: these trials used different age bins. Macro-F1 over different bin sets is not "
            "comparable (fewer, wider bins are easier); compare trials of the same k and constraints."
        )
    print("\ncompute: " + ", ".join(f"{k} {v}" for k, v in spent.items() if v))
    print("plots: " + ", ".join(p.name for p in plots))
    print(dashboard_line(storage))
    return best_lines if is_multi(study) else best_model_lines(study, uri)


def dashboard_line(storage: str) -> str:
    """How to open the study in optuna-dashboard from where the user stands."""
    if _installed("optuna-dashboard"):
        return f"Dashboard:  {_program('optuna-dashboard')} {storage}"
    return f"Dashboard:  pip install 'agecls[dashboard]', then optuna-dashboard {storage}"


def browse_line(uri: str) -> str:
    """How to browse every run of the MLflow store in its UI from where the user stands."""
    return f"Browse every run:  {_program('mlflow')} ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"


def _report(cfg: DictConfig, _overrides: list[str]) -> int:
    require(cfg, "name")
    name = str(cfg.name)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from agecls.evaluation.pareto import parse_rule
    from agecls.study import find_study
    from agecls.tracking import default_tracking

    rule = parse_rule(str(cfg.rule)) if cfg.rule else None  # an unreadable rule stops before any work
    uri, output_dir, storage = default_tracking()
    uri, storage = str(cfg.tracking_uri or uri), str(cfg.storage or storage)
    out = Path(str(cfg.out)) if cfg.out else output_dir / "reports" / name
    out.mkdir(parents=True, exist_ok=True)

    study = find_study(storage, name)
    _leaderboard(uri, name, study, out)
    best_lines = _study_report(cfg, study, storage, uri, out, rule) if study is not None else []
    print(f"\nWritten to {out}/")
    if uri.startswith("sqlite:///"):
        print(browse_line(uri))
    if best_lines:
        print("\n".join(best_lines))  # last, where a finished `make demo` leaves the terminal
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(APP, argv, _report)


if __name__ == "__main__":
    sys.exit(main())
