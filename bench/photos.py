"""Faces in photos against the same faces as crops: the photo path of agecls-predict / agecls-serve measured.

Faces are drawn from the test split of the manifest a real model was trained on (never its training rows)
and pasted into composed photos (agecls.data.faces.compose: 960x720, a blurred background of shapes, sides
220-420 px, rotated up to 10 degrees, edges feathered over 3% of the side; about one photo in five holds 2-3
faces at 160-300 px).
For each finder setting:
  photos  faces found (recall) and extra boxes (found squares overlapping no pasted face, per pasted face),
          the framed square's IoU with the pasted square, and macro-F1 per attribute of the found faces
          through the photo path against the same faces as crops (detect=false), with the paired bootstrap
          interval of the difference (photo - crop, 1000 resamples, 95%)
  crops   detect=true on the crops themselves: the share of answers equal to detect=false's (a crop where
          no face is found counts as a disagreement)

    .venv/bin/python bench/photos.py --ckpt models:/agecls-utkface@best              # print the tables
    .venv/bin/python bench/photos.py ... --write BENCHMARKS.md                   # also rewrite its section
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sections import provenance, write_section  # bench/ is on sys.path when a script in it runs

from agecls.data.faces.framing import Framing

BEGIN, END = "<!-- photos:begin -->", "<!-- photos:end -->"
SETTINGS = (("mtcnn", True), ("mtcnn", False), ("haar", True))


def test_faces(manifest: Path, root: Path, n: int, seed: int) -> list[dict]:
    """n test-split rows of the manifest (drawn reproducibly), each with its image path."""
    with open(manifest, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    random.Random(seed).shuffle(rows)
    return [{**r, "file": root / r["path"]} for r in rows[:n]]


def photos_of(faces: list[dict], seed: int) -> list[tuple[Image.Image, list]]:
    """The composed photos: mostly one face, about one in five with 2-3 smaller ones."""
    from agecls.data.faces.compose import compose

    rng, out, i = random.Random(seed), [], 0
    while i < len(faces):
        k = 1 if rng.random() < 0.8 else rng.randrange(2, 4)
        group = list(range(i, min(i + k, len(faces))))
        crops = [Image.open(faces[j]["file"]).convert("RGB") for j in group]
        sides = (220, 421) if len(group) == 1 else (160, 301)
        photo, pasted = compose(crops, rng, sides=sides)
        out.append((photo, [type(p)(group[p.index], p.x, p.y, p.side, p.angle) for p in pasted]))
        i += k
    return out


def truth(faces: list[dict], bins, attributes: list[str]) -> dict[str, np.ndarray]:
    """Per attribute the class index of every face (-1 where the manifest has no label)."""
    out = {}
    for a in attributes:
        if a == "age":
            out[a] = np.asarray(bins.index(np.array([int(f["age"]) for f in faces])), dtype=np.int64)
        else:
            out[a] = np.array([int(float(f[a])) if f.get(a) not in (None, "") else -1 for f in faces])
    return out


def labels(preds: list[dict], predictor, attributes: list[str]) -> dict[str, np.ndarray]:
    return {
        a: np.array([predictor.class_names[a].index(p[a]["label"]) if p else -1 for p in preds])
        for a in attributes
    }


def photo_path(predictor, photos, n_faces: int) -> tuple[dict, list[dict | None]]:
    """Detection counts and each pasted face's prediction through the photo path (None: not found)."""
    from agecls.data.faces.compose import match

    preds: list[dict | None] = [None] * n_faces
    found = extra = 0
    ious: list[float] = []
    framing = predictor.framings[0]
    start = time.perf_counter()
    for photo, pasted in photos:
        faces = predictor.faces(photo)
        squares = [framing.square(f.found, predictor.align)[:3] for f in faces]
        pairs, pair_ious = match(squares, pasted)
        found += len(pairs)
        extra += len(faces) - len(pairs)
        ious += pair_ious
        if pairs:
            keep = sorted(pairs)
            answers = predictor.classify(predictor.crops(photo, [faces[i] for i in keep]))
            for i, answer in zip(keep, answers, strict=True):
                preds[pairs[i]] = answer
    seconds = time.perf_counter() - start
    stats = {"found": found, "extra": extra, "iou_median": float(np.median(ious)) if ious else 0.0}
    return {**stats, "seconds_per_photo": seconds / len(photos)}, preds


