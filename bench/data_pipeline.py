"""Data-pipeline benchmark: is the decoded cache worth it, and is training data-bound?

Measures, in one process and back to back:
  (a) per-epoch JPEG decode + resize + augment (the naive path: PIL, the same `decode_image` the cache uses)
  (b) the decoded memory-mapped cache + the same augment,
for DataLoader num_workers 0, 1, 2, as images/s over a full epoch and the ratio (b)/(a);
  (d) the cache staged as one tensor + the same augment translated to batched per-sample torch operations
      (`data.pipeline=device`, run here on the CPU), against (a) at 0 workers, alternating; and
  (c) the share of step time spent waiting for the next batch when training the basic CNN on batches from
      the cache loader (the dissertation's 4-block base-64 hidden-132 model and the demo's base-16 hidden-64).

Real UTKFace faces when the folder exists (a few thousand, evenly spaced over the sorted names), else
generated synthetic faces (said so in the output). Caches and synthetic files go under outputs/bench/
(AGECLS_OUTPUT_DIR moves them), never into the repository.

    .venv/bin/python bench/data_pipeline.py                      # print the tables
    .venv/bin/python bench/data_pipeline.py --write docs/BENCHMARKS-EARLIER.md    # also rewrite its section
    .venv/bin/python bench/data_pipeline.py --from-json bench/results/data_pipeline.json \
        --write docs/BENCHMARKS-EARLIER.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sections import (  # bench/ is on sys.path when a script runs
    provenance,
    read_notes,
    render_saved,
    write_section,
)
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "utkface"
BEGIN, END = "<!-- data_pipeline:begin -->", "<!-- data_pipeline:end -->"
MODELS = {  # name -> (basic_cnn builder arguments, timed steps: ~3 s and ~0.3 s a step on 2 CPU cores)
    "dissertation (4 blocks, base 64, hidden 132)": ({"blocks": 4, "base_channels": 64, "hidden": 132}, 8),
    "demo (4 blocks, base 16, hidden 64)": ({"blocks": 4, "base_channels": 16, "hidden": 64}, 30),
}


class JpegImages:
    """Array-like over image files: row i is decoded and resized on every read (the naive path)."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> np.ndarray:
        from agecls.data.cache import decode_image

        return decode_image(self.paths[int(row)], self.size, grayscale=True)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # `nproc --all`: plain `nproc` honours OMP_NUM_THREADS, which the benches set per process
    nproc = subprocess.run(["nproc", "--all"], capture_output=True, text=True).stdout.strip() or str(
        len(os.sched_getaffinity(0))
    )
    import albumentations
    import PIL

    return {
        "cpu": cpu,
        "nproc": nproc,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "albumentations": albumentations.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def pick_images(root: Path, n: int, out_dir: Path) -> tuple[list[Path], str]:
    """n real UTKFace files evenly spaced over the sorted names, or n generated faces if `root` is missing."""
    files = sorted(p for p in root.glob("*.jpg")) if root.is_dir() else []
    if files:
        step = max(1, len(files) // n)
        chosen = files[::step][:n]
        return (
            chosen,
            f"real UTKFace: {len(chosen)} of the {len(files)} files in {root} (every {step}th name)",
        )
    print(f"UTKFace folder not found at {root}: skipping the real-data measurement; using synthetic faces")
    from agecls.data.synthetic import generate_synthetic

    folder = generate_synthetic(out_dir / f"synthetic-n{n}", n=n, seed=0)
    chosen = sorted(folder.glob("*.jpg"))[:n]
    return chosen, f"synthetic faces (UTKFace missing at {root}): {len(chosen)} generated 200x200 JPEGs"


def age_labels(paths: list[Path]) -> np.ndarray:
    from agecls.data.bins import AgeBins

    ages = [int(re.match(r"(\d+)_", p.name).group(1)) if re.match(r"(\d+)_", p.name) else 30 for p in paths]
    return AgeBins.named("seed7").index(np.clip(ages, 0, 116)).astype(np.int64)


def transforms_for(augment: str, size: int):
    from agecls.config import compose_train
    from agecls.data.augment import build_augment

    cfg = compose_train([f"augment={augment}", f"data.image_size={size}", "data.grayscale=true"])
    return build_augment(cfg.augment)


def loader(images, labels, transform, workers: int, batch_size: int, seed: int = 0) -> DataLoader:
    from agecls.data.augment import seed_transform
    from agecls.data.datamodule import FaceDataset, seed_worker_transform

    seed_transform(transform, seed)
    dataset = FaceDataset(images, np.arange(len(labels)), labels, transform)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=seed_worker_transform if workers > 0 else None,
    )


def _epoch(dl: DataLoader) -> float:
    start, n = time.perf_counter(), 0
    for x, _ in dl:
        n += len(x)
    return n / (time.perf_counter() - start)


def compare(jpeg: DataLoader, cache: DataLoader, workers: int, repeats: int) -> dict:
    """images/s of both loaders: a first epoch each (worker start-up included), then `repeats` epochs each,
    alternating JPEG and cache so that a change in background load hits both sides alike."""
    first = {"jpeg": _epoch(jpeg), "cache": _epoch(cache)}
    later: dict[str, list[float]] = {"jpeg": [], "cache": []}
    for _ in range(repeats):
        later["jpeg"].append(_epoch(jpeg))
        later["cache"].append(_epoch(cache))
    med = {k: float(np.median(v)) for k, v in later.items()}
    return {
        "workers": workers,
        "first": first,
        "later": later,
        "median": med,
        "ratio": med["cache"] / med["jpeg"],
        "ratios": [c / j for j, c in zip(later["jpeg"], later["cache"], strict=True)],
    }


def device_batches(images, labels, transform, size: int, batch_size: int, seed: int = 0):
    """The `data.pipeline=device` train iterable over all rows, on the CPU (this machine's device)."""
    from agecls.data.datamodule import DeviceBatches, StagedCache
    from agecls.data.device_augment import translate_pipeline

    return DeviceBatches(
        StagedCache(np.asarray(images)),
        np.arange(len(labels)),
        labels,
        lambda: torch.device("cpu"),
        size=size,
        batch_size=batch_size,
        seed=seed,
        shuffle=True,
        augment=translate_pipeline(transform),
    )


class LoadSampler:
    """The 1-minute load average every few seconds while the benchmark runs (it counts the bench too)."""

    def __init__(self, every: float = 5.0) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(float(np.mean(s)), 2), "max": round(max(s), 2), "samples": len(s)}


