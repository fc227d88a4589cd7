"""Trial throughput of agecls's Optuna sweeper: what a study spends outside its trials' training.

Three measurements, each side by side in one run of this script:

  overhead  the short study of `make demo`'s setup (6 trials of 1 epoch on 64 faces at 16 px, one slot),
            trials forked from the pre-imported template (`optuna.trial_start=template`, the default) and
            as fresh interpreters (`fresh`): per-trial overhead = (trials' wall - sum of fit seconds) / n.
  ratio     a study of --trials short trials on every slot of the machine (`optuna.n_jobs` = CPU cores),
            against the floor: the same configs trained in one process by a plain `optuna.study.optimize`
            loop calling agecls's training function. Ratio = (wall - ideal) / ideal, ideal = sum of fit
            seconds / slots (Ray Tune's acceptance test allows 28%).
  precision `make utkface`'s model (experiment=utkface: the whole real split, 32 px, 8 epochs) trained with
            the machine's `auto` precision and memory format and with 32-true contiguous, per seed, one after
            the other: fit seconds and test macro-F1 per attribute with 95% bootstrap intervals, and the
            paired bootstrap difference auto - float32 (needs UTKFace).
  real      trials per hour of one real-data protocol (experiment=agecnn on 1/3 of UTKFace's split, 32 px,
            4-epoch trials, one slot) with the machine's `auto` precision and memory format against
            `trainer.precision=32-true trainer.channels_last=false` (needs UTKFace; skipped without it).

    .venv/bin/python bench/trials.py                          # all three, print the tables
    .venv/bin/python bench/trials.py --write BENCHMARKS.md    # also rewrite this benchmark's section
    .venv/bin/python bench/trials.py --parts overhead --quick # CI smoke: seconds
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
from datetime import datetime
from pathlib import Path

import optuna
import torch
from sections import provenance, write_section  # bench/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
UTKFACE = Path(os.environ.get("AGECLS_UTKFACE", REPO.parent / "shared" / "data" / "utkface"))
SHORT = ["experiment=demo", "trainer.max_epochs=1", "data.synthetic.n=64", "data.image_size=16"]
STUDY = ["sweep=demo", "optuna/pruner=none", "optuna.register_best=false"]


def cpu_name() -> str:
    """The CPU's model name and its bf16 instructions (what `auto` precision looks at)."""
    from agecls.training.settings import cpu_bf16

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({cpu_bf16() or 'no AVX512-BF16 or AMX'})"


def run_study(out: Path, name: str, overrides: list[str]) -> dict:
    """One `agecls-train -m` study in its own output folder; its trials' timings from the study."""
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out / name)}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *overrides, f"optuna.study_name={name}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / name}/optuna.db")
    return timings(study.get_trials(), wall)


def timings(trials: list, command_wall: float) -> dict:
    """Loop wall (first trial start to last end), sum of fit seconds and the command's wall."""
    done = [t for t in trials if t.datetime_complete is not None]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    return {
        "trials": len(done),
        "command_wall_s": round(command_wall, 1),
        "trials_wall_s": round((last - first).total_seconds(), 1),
        "fit_s": round(sum(float(t.user_attrs.get("fit_seconds", 0.0)) for t in done), 1),
    }


def overhead(out: Path, quick: bool) -> list[dict]:
    rows = []
    n = 3 if quick else 6
    for start in ("template", "fresh"):
        got = run_study(
            out,
            f"overhead-{start}",
            [*SHORT, *STUDY, f"optuna.n_trials={n}", "optuna.n_jobs=1", f"optuna.trial_start={start}"],
        )
        got["per_trial_overhead_s"] = round((got["trials_wall_s"] - got["fit_s"]) / got["trials"], 2)
        rows.append({"trial_start": start, **got})
    return rows


def floor_study(overrides: list[str], n_trials: int, out: Path) -> dict:
    """The same study's trials trained in this process by a plain optuna loop: the floor of the sweeper."""
    from agecls.config import compose_train, register_resolvers
    from agecls.training.train import train

    register_resolvers()
    os.environ["AGECLS_OUTPUT_DIR"] = str(out / "floor")
    sampler = optuna.samplers.TPESampler(seed=42)
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        # sweep=demo's space, drawn the same way
        optimizer = trial.suggest_categorical("optimizer", ["adam", "nadam", "rmsprop"])
        lr = trial.suggest_float("optimizer.lr", 3e-4, 3e-3, log=True)
        blocks = trial.suggest_int("model.blocks", 2, 4)
        cfg = compose_train(
            [
                *overrides,
                f"optimizer={optimizer}",
                f"optimizer.lr={lr}",
                f"model.blocks={blocks}",
                f"hydra.run.dir={out / 'floor' / str(trial.number)}",
            ]
        )
        results = train(cfg)
        trial.set_user_attr("fit_seconds", results["fit_seconds"])
        return float(results["objective"])

    started = time.monotonic()
    study.optimize(objective, n_trials=n_trials)
    return timings(study.trials, time.monotonic() - started)


