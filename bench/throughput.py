"""Training throughput through agecls, per GPU-path setting, against the target of >= 5,000 training images/s
for the final AGECNN at 224 px on an H100-class GPU.

For each variant the config is composed like `agecls-train experiment=agecnn data=utkface ...` and the data
module and model are built exactly as agecls.training.train builds them (`build_datamodule`, `build_module`,
`prepare_model`: the data pipeline, channels_last and torch.compile come from the config). A
lightning.Trainer with the variant's precision then trains `--warmup` + `--steps` optimizer steps, no
validation; a callback times the steps after the warm-up (CUDA-synchronised), so start-up, cache build and
compilation are not in the rate. The variants run one after another in one process.

    .venv/bin/python bench/throughput.py                     # GPU machine: 224 px, real UTKFace
    .venv/bin/python bench/throughput.py --quick             # CPU smoke: 32 px, generated faces, seconds
    .venv/bin/python bench/throughput.py --variants device-bf16-cl --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from sections import current_keys, provenance, render_saved, write_section  # bench/ is on sys.path

from agecls.config import compose_train

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- throughput:begin -->", "<!-- throughput:end -->"
TARGET = 5000  # training images/s of the final AGECNN at 224 px on one H100-class GPU
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "utkface"
# name -> overrides on top of the common ones (the loader variants use --workers DataLoader processes)
VARIANTS: dict[str, list[str]] = {
    "loader-fp32": ["data.pipeline=loader", "trainer.precision=32-true"],
    "loader-bf16-cl": ["data.pipeline=loader", "trainer.precision=bf16-mixed", "trainer.channels_last=true"],
    "device-bf16-cl": ["data.pipeline=device", "trainer.precision=bf16-mixed", "trainer.channels_last=true"],
    "device-bf16-cl-compile": [
        "data.pipeline=device",
        "trainer.precision=bf16-mixed",
        "trainer.channels_last=true",
        "trainer.compile.enabled=true",
    ],
}


class StepClock:
    """Lightning callback: wall time and images of the training steps after `warmup` (device-synchronised)."""

    def __init__(self, warmup: int) -> None:
        import lightning as L

        clock = self

        class _Clock(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if trainer.global_step == warmup and clock.start is None:
                    clock.sync(pl_module)
                    clock.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if clock.start is not None:
                    clock.images += len(batch[0])
                    clock.steps += 1

            def on_train_end(self, trainer, pl_module) -> None:
                clock.sync(pl_module)
                clock.end = time.perf_counter()

        self.callback = _Clock()
        self.start: float | None = None
        self.end: float | None = None
        self.images = self.steps = 0

    @staticmethod
    def sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)


def run_variant(name: str, overrides: list[str], args) -> dict:
    import lightning as L
    from omegaconf import OmegaConf

    from agecls.data.prepare import prepare_data
    from agecls.training.settings import resolve_auto
    from agecls.training.train import build_datamodule, build_module
    from agecls.training.trainer import prepare_model

    cfg = compose_train([*args.common, *overrides])
    resolve_auto(cfg)
    L.seed_everything(int(cfg.seed), verbose=False)
    started = time.perf_counter()
    prepared = prepare_data(cfg.data, cfg.paths)
    prepare_s = time.perf_counter() - started
    datamodule, class_names = build_datamodule(cfg, prepared)
    module = prepare_model(
        cfg, build_module(cfg, OmegaConf.to_container(cfg, resolve=True), datamodule, class_names)
    )
    clock = StepClock(args.warmup)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock.callback],
        default_root_dir=args.out,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_s = time.perf_counter() - fit_started
    seconds = (clock.end or time.perf_counter()) - (clock.start or fit_started)
    result = {
        "variant": name,
        "overrides": overrides,
        "image_size": int(cfg.data.image_size),
        "batch_size": int(cfg.data.batch_size),
        "train_rows": len(datamodule.indices["train"]),
        "timed_steps": clock.steps,
        "timed_images": clock.images,
        "seconds": seconds,
        "images_per_s": clock.images / seconds if seconds > 0 else float("nan"),
        "ms_per_step": 1000 * seconds / max(clock.steps, 1),
        "warmup_and_fit_s": fit_s,
        "prepare_data_s": prepare_s,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
    }
    print(
        f"{name}: {result['images_per_s']:.0f} train images/s ({result['ms_per_step']:.1f} ms/step, "
        f"{clock.steps} timed steps of {result['batch_size']}; fit incl. warm-up {fit_s:.1f} s)",
        flush=True,
    )
    return result


def render(report: dict) -> str:
    """The BENCHMARKS.md section of a throughput report."""
    rows = [r for r in report["results"] if "error" not in r]
    size = rows[0]["image_size"] if rows else "?"
    lines = [
        BEGIN,
        "## Training throughput per GPU-path setting",
        "",
        *provenance(report["command"], f"{report['device']}; torch {report['torch']}", report["date"]),
        f"- Protocol: the final AGECNN (`{current_keys(' '.join(report['common_overrides']))}`) built as "
        "agecls-train builds it, trained by a lightning.Trainer without validation; the rate counts the "
        "steps after the warm-up (compilation and cache staging excluded), device-synchronised.",
        "",
        "| variant | overrides | timed steps x batch | ms per step | train images/s | peak GPU memory, GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | | failed: {r['error'][:200]} | | | |")
            continue
        mem = "-" if r.get("peak_gpu_memory_gib") is None else f"{r['peak_gpu_memory_gib']:.1f}"
        lines.append(
            f"| {r['variant']} | `{current_keys(' '.join(r['overrides']))}` "
            f"| {r['timed_steps']} x {r['batch_size']} "
            f"| {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | {mem} |"
        )
    best = max(rows, key=lambda r: r["images_per_s"]) if rows else None
    if best and size == 224:
        met = "met" if best["images_per_s"] >= TARGET else "not met"
        lines += [
            "",
            f"Target (>= {TARGET} training images/s at 224 px): **{met}** ({best['variant']}: "
            f"{best['images_per_s']:.0f} images/s; one epoch of {best['train_rows']} training images "
            f"then takes {best['train_rows'] / best['images_per_s']:.1f} s of training steps).",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("AGECLS_UTKFACE", DEFAULT_ROOT)))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12, help="DataLoader workers of the loader variants")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, autotune)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every variant")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: 32 px generated faces, few steps")
    parser.add_argument("--out", type=Path, help="where to write throughput.json (default outputs/bench)")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of a markdown file")
    parser.add_argument("--from-json", type=Path, help="render a saved throughput.json instead of running")
    args = parser.parse_args(argv)
    if args.from_json:
        return render_saved(args.from_json, render, args.write, (BEGIN, END))
    if args.quick:
        args.size, args.batch_size, args.workers, args.steps, args.warmup = 32, 32, 0, 4, 2
        data = ["data.synthetic.n=300", "model.blocks=2", "model.base_channels=8", "model.hidden=16"]
        args.variants = [v for v in args.variants if "compile" not in v]  # inductor compiles for minutes
    elif args.root.is_dir():
        data = ["data=utkface", f"data.root={args.root}"]
    else:
        print(f"UTKFace folder not found at {args.root}: using the generated faces", flush=True)
        data = ["data.synthetic.n=4000"]
    out_root = Path(os.environ.get("AGECLS_OUTPUT_DIR", REPO / "outputs")) / "bench"
    args.out = args.out or out_root
    args.out.mkdir(parents=True, exist_ok=True)
    args.common = [
        "experiment=agecnn",
        *data,
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "tracking=none",
        *args.set,
    ]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    print(
        f"device: {device}; torch {torch.__version__}; common overrides: {' '.join(args.common)}", flush=True
    )
    results = []
    for name in args.variants:
        try:
            results.append(run_variant(name, VARIANTS[name], args))
        except Exception as exc:  # one failing variant (e.g. a compiler missing) must not lose the others
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            results.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device,
        "torch": torch.__version__,
        "command": "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "common_overrides": args.common,
        "results": results,
    }
    path = args.out / "throughput.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    section = render(report)
    print(section)
    if args.write:
        write_section(args.write, section, BEGIN, END)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