def data_share(images, labels, transform, workers, model_args: dict, size: int, steps: int, warmup: int):
    """Train `steps` batches (after `warmup`) and split each step into waiting for the batch and computing.
    `workers`: DataLoader workers, or "device" for the data.pipeline=device batches (no DataLoader)."""
    from agecls.models import create_model

    torch.manual_seed(0)
    model = create_model("basic_cnn", num_classes=7, in_chans=1, image_size=size, **model_args)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    if workers == "device":
        dl = device_batches(images, labels, transform, size, batch_size=64)
    else:
        dl = loader(images, labels, transform, workers, batch_size=64)
    wait = compute = 0.0
    done = 0
    it = iter(dl)
    while done < warmup + steps:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(dl)
            x, y = next(it)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        t2 = time.perf_counter()
        if done >= warmup:
            wait, compute = wait + (t1 - t0), compute + (t2 - t1)
        done += 1
    del it, dl
    total = wait + compute
    return {
        "workers": workers,
        "steps": steps,
        "step_ms": 1000 * total / steps,
        "wait_ms": 1000 * wait / steps,
        "data_share": wait / total,
        "train_images_per_s": 64 * steps / total,
    }


def _rates(r: dict, k: str) -> str:
    """images/s of one path: the first epoch / the median (range) of the later ones."""
    v = r["later"][k]
    return f"{r['first'][k]:.0f} / {r['median'][k]:.0f} ({min(v):.0f}-{max(v):.0f})"


def _loader_row(r: dict, label: str, augment: str, training: dict[str, dict]) -> str:
    """One loader setting: both paths' images/s, their ratio, and each model's training step on it."""
    steps = [
        "-"
        if t is None
        else f"{t['step_ms']:.0f} / {t['wait_ms']:.1f} ({100 * t['data_share']:.1f}%); "
        f"{t['train_images_per_s']:.0f}"
        for t in training.values()
    ]
    cells = [label, augment, _rates(r, "jpeg"), _rates(r, "cache")]
    cells.append(f"{r['ratio']:.1f}x ({min(r['ratios']):.1f}-{max(r['ratios']):.1f}x)")
    return "| " + " | ".join([*cells, *steps]) + " |"