def ratio(out: Path, trials: int, epochs: int, quick: bool) -> list[dict]:
    slots = os.cpu_count() or 1
    base = [
        "experiment=demo",
        f"trainer.max_epochs={epochs}",
        "data.synthetic.n=600",
        "data.image_size=32",
        "callbacks.early_stopping.enabled=false",
    ]
    n = 4 if quick else trials
    study = run_study(out, "ratio", [*base, *STUDY, f"optuna.n_trials={n}", f"optuna.n_jobs={slots}"])
    floor = floor_study([*base, "tracking=none"], n, out)
    rows = []
    for name, got, n_slots in (("agecls sweeper", study, slots), ("in-process optuna loop", floor, 1)):
        ideal = got["fit_s"] / n_slots
        rows.append(
            {
                "runner": name,
                "slots": n_slots,
                **got,
                "ideal_s": round(ideal, 1),
                "ratio_trials": round((got["trials_wall_s"] - ideal) / ideal, 3),
                "ratio_command": round((got["command_wall_s"] - ideal) / ideal, 3),
            }
        )
    return rows


def real(out: Path, trials: int) -> list[dict]:
    if not UTKFACE.is_dir():
        print(f"no UTKFace folder at {UTKFACE}: the real-data part is skipped", file=sys.stderr)
        return []
    sys.path.insert(0, str(REPO / "bench"))
    from quality import strided_manifest

    manifest, _ = strided_manifest(argparse.Namespace(root=UTKFACE, stride=3), out)
    data = [
        "experiment=agecnn",
        "data=manifest",
        f"data.path={manifest}",
        f"data.root={UTKFACE}",
        "data.image_size=32",
        "trainer.max_epochs=4",
        "callbacks.early_stopping.enabled=false",
    ]
    rows = []
    for name, extra in (
        ("auto", []),
        ("32-true contiguous", ["trainer.precision=32-true", "trainer.channels_last=false"]),
    ):
        got = run_study(
            out,
            f"real-{name.split()[0]}",
            [
                *data,
                *extra,
                "sweep=optuna_optimizers",
                "optuna/pruner=none",
                "optuna.register_best=false",
                f"optuna.n_trials={trials}",
                "optuna.n_jobs=1",
            ],
        )
        got["trials_per_hour"] = round(3600 * got["trials"] / got["trials_wall_s"], 1)
        rows.append({"setting": name, **got})
    return rows


FLOAT32 = ["trainer.precision=32-true", "trainer.channels_last=false"]
ATTRIBUTES = ("age", "gender", "ethnicity")


