"""Prediction latency per stage: decode, detect, preprocess, model, for one photo and a batch.

The model is the dissertation's final size (experiment=agecnn: basic_cnn 4 blocks, base 64, hidden 132,
224 px greyscale, 7 age bins), untrained: latency does not depend on the weights. The photo is matplotlib's
grace_hopper.jpg (512x600 JPEG, one face). Stages, as agecls-predict runs them:
  decode      JPEG bytes -> RGB image (agecls.serving.faces.open_image)
  detect      MTCNN + eye alignment + the framed square crop (agecls.serving.faces.find_faces, cut_out)
  preprocess  crop -> decoded like training (fit_square) -> normalised tensor
  model       forward pass + probabilities (predict_proba)
A batch is N photos of one face each: decode, detect and preprocess per photo, one forward pass for all.
Medians over repeats, on the CPU of the machine it runs on (torch's default threads).

    .venv/bin/python bench/predict_latency.py                        # print the table
    .venv/bin/python bench/predict_latency.py --write docs/BENCHMARKS-SERVING.md  # also rewrite this section
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from sections import provenance, write_section  # bench/ is on sys.path when a script in it runs

BEGIN, END = "<!-- predict_latency:begin -->", "<!-- predict_latency:end -->"


def build_model():
    """An untrained FaceClassifier of experiment=agecnn's size, wrapped as agecls.serving.predict.Model."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from agecls.config import CONFIG_DIR, register_resolvers
    from agecls.data.bins import AgeBins
    from agecls.evaluation.inference import Preprocess
    from agecls.serving.predict import Model
    from agecls.tasks.module import FaceClassifier

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=agecnn", "data=synthetic"])
    names = list(AgeBins.from_config(cfg.bins).labels)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = FaceClassifier(resolved, names, None, None).eval()
    size = int(cfg.data.image_size)
    params = sum(p.numel() for p in module.parameters())
    model = Model(Path("untrained"), module, Preprocess(size, 0, bool(cfg.data.grayscale)), {"age": names})
    return model, params


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(n: int, repeats: int, model, data: bytes) -> dict[str, float]:
    """Median ms per stage for n photos of one face each."""
    from agecls.data.cache import fit_square
    from agecls.data.faces.framing import UTKFACE, Framing
    from agecls.serving.faces import cut_out, find_faces, open_image
    from agecls.serving.predict import attribute_probs

    framing = Framing.from_dict(UTKFACE["mtcnn"])
    t_decode, imgs = timed(lambda: [open_image(data) for _ in range(n)], repeats)

    def detect():
        return [cut_out(img, find_faces(img)[0], framing, True) for img in imgs]

    t_detect, faces = timed(detect, repeats)

    def preprocess():
        return model.tensor([fit_square(f, model.size, model.grayscale) for f in faces])

    t_pre, x = timed(preprocess, repeats)
    t_model, _ = timed(lambda: attribute_probs(model.module, x), repeats)
    stages = {"decode": t_decode, "detect": t_detect, "preprocess": t_pre, "model": t_model}
    return {k: v * 1000 for k, v in stages.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15, help="repeats for one photo (batch: a third)")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of this file")
    args = parser.parse_args(argv)
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        data = fh.read()
    model, params = build_model()
    single = measure(1, args.repeats, model, data)
    batch = measure(args.batch, max(3, args.repeats // 3), model, data)
    rows = [
        f"| stage | 1 photo (ms) | batch of {args.batch} (ms) | batch, per face (ms) |",
        "|---|---:|---:|---:|",
    ]
    for stage in [*single, "total"]:
        one = sum(single.values()) if stage == "total" else single[stage]
        many = sum(batch.values()) if stage == "total" else batch[stage]
        rows.append(f"| {stage} | {one:.1f} | {many:.1f} | {many / args.batch:.1f} |")
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    section = "\n".join(
        [
            BEGIN,
            "## Prediction latency (agecls-predict / agecls-serve)",
            "",
            *provenance(
                "make bench-predict",
                f"CPU only ({cpu}; torch threads {torch.get_num_threads()}, 1-min load "
                f"{os.getloadavg()[0]:.1f} at the start)",
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            ),
            f"- Protocol: medians of {args.repeats} repeats (batch: {max(3, args.repeats // 3)}) of an "
            f"**untrained** model of experiment=agecnn's size (224 px grey, {params / 1e6:.1f} M parameters; "
            "latency does not depend on the weights) on matplotlib's grace_hopper.jpg (512x600 JPEG, one "
            "face). A batch is that photo N times, decoded, detected and preprocessed one by one, then one "
            "forward pass. Detect = MTCNN + eye alignment + the framed square crop.",
            "",
            *rows,
            END,
        ]
    )
    print(section)
    if args.write:
        write_section(args.write, section + "\n", BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