def render(res: dict) -> str:
    m, a, load = res["machine"], res["args"], res["load_average"]
    models = list(dict.fromkeys(r["model"] for r in res["training"]))

    def trained(workers) -> dict[str, dict | None]:
        return {
            name: next((r for r in res["training"] if r["model"] == name and r["workers"] == workers), None)
            for name in models
        }

    steps = {name: next(r["steps"] for r in res["training"] if r["model"] == name) for name in models}
    lines = [
        BEGIN,
        "## Data pipeline: decoded cache vs per-epoch JPEG decoding",
        "",
        *provenance(
            res["command"],
            f"{m['cpu']}, {m['nproc']} CPUs, GPU: {m['gpu']}; Python {m['python']}, torch {m['torch']} "
            f"({m['torch_threads']} intra-op threads), albumentations {m['albumentations']}, Pillow "
            f"{m['pillow']}, numpy {m['numpy']}; load average before (1/5/15 min) "
            f"{'/'.join(map(str, load['start']))}, 1-min load during (its own processes included) mean "
            f"{load['during']['mean']}, max {load['during']['max']}",
            f"{res['date']} ({res['seconds']:.0f} s in all)",
        ),
        f"- Setup: {res['data']}; {a['size']} px greyscale, batch size {a['batch_size']}, shuffled; cache "
        f"build (decode + resize, {res['cache']['workers']} threads) {res['cache']['seconds']:.1f} s, "
        f"{res['cache']['images_per_s']:.0f} images/s. Both paths with the same transforms and loaders in "
        f"one process: images/s of the first epoch / the median (range) of {a['repeats']} more, alternating "
        "(the JPEG files in the OS page cache, which favours them). Training: a plain loop of the basic CNN "
        f"on the cache's batches (Adam, {a['warmup']} warm-up steps); data wait is the time blocked in "
        "`next(loader)`.",
        "",
        "| DataLoader workers | augment | JPEG decode + resize, images/s: 1st / median (range) "
        "| cache, images/s: 1st / median (range) | cache / JPEG "
        + "".join(
            f"| {name}, {steps[name]} steps: step / data wait, ms (share); images/s " for name in models
        )
        + "|",
        "|---|---|---|---|---|" + "---|" * len(models),
        *(_loader_row(r, str(r["workers"]), a["augment"], trained(r["workers"])) for r in res["loading"]),
    ]
    if res.get("device"):
        label = "device pipeline (`data.pipeline=device` on the CPU) vs JPEG at 0 workers"
        lines.append(_loader_row(res["device"], label, a["augment"], trained("device")))
    none = dict.fromkeys(models)
    lines += [_loader_row(r, str(r["workers"]), "none", none) for r in res["no_augment"]]
    t = res["targets"]
    lines += [
        "",
        f"- Targets: cache >= 5x the images/s of per-epoch JPEG decoding: **{t['cache_5x']}**. Data time < "
        f"5% of step time: **{t['data_5pct']}**.",
    ]
    aug0 = next(r for r in res["loading"] if r["workers"] == 0) if res["loading"] else None
    raw0 = next(r for r in res["no_augment"] if r["workers"] == 0) if res["no_augment"] else None
    if aug0 and raw0:  # per-image costs at 0 workers, from the medians above
        decode_us = 1e6 * (1 / raw0["median"]["jpeg"] - 1 / raw0["median"]["cache"])
        augment_us = 1e6 * (1 / aug0["median"]["cache"] - 1 / raw0["median"]["cache"])
        read_us = 1e6 / raw0["median"]["cache"]
        lines.append(
            f"- Per image at 0 workers: reading a cached image about {read_us:.0f} us, JPEG decode + resize "
            f"about {decode_us:.0f} us more, `augment={a['augment']}` about {augment_us:.0f} us: the cache "
            "removes the decode, and the augmentation then caps the ratio"
            + (
                "; the device pipeline lifts the cap by augmenting a whole batch in a few tensor operations "
                "(parameters still drawn per sample)."
                if res.get("device")
                else "."
            )
        )
    lines += [
        "- CPU figures: on a GPU the step's compute shrinks by orders of magnitude while loading costs stay, "
        "so the data share there is not implied. The device pipeline has no workers, so on a CPU its batches "
        "are all data time and share the cores with the step.",
        *res.get("notes", []),
        END,
    ]
    return "\n".join(lines) + "\n"