def single_run(out: Path, name: str, overrides: list[str]) -> Path:
    """One `agecls-train` run (no tracking) in out/name; its run folder."""
    run_dir = out / name
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out / "outputs")}
    cmd = [sys.executable, "-m", "agecls.cli.train", *overrides, "tracking=none", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return run_dir


def run_predictions(run_dir: Path) -> dict[str, tuple]:
    """{attribute: (preds, labels, n_classes)} of a multitask run's test faces with that label."""
    import numpy as np
    import pandas as pd

    table = pd.read_csv(run_dir / "predictions_test.csv")
    got = {}
    for attr in ATTRIBUTES:
        known = table[f"label_{attr}"].to_numpy() >= 0
        n_classes = sum(c.startswith(f"p_{attr}_") for c in table.columns)
        got[attr] = (
            table[f"pred_{attr}"].to_numpy()[known],
            table[f"label_{attr}"].to_numpy()[known],
            n_classes,
        )
        assert np.all(got[attr][1] < n_classes)
    return got


def precision(out: Path, seeds: int) -> dict:
    """experiment=utkface with `auto` and with float32, seed by seed (alternating which goes first)."""
    from agecls.evaluation.bootstrap import bootstrap_ci, bootstrap_diff

    if not UTKFACE.is_dir():
        print(f"no UTKFace folder at {UTKFACE}: the precision part is skipped", file=sys.stderr)
        return {}
    rows, diffs = [], []
    for seed in range(seeds):
        settings = [("auto", []), ("32-true contiguous", FLOAT32)]
        preds = {}
        for name, extra in settings if seed % 2 == 0 else settings[::-1]:
            base = ["experiment=utkface", f"data.root={UTKFACE}", f"seed={seed}", *extra]
            run_dir = single_run(out, f"precision-{name.split()[0]}-{seed}", base)
            results = json.loads((run_dir / "results.json").read_text())
            preds[name] = run_predictions(run_dir)
            row = {"setting": name, "seed": seed, "fit_s": results["fit_seconds"]}
            for attr, (p, t, k) in preds[name].items():
                point, lo, hi = bootstrap_ci(p, t, k)
                row[f"test {attr} macro-F1"] = f"{point:.3f} [{lo:.3f}, {hi:.3f}]"
            rows.append(row)
        diff = {"seed": seed}
        for attr in ATTRIBUTES:
            pa, t, k = preds["auto"][attr]
            pb = preds["32-true contiguous"][attr][0]
            d = bootstrap_diff(pa, pb, t, k)
            diff[f"{attr}: auto - float32"] = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
        diffs.append(diff)
    fit = {
        name: [r["fit_s"] for r in rows if r["setting"] == name] for name in ("auto", "32-true contiguous")
    }
    speedup = sum(fit["32-true contiguous"]) / sum(fit["auto"])
    return {"rows": rows, "diffs": diffs, "speedup": round(speedup, 2)}


def table(rows: list[dict]) -> list[str]:
    keys = list(rows[0])
    return [
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        *("| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows),
    ]


TITLES = {
    "studies": "Trial throughput: what a study spends outside training",
    "precision": "Precision on a bf16 CPU: `auto` against float32, experiment=utkface",
    "real": "Trials per hour on real data: `auto` against float32",
}
CAPTIONS = {
    "studies": "Overhead per trial = (trials' wall x slots - fit seconds) / trials; ratio = (wall - ideal) / "
    "ideal, ideal = fit seconds / slots. 1-epoch trials: 64 faces, 16 px; 2-second: 600 faces, 32 px.",
    "precision": "The whole real split, 32 px, 8 epochs, one run after the other per seed; test macro-F1 and "
    "its 95% bootstrap interval.",
    "real": "experiment=agecnn on 1/3 of UTKFace's split, 32 px, 4-epoch trials, one slot.",
}
PARTS = {"studies": ("overhead", "ratio"), "precision": ("precision",), "real": ("real",)}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- trials-{name}:begin -->", f"<!-- trials-{name}:end -->"


def study_row(study: str, runner: str, slots: int, got: dict) -> dict:
    wall, fit, n = float(got["trials_wall_s"]), float(got["fit_s"]), int(got["trials"])
    ideal = fit / slots
    return {
        "trials": f"{n} x {study}",
        "runner": runner,
        "slots": slots,
        "trials_wall_s": wall,
        "fit_s": fit,
        "overhead_per_trial_s": round((wall * slots - fit) / n, 2),
        "ratio": round((wall - ideal) / ideal, 2),
    }


def table_rows(result: dict, name: str) -> list[dict]:
    if name == "precision":
        return result["precision"]["rows"]
    if name == "real":
        return result["real"]
    rows = [
        study_row("1-epoch", f"sweeper, trial_start={r['trial_start']}", 1, r) for r in result["overhead"]
    ]
    for r in result["ratio"]:
        runner = "sweeper, trial_start=template" if r["runner"] == "agecls sweeper" else r["runner"]
        rows.append(study_row("2-second", runner, int(r["slots"]), r))
    return rows


def section(result: dict, name: str) -> str:
    """One section: provenance (of each run that measured its parts), caption, table and reading."""
    begin, end = markers(name)
    runs = {json.dumps(result["measured"][p], sort_keys=True) for p in PARTS[name]}
    lines = [begin, f"## {TITLES[name]}", ""]
    for when in sorted(runs):
        run = json.loads(when)
        lines += provenance(run["command"], result["machine"], run["date"])
    lines += [
        "",
        CAPTIONS[name],
        "",
        *table(table_rows(result, name)),
        "",
        *result["reading"].get(name, []),
        end,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="overhead,ratio,precision,real")
    parser.add_argument("--trials", type=int, default=50, help="trials of the ratio study")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each ratio trial")
    parser.add_argument("--real-trials", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the precision part")
    parser.add_argument("--quick", action="store_true", help="CI smoke: a few tiny trials")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of this Markdown file")
    parser.add_argument("--from-json", type=Path, help="render a saved result instead of running")
    args = parser.parse_args()
    saved = REPO / "bench" / "results" / "trials.json"
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        parts = args.parts.split(",")
        # a run of some parts keeps the saved figures of the others (each part says when it was measured)
        result = json.loads(saved.read_text()) if saved.is_file() and not args.quick else {}
        result.update(
            {
                "command": "python bench/trials.py " + " ".join(sys.argv[1:]),
                "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
                "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores, "
                + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
                + f"; torch {torch.__version__}",
            }
        )
        measured = result.setdefault("measured", {})
        with tempfile.TemporaryDirectory(prefix="agecls-trials-") as tmp:
            out = Path(tmp)
            runs = {
                "overhead": lambda: overhead(out, args.quick),
                "ratio": lambda: ratio(out, args.trials, args.epochs, args.quick),
                "precision": lambda: None if args.quick else precision(out, args.seeds),
                "real": lambda: None if args.quick else real(out, args.real_trials),
            }
            for part in parts:
                got = runs[part]()
                if got is not None:
                    result[part] = got
                    measured[part] = {"command": result["command"], "date": result["date"]}
        if not args.quick:
            saved.write_text(json.dumps(result, indent=2) + "\n")
    for name, parts in PARTS.items():
        if all(part in result.get("measured", {}) for part in parts):
            if args.write:
                write_section(args.write, section(result, name), *markers(name))
            print(section(result, name))


if __name__ == "__main__":
    main()
