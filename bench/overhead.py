"""Framework-overhead benchmark: training through agecls vs a minimal plain-PyTorch loop.

Both sides train the same model class from the same initial weights (seeded identically), on the same
FaceDataModule loaders (same cached images, batch size, sampler, augmentation), with the same optimizer,
threads and deterministic setting, for the same number of epochs, each epoch a training pass and a
validation pass. They run in one process, back to back, alternating which goes first, several times.

  agecls: FaceClassifier + FaceDataModule + the Trainer of `agecls.training.trainer.build_trainer`
          from the composed config (best-checkpoint and early-stopping callbacks, MLflow epoch logging to a
          throwaway store, per-step torchmetrics updates, progress bar as configured, sanity validation).
  plain:  for x, y in loader: zero_grad, loss, backward, step; then predictions on val and macro-F1, the
          best weights kept in memory.

Reported: the medians of whole-fit time (start-up + epochs) and of steady per-epoch time (epochs after the
first), and their ratio agecls / plain - 1 = the overhead. Target: under 5%.

    .venv/bin/python bench/overhead.py                          # print the table
    .venv/bin/python bench/overhead.py --write docs/BENCHMARKS-EARLIER.md    # also rewrite its section
    .venv/bin/python bench/overhead.py --quick                  # CI smoke: tiny synthetic data, seconds
    .venv/bin/python bench/overhead.py --set trainer.enable_progress_bar=false   # try a config change
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sections import machine_text, provenance, read_notes, render_saved, write_section  # bench/ on sys.path

from agecls.config import compose_train

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"
# name -> (overrides, epochs per fit, repeats per side)
CASES: dict[str, tuple[list[str], int, int]] = {
    "dissertation": (["experiment=agecnn", "data.image_size=64"], 2, 2),
    "demo": (["experiment=demo"], 3, 4),
}
QUICK: dict[str, tuple[list[str], int, int]] = {
    "tiny": (
        [
            "data.synthetic.n=200",
            "data.image_size=32",
            "data.batch_size=32",
            "model.blocks=2",
            "model.base_channels=8",
            "model.hidden=16",
        ],
        2,
        2,
    ),
}


class Setup:
    """What both sides share: the composed config, the prepared data module and the class names."""

    def __init__(self, overrides: list[str], epochs: int, store: Path) -> None:
        from omegaconf import OmegaConf

        from agecls.data.prepare import prepare_data
        from agecls.training.settings import resolve_auto
        from agecls.training.train import build_datamodule

        self.cfg = compose_train(
            [
                *overrides,
                f"trainer.max_epochs={epochs}",
                f"trainer.min_epochs={epochs}",
                f"tracking.tracking_uri=sqlite:///{store}/mlflow.db",
                f"tracking.artifact_root={store}/mlartifacts",
                "tracking.experiment=overhead",
                "tracking.log_checkpoint=false",
            ]
        )
        resolve_auto(self.cfg)
        self.resolved = OmegaConf.to_container(self.cfg, resolve=True)
        prepared = prepare_data(self.cfg.data, self.cfg.paths)
        self.datamodule, self.class_names = build_datamodule(self.cfg, prepared)  # as train() does
        self.sizes = {s: len(self.datamodule.indices[s]) for s in ("train", "val")}

    def module(self):
        """A fresh FaceClassifier from the seeded global RNG, built as agecls.training.train builds it."""
        import lightning as L

        from agecls.training.train import build_module

        L.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
        return build_module(self.cfg, self.resolved, self.datamodule, self.class_names)


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _now() -> tuple[float, float]:
    """(wall, CPU) seconds: CPU time of this process, less disturbed than wall time by other processes."""
    return time.perf_counter(), time.process_time()


def _timings(started: tuple[float, float], marks: list[tuple[float, float]]) -> dict:
    """Whole fit, start-up (until the first epoch) and per-epoch seconds, on both clocks."""
    out = {}
    for i, clock in enumerate(("wall", "cpu")):
        t = [m[i] for m in marks]
        out[clock] = {"total": t[-1] - started[i], "startup": t[0] - started[i], "epochs": list(np.diff(t))}
    return out


def run_agecls(setup: Setup, run_dir: Path) -> dict:
    """One fit exactly as agecls.training.train builds it."""
    import lightning as L

    from agecls.tracking import recording
    from agecls.training.trainer import build_trainer

    class EpochClock(L.Callback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.marks.append(_now())

        def on_train_end(self, trainer, pl_module) -> None:
            self.marks.append(_now())

    module = setup.module()
    init = _checksum(module.model)
    clock = EpochClock()
    with recording(setup.cfg.tracking, run_name="overhead") as rec:
        started = _now()
        trainer, checkpoint = build_trainer(setup.cfg, run_dir, rec, [clock])
        trainer.fit(module, datamodule=setup.datamodule)
        clock.marks[-1] = _now()  # include what fit does after on_train_end
    return {
        **_timings(started, clock.marks),
        "init_checksum": init,
        "best_val_macro_f1": float(checkpoint.best_model_score),
    }


def run_plain(setup: Setup) -> dict:
    """The minimal loop: same model, loss, optimizer and loaders, no framework."""
    from hydra.utils import instantiate
    from torchmetrics.functional.classification import multiclass_f1_score

    module = setup.module()  # the same nn.Module (backbone + head) and loss, called as plain PyTorch
    attr = module.attributes[0]
    init = _checksum(module.model)
    started = _now()
    optimizer = instantiate(setup.cfg.optimizer, _convert_="all")(params=module.parameters())
    train_loader = setup.datamodule.train_dataloader()
    val_loader = setup.datamodule.val_dataloader()
    n = len(setup.class_names[attr])
    best, best_state, marks = -1.0, None, []
    for _ in range(int(setup.cfg.trainer.max_epochs)):
        marks.append(_now())
        module.train()
        for x, y in train_loader:
            optimizer.zero_grad(set_to_none=True)
            module.loss(module(x), y).backward()
            optimizer.step()
        module.eval()
        preds, labels = [], []
        with torch.no_grad():
            for x, y in val_loader:
                preds.append(module.heads[attr].decode(module(x)))
                labels.append(y)
        f1 = float(multiclass_f1_score(torch.cat(preds), torch.cat(labels), n, average="macro"))
        if f1 > best:
            best, best_state = f1, {k: v.detach().clone() for k, v in module.state_dict().items()}
    marks.append(_now())
    del best_state
    return {**_timings(started, marks), "init_checksum": init, "best_val_macro_f1": best}


def measure(name: str, overrides: list[str], epochs: int, repeats: int, store: Path) -> dict:
    """`repeats` fits per side, alternating which side goes first (agecls first on even repeats)."""
    setup = Setup(overrides, epochs, store)
    print(f"{name}: {setup.sizes}, {epochs} epochs per fit, {repeats} fits per side", flush=True)
    runs: dict[str, list[dict]] = {"agecls": [], "plain": []}
    for r in range(repeats):
        order = ("agecls", "plain") if r % 2 == 0 else ("plain", "agecls")
        for side in order:
            with tempfile.TemporaryDirectory(prefix="agecls-overhead-") as tmp:
                res = run_agecls(setup, Path(tmp)) if side == "agecls" else run_plain(setup)
            runs[side].append(res)
            w, c = res["wall"], res["cpu"]
            print(
                f"  {side:6s} fit {w['total']:.2f} s wall / {c['total']:.2f} s CPU; epochs (wall) "
                + ", ".join(f"{e:.2f}" for e in w["epochs"])
                + f" s; val F1 {res['best_val_macro_f1']:.3f}",
                flush=True,
            )
    checksums = {s: {round(r["init_checksum"], 6) for r in v} for s, v in runs.items()}
    if checksums["agecls"] != checksums["plain"] or len(checksums["plain"]) != 1:
        raise RuntimeError(f"{name}: the two sides did not start from the same weights: {checksums}")

    def med(side: str, clock: str, key: str) -> float:
        rs = [r[clock] for r in runs[side]]
        if key == "steady":  # epochs after the first; the first when a fit has one epoch
            values = [e for r in rs for e in r["epochs"][1:]] or [r["epochs"][0] for r in rs]
        else:
            values = [r[key] for r in rs]
        return float(np.median(values))

    out = {"case": name, "overrides": overrides, "epochs": epochs, "repeats": repeats, "sizes": setup.sizes}
    out["model"] = {k: setup.resolved["model"][k] for k in ("blocks", "base_channels", "hidden")}
    out["size"] = setup.resolved["data"]["image_size"]
    out["augment"] = setup.resolved["augment"]["name"]
    out["batch_size"] = setup.resolved["data"]["batch_size"]
    for clock in ("wall", "cpu"):
        out[clock] = {}
        for key in ("total", "steady", "startup"):
            a, p = med("agecls", clock, key), med("plain", clock, key)
            out[clock][key] = {"agecls": a, "plain": p, "overhead": a / p - 1 if p > 0 else float("nan")}
        out[clock]["pairs"] = [
            a[clock]["total"] / p[clock]["total"] - 1
            for a, p in zip(runs["agecls"], runs["plain"], strict=True)
        ]
    out["runs"] = runs
    return out


def render(res: dict) -> str:
    m, load = res["machine"], res["load_average"]
    lines = [
        BEGIN,
        "## Framework overhead: agecls (Lightning) vs a plain PyTorch loop",
        "",
        *provenance(
            res["command"],
            f"{machine_text(m)} ({res['threads']} intra-op thread(s) on both sides), lightning "
            f"{res['lightning']}; other jobs shared the cores (1-min load {load['start'][0]} at the start, "
            f"mean {load['during']['mean']} during, max {load['during']['max']}), so process CPU time is the "
            "headline and wall time is shown beside it",
            f"{res['date']} ({res['seconds']:.0f} s in all)",
        ),
        "- Protocol: the same model class, initial weights (checked), loss, optimizer and loaders on both "
        "sides (synthetic faces, the persisted split, decoded cache, 0 workers"
        + (f", `{' '.join(res['extra'])}`" if res["extra"] else "")
        + "). agecls: `FaceClassifier` + `FaceDataModule` + the Trainer of `build_trainer` (checkpoint and "
        "early-stopping callbacks, MLflow epoch logging, sanity validation, torchmetrics). Plain: "
        "`zero_grad/forward/backward/step`, then validation macro-F1 each epoch. Same process, alternating "
        "which side goes first. Fit = trainer set-up through the last epoch; epoch = median after the first; "
        "overhead = agecls / plain - 1 of the medians.",
        "",
        "| case | model (blocks/base/hidden) | px | augment | train/val rows | epochs x fits per side "
        "| fit CPU s: agecls / plain | fit overhead, CPU (per pair) | epoch CPU s: agecls / plain "
        "| epoch overhead, CPU | fit overhead, wall (per pair) | epoch overhead, wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x: float) -> str:
        return f"{100 * x:+.1f}%"

    for c in res["cases"]:
        md, cpu, wall = c["model"], c["cpu"], c["wall"]
        lines.append(
            f"| {c['case']} | {md['blocks']}/{md['base_channels']}/{md['hidden']} | {c['size']} "
            f"| {c['augment']} | {c['sizes']['train']}/{c['sizes']['val']} | {c['epochs']} x {c['repeats']} "
            f"| {cpu['total']['agecls']:.2f} / {cpu['total']['plain']:.2f} "
            f"| {pct(cpu['total']['overhead'])} ({', '.join(map(pct, cpu['pairs']))}) "
            f"| {cpu['steady']['agecls']:.2f} / {cpu['steady']['plain']:.2f} "
            f"| {pct(cpu['steady']['overhead'])} "
            f"| {pct(wall['total']['overhead'])} ({', '.join(map(pct, wall['pairs']))}) "
            f"| {pct(wall['steady']['overhead'])} |"
        )
    worst = max(max(c["cpu"]["total"]["overhead"], c["cpu"]["steady"]["overhead"]) for c in res["cases"])
    lines += [
        "",
        f"- Target (overhead < 5%, CPU time): **{'met' if worst < 0.05 else 'not met'}** "
        f"(largest median overhead {pct(worst)}).",
    ]
    lines += [*res.get("notes", []), END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny synthetic data, 2 fits per side")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), help="cases to run (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs per fit (default: per case)")
    parser.add_argument("--repeats", type=int, help="fits per side (default: per case)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for both sides")
    parser.add_argument("--notes", type=Path, help="Markdown lines to append to the section")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of a markdown file")
    parser.add_argument("--from-json", type=Path, help="render a saved outputs/bench/overhead.json instead")
    args = parser.parse_args(argv)
    if args.from_json:
        return render_saved(args.from_json, render, args.write, (BEGIN, END), args.notes)
    from data_pipeline import LoadSampler, machine

    began = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    load = LoadSampler()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as train() does for the default config
    from agecls.training.trainer import quiet_lightning

    quiet_lightning()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("agecls").setLevel(logging.WARNING)
    cases = QUICK if args.quick else {k: v for k, v in CASES.items() if not args.cases or k in args.cases}
    results = []
    with tempfile.TemporaryDirectory(prefix="agecls-overhead-store-") as store:
        for name, (overrides, epochs, repeats) in cases.items():
            results.append(
                measure(
                    name,
                    [*overrides, *args.set],
                    args.epochs or epochs,
                    args.repeats or repeats,
                    Path(store),
                )
            )
    import lightning

    res = {
        "command": "python bench/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "lightning": lightning.__version__,
        "extra": args.set,
        "threads": torch.get_num_threads(),
        "load_average": {"start": load_start, "during": load.stop()},
        "cases": results,
        "notes": read_notes(args.notes, args.write),
        "seconds": time.perf_counter() - began,
    }
    section = render(res)
    print(section)
    out_dir = Path(os.environ.get("AGECLS_OUTPUT_DIR", REPO / "outputs")) / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "overhead-quick.json" if args.quick else "overhead.json"
    (out_dir / name).write_text(json.dumps(res, indent=1, default=str) + "\n")
    if args.write:
        write_section(args.write, section, BEGIN, END)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