def verdicts(res: dict) -> dict:
    ratios = {r["workers"]: r["ratio"] for r in res["loading"]}
    met = [w for w, r in ratios.items() if r >= 5]
    cache = (
        f"met for all worker counts (min {min(ratios.values()):.1f}x)"
        if len(met) == len(ratios)
        else "not met with albumentations: "
        + ", ".join(f"{r:.1f}x at {w} workers" for w, r in ratios.items())
    )
    if res.get("device"):
        d = res["device"]["ratio"]
        cache += (
            f"; with the device pipeline (on the CPU, against JPEG at 0 workers): {d:.1f}x, "
            f"{'met' if d >= 5 else 'not met'}"
        )

    def label(r: dict) -> str:
        how = "device pipeline" if r["workers"] == "device" else f"{r['workers']} workers"
        return f"{r['model'].split(' ')[0]} model, {how} ({100 * r['data_share']:.1f}%)"

    ok = [label(r) for r in res["training"] if r["data_share"] < 0.05]
    bad = [label(r) for r in res["training"] if r["data_share"] >= 0.05]
    if not bad:
        data = "met in every setting"
    elif not ok:
        data = f"not met: {'; '.join(bad)}"
    else:
        data = f"met for {'; '.join(ok)}; not met for {'; '.join(bad)}"
    return {"cache_5x": cache, "data_5pct": data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("AGECLS_UTKFACE", DEFAULT_ROOT)))
    parser.add_argument("--n", type=int, default=3000, help="images in the subset")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--augment", default="seed")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, help="timed training steps per setting (default: per model)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loader after the first")
    parser.add_argument("--no-device", action="store_true", help="skip the data.pipeline=device measurement")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of a markdown file")
    parser.add_argument("--from-json", type=Path, help="render a saved bench/results/data_pipeline.json")
    parser.add_argument("--notes", type=Path, help="Markdown lines to append to the section")
    args = parser.parse_args(argv)
    if args.from_json:
        return render_saved(args.from_json, render, args.write, (BEGIN, END), args.notes)
    began = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    load = LoadSampler()
    from agecls.data.cache import build_cache

    out_dir = Path(os.environ.get("AGECLS_OUTPUT_DIR", REPO / "outputs")) / "bench"
    paths, data_note = pick_images(args.root, args.n, out_dir)
    labels = age_labels(paths)
    key = "bench-" + hashlib.sha1("\n".join(map(str, paths)).encode()).hexdigest()[:12]
    from agecls.data.cache import cache_path

    stale = cache_path(out_dir / "cache", key=key, size=args.size, grayscale=True)
    for f in (stale, stale.with_suffix(".json")):
        f.unlink(missing_ok=True)  # time a fresh build
    start = time.perf_counter()
    cached = build_cache(paths, out_dir / "cache", key=key, size=args.size, grayscale=True, workers=2)
    build_s = time.perf_counter() - start
    jpeg = JpegImages(paths, args.size)
    transform = transforms_for(args.augment, args.size).train
    print(f"data: {data_note}; cache built in {build_s:.1f} s", flush=True)

    loading, no_aug = [], []
    for results, tf, label in ((loading, transform, "augment"), (no_aug, None, "no augment")):
        for w in args.workers:
            jl, cl = (loader(x, labels, tf, w, args.batch_size) for x in (jpeg, cached))
            r = compare(jl, cl, w, args.repeats)
            del jl, cl
            results.append(r)
            m = r["median"]
            print(
                f"{label}, workers {w}: jpeg {m['jpeg']:.0f}/s, cache {m['cache']:.0f}/s, {r['ratio']:.1f}x",
                flush=True,
            )

    device = None
    if not args.no_device:
        jl = loader(jpeg, labels, transform, 0, args.batch_size)
        device = compare(
            jl, device_batches(cached, labels, transform, args.size, args.batch_size), 0, args.repeats
        )
        del jl
        m = device["median"]
        print(f"device pipeline (CPU): {m['cache']:.0f}/s vs jpeg {m['jpeg']:.0f}/s, {device['ratio']:.1f}x")

    training = []
    for name, (model_args, steps) in MODELS.items():
        for w in [*args.train_workers, *([] if args.no_device else ["device"])]:
            steps = args.steps or steps
            r = data_share(cached, labels, transform, w, model_args, args.size, steps, args.warmup)
            training.append({"model": name, **r})
            print(
                f"{name}, workers {w}: step {r['step_ms']:.0f} ms, data {100 * r['data_share']:.1f}%",
                flush=True,
            )

    res = {
        "command": "python bench/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "args": vars(args) | {"root": str(args.root), "write": str(args.write)},
        "data": data_note,
        "cache": {"seconds": build_s, "images_per_s": len(paths) / build_s, "workers": 2},
        "loading": loading,
        "no_augment": no_aug,
        "device": device,
        "load_average": {"start": load_start, "during": load.stop()},
        "training": training,
    }
    res["targets"] = verdicts(res)
    res["seconds"] = time.perf_counter() - began
    res["notes"] = read_notes(args.notes, args.write)
    section = render(res)
    print(section)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = json.dumps(res, indent=1, default=str) + "\n"
    (out_dir / "data_pipeline.json").write_text(saved)
    if args.write:  # the committed record of the section, for --from-json
        (Path(__file__).parent / "results" / "data_pipeline.json").write_text(saved)
        write_section(args.write, section, BEGIN, END)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