def crop_path(predictor, faces: list[dict]) -> list[dict]:
    """Each face as a crop (detect=false)."""
    crops = [Image.open(f["file"]).convert("RGB") for f in faces]
    return [a for i in range(0, len(crops), 64) for a in predictor.classify(crops[i : i + 64])]


def on_crops(predictor, faces: list[dict]) -> list[dict | None]:
    """detect=true on each crop itself: the largest face's answer (None: no face found)."""
    out: list[dict | None] = []
    for f in faces:
        img = Image.open(f["file"]).convert("RGB")
        got = predictor.predict_image(img)
        out.append(got[0] if got else None)
    return out


def compare(photo: dict, crop: dict, target: dict, found: np.ndarray, n_classes: dict) -> dict:
    """Per attribute: macro-F1 of both paths on the found, labelled faces, and the paired interval."""
    from agecls.evaluation.bootstrap import bootstrap_ci, bootstrap_diff

    out = {}
    for a, t in target.items():
        rows = found & (t >= 0)
        diff = bootstrap_diff(photo[a][rows], crop[a][rows], t[rows], n_classes[a])
        crop_f1 = bootstrap_ci(crop[a][rows], t[rows], n_classes[a], n=10)[0]
        out[a] = {
            "n": int(rows.sum()),
            "crop": crop_f1,
            "photo": crop_f1 + diff["diff"],
            **{k: diff[k] for k in ("diff", "lo", "hi")},
        }
    return out


def train_framing(models: list, manifest: Path, root: Path) -> None:
    """For a checkpoint saved before framings were kept: the framing its training run would have kept,
    fitted the same way (data_framing on the manifest's train split, keyed by its hash)."""
    from agecls.data.faces.framing import data_framing

    key = json.loads(manifest.with_suffix(".json").read_text())["hash"]
    with open(manifest, newline="") as fh:
        paths = [root / r["path"] for r in csv.DictReader(fh) if r["split"] == "train"]
    fitted = data_framing(paths, key, Path("outputs/cache"), 200)
    for model in models:
        model.framings = {f: v["error"] if "error" in v else Framing.from_dict(v) for f, v in fitted.items()}


def run(args) -> dict:
    from agecls.data.bins import AgeBins
    from agecls.serving.predict import Predictor, load_models

    models = load_models([args.ckpt], args.tracking_uri)
    framing_source = "the checkpoint's"
    if not isinstance(models[0].framings.get("mtcnn"), Framing):
        train_framing(models, args.manifest, args.root)
        framing_source = "fitted by the bench as training does (the checkpoint predates kept framings)"
    module = models[0].module
    bins = AgeBins.from_config(module.cfg.bins)
    faces = test_faces(args.manifest, args.root, args.n, args.seed)
    photos = photos_of(faces, args.seed)
    crop_predictor = Predictor(models, detect=False)
    attributes = list(crop_predictor.class_names)
    target = truth(faces, bins, attributes)
    n_classes = {a: len(n) for a, n in crop_predictor.class_names.items()}
    crop = labels(crop_path(crop_predictor, faces), crop_predictor, attributes)
    report = {
        "n_faces": len(faces),
        "n_photos": len(photos),
        "settings": {},
        "framing": {f: v.to_dict() if isinstance(v, Framing) else v for f, v in models[0].framings.items()},
        "framing_source": framing_source,
    }
    for finder, align in SETTINGS:
        predictor = Predictor(models, detect=True, finder=finder, align=align)
        stats, preds = photo_path(predictor, photos, len(faces))
        found = np.array([p is not None for p in preds])
        photo = labels(preds, predictor, attributes)
        agree_preds = labels(on_crops(predictor, faces), predictor, attributes)
        agree = {a: float((agree_preds[a] == crop[a]).mean()) for a in attributes}
        report["settings"][f"{finder}, align={'on' if align else 'off'}"] = {
            **stats,
            "f1": compare(photo, crop, target, found, n_classes),
            "agree_on_crops": agree,
            "crops_found": int((agree_preds[attributes[0]] >= 0).sum()),
        }
        print(json.dumps({finder: report["settings"]}, default=float)[:400], flush=True)
    return report


def render(report: dict, command: str, machine: str, date: str, notes: list[str] | None = None) -> str:
    n = report["n_faces"]
    rows = [
        "| finder | found (%) | extra boxes (%) | crop IoU | attribute | faces | crop path F1 "
        "| photo path F1 | photo - crop (95% interval) | detect=true on crops agrees (%) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for name, got in report["settings"].items():
        found = f"{100 * got['found'] / n:.1f} | {100 * got['extra'] / n:.1f} | {got['iou_median']:.3f}"
        for a, v in got["f1"].items():
            gap = f"{v['diff']:+.3f} ({v['lo']:+.3f} to {v['hi']:+.3f})"
            rows.append(
                f"| {name} | {found} | {a} | {v['n']} | {v['crop']:.3f} | {v['photo']:.3f} | {gap} | "
                f"{100 * got['agree_on_crops'][a]:.1f} |"
            )
    return "\n".join(
        [
            BEGIN,
            "## Faces in photos: the photo path against the crop path",
            "",
            *provenance(command, machine, date),
            f"- Protocol: {n} faces of the model's test split in {report['n_photos']} composed photos "
            "(bench/photos.py); F1 on the faces found, against the same faces as crops (detect=false), "
            "paired bootstrap; crop IoU: the framed square against the pasted one; agrees: detect=true on "
            "the crops.",
            "",
            *rows,
            *([""] + notes if notes else []),
            END,
        ]
    )


def default_manifest() -> Path | None:
    found = sorted(Path("outputs/data/manifests").glob("utkface-*/manifest.csv"), key=os.path.getmtime)
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="models:/agecls-utkface@best")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument(
        "--root", type=Path, default=Path(os.environ.get("AGECLS_UTKFACE", "../shared/data/utkface"))
    )
    parser.add_argument("--manifest", type=Path, default=default_manifest())
    parser.add_argument("--n", type=int, default=400, help="test faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/photos.json"))
    parser.add_argument("--from-json", type=Path, help="render a saved report instead of measuring")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of this file")
    parser.add_argument("--notes", type=Path, help="reading lines appended to the section")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        report, command, machine, date = saved["report"], saved["command"], saved["machine"], saved["date"]
    else:
        if args.manifest is None or not args.manifest.is_file():
            parser.error(
                "--manifest: no outputs/data/manifests/utkface-*/manifest.csv; run `make utkface` first"
            )
        import torch

        cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
        machine = f"CPU only ({cpu}; torch threads {torch.get_num_threads()})"
        command, date = "make bench-photos", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        report = run(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        saved = {"report": report, "command": command, "machine": machine, "date": date}
        args.out.write_text(json.dumps(saved, indent=1, default=float))
        if args.write:  # the committed record the section is rendered from (--from-json)
            (Path(__file__).parent / "results" / "photos.json").write_text(
                json.dumps(saved, indent=1, default=float)
            )
    notes = [line for line in args.notes.read_text().splitlines() if line.strip()] if args.notes else None
    section = render(report, command, machine, date, notes)
    print(section)
    if args.write:
        write_section(args.write, section + "\n", BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
