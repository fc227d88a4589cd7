"""`agecls-predict`: find faces in photos and predict age group, gender and ethnicity with probabilities.

    agecls-predict ckpt=PATH images=FILE_OR_DIR [out=DIR] [detect=true|false] [finder=mtcnn|haar] [align=true]

`ckpt` is one checkpoint (a single-attribute or a multitask one), a list of checkpoints, one per attribute
(`ckpt=[age.ckpt,gender.ckpt,eth.ckpt]`), or an MLflow registered model (agecls.serving.sources). Several
checkpoints that predict the same attribute with the same classes are an ensemble for it: their class
probabilities are averaged. Faces are found and cut out as agecls.serving.faces describes, each model's crop
with the framing of its own training images (kept in its checkpoint; `framing=FOLDER` fits one on a folder of
training-style crops for a checkpoint without); each crop is then preprocessed as the checkpoint's own
training run decoded its faces (`agecls.evaluation.inference.Preprocess`, shared with agecls-eval and
post-fit scoring). `detect=false` treats every image as an already-cropped face.

Writes predictions.json (with each model's card), predictions.csv (one row per face; face=-1 for a photo
without a face) and predictions.png (an annotated grid) atomically under `out`; `console_table` is what the
command prints. Unreadable or non-image files are reported and skipped.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from agecls.config import default_paths
from agecls.data.faces.finders import check_finder
from agecls.data.faces.framing import Framing, data_framing, folder_key
from agecls.errors import UsageError
from agecls.evaluation.inference import Preprocess, load_checkpoint
from agecls.evaluation.scoring import EvalError
from agecls.files import write_atomic
from agecls.serving.faces import (
    DEFAULT_MAX_PIXELS,
    Face,
    ImageError,
    cut_out,
    find_faces,
    list_images,
    open_image,
    whole_image,
)
from agecls.serving.sources import SYNTHETIC_WARNING, Source, describe_model, model_card, resolve_models

log = logging.getLogger(__name__)

OUTPUTS = ("predictions.json", "predictions.csv", "predictions.png")


def image_result(
    name: str, img: Image.Image, faces: list[dict], size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """One photo's entry of predictions.json and of the web API's answer; `size` is the photo's own size
    when it was decoded reduced (face boxes are then already in the photo's own pixels)."""
    width, height = size or img.size
    status = "ok" if faces else "no_face"
    return {"file": name, "status": status, "width": width, "height": height, "faces": faces}


def attribute_probs(module, x) -> dict[str, Any]:
    """{attribute: (N, classes) probabilities}: module.predict_proba when the module has it, else the
    softmax of module(x) for cfg.task.target."""
    import torch

    if hasattr(module, "predict_proba"):
        return dict(module.predict_proba(x))
    module.eval()
    with torch.no_grad():
        return {str(module.cfg.task.target): torch.softmax(module(x), dim=1)}


@dataclass
class Model:
    """One loaded checkpoint with the preprocessing of its training run (`agecls.evaluation.inference`)."""

    path: Path
    module: Any
    preprocess: Preprocess
    class_names: dict[str, list[str]]
    card: dict[str, Any] = field(default_factory=dict)  # model_card: source, run, data, validation score
    framings: dict[str, Framing | str] = field(default_factory=dict)  # finder -> its framing, or why none

    @property
    def size(self) -> int:
        """Side of the decoded faces: data.image_size + data.crop_margin."""
        return self.preprocess.size

    @property
    def grayscale(self) -> bool:
        return self.preprocess.grayscale

    @property
    def mean(self) -> np.ndarray | None:
        return self.preprocess.mean

    @property
    def std(self) -> np.ndarray | None:
        return self.preprocess.std

    def tensor(self, squares: list[np.ndarray]):
        """(N, C, image_size, image_size) model input of decoded (size, size, C) uint8 faces: the eval
        transform's centre crop and the run's normalisation, as its loaders made every item."""
        return self.preprocess.batch(squares)


def load_model(path: Path, device: str = "cpu", source: Source | None = None) -> Model:
    """A checkpoint loaded for prediction (its normalisation resolved as agecls-eval does) with its
    model_card; UsageError naming the file when it is not a loadable checkpoint."""
    try:
        module = load_checkpoint(path, device)
    except EvalError as exc:
        raise UsageError(str(exc)) from None
    names = getattr(module, "class_names", None)
    if not isinstance(names, dict):
        names = {str(module.cfg.task.target): list(module.hparams.class_names)}
    names = {a: list(n) for a, n in names.items()}
    card = model_card(path, module, source)
    framings = checkpoint_framings(module, path)
    card["framing"] = {
        f: v.to_dict() if isinstance(v, Framing) else {"error": v} for f, v in framings.items()
    }
    return Model(path, module, Preprocess.of(module), names, card, framings)


def checkpoint_framings(module: Any, path: Path) -> dict[str, Framing | str]:
    """{finder: the framing its training images were fitted to, or why there is none} of a checkpoint."""
    stored = dict(getattr(module, "hparams", {}).get("framing") or {})
    if not stored:
        why = "it keeps no face framing (trained before agecls fitted one, or on data without image files)"
        return {"mtcnn": why, "haar": why}
    out: dict[str, Framing | str] = {}
    for finder, data in stored.items():
        data = dict(data)
        out[finder] = str(data["error"]) if "error" in data else Framing.from_dict(data, f"{path}: framing")
    return out


def load_models(specs: Sequence[str], tracking_uri: str | None, device: str = "cpu") -> list[Model]:
    """Every checkpoint of `specs` loaded; a registered model's files live in a temporary folder only
    while they load (a loaded model never reads its file again)."""
    with tempfile.TemporaryDirectory(prefix="agecls-model-") as tmp:
        # each spec its own folder: two registered versions may hold artifacts of the same name
        resolved = [
            found
            for i, spec in enumerate(specs)
            for found in resolve_models(spec, tracking_uri, Path(tmp) / str(i))
        ]
        return [load_model(path, device, source) for path, source in resolved]


@dataclass
class Predictor:
    """Checkpoints (one per attribute or one multitask) and the face-finding settings."""

    models: list[Model]
    detect: bool = True
    finder: str = "mtcnn"
    framing: str = "checkpoint"
    align: bool = True
    min_face: int = 24
    max_faces: int = 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 32
    device: str = "cpu"
    class_names: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        first: dict[str, Path] = {}
        for model in self.models:
            for attr, names in model.class_names.items():
                if attr in self.class_names and self.class_names[attr] != names:
                    raise UsageError(
                        f"ckpt: {model.path} predicts {attr} as {names}, {first[attr]} as "
                        f"{self.class_names[attr]}; an ensemble's members share their classes (or give one "
                        "checkpoint per attribute)"
                    )
                self.class_names.setdefault(attr, names)
                first.setdefault(attr, model.path)
        self.framings = self._framings() if self.detect else [None] * len(self.models)

    def _framings(self) -> list[Framing]:
        """Each model's framing for this finder: its checkpoint's, or one fitted on the folder `framing`
        names; UsageError naming the checkpoint and what to pass when it has none."""
        check_finder(self.finder)
        if self.framing != "checkpoint":
            fitted = folder_framing(Path(self.framing).expanduser(), self.finder)
            return [fitted] * len(self.models)
        out = []
        for model in self.models:
            got = model.framings.get(self.finder, "it keeps no framing for this finder")
            if not isinstance(got, Framing):
                raise UsageError(
                    f"ckpt {model.path}: no face framing for finder={self.finder}: {got}. Pass "
                    "framing=FOLDER (a folder of the face crops it was trained on, fitted now), another "
                    "finder, or detect=false when the images are face crops already"
                )
            out.append(got)
        return out

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Predictor:
        """The predictor for a parse_args config (ckpt may be a list)."""
        import torch

        specs = cfg.ckpt if not isinstance(cfg.ckpt, str) else [cfg.ckpt]
        device = str(cfg.device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(
            load_models([str(s) for s in specs], cfg.get("tracking_uri"), device),
            detect=bool(cfg.detect),
            finder=str(cfg.finder),
            framing=str(cfg.framing),
            align=bool(cfg.align),
            min_face=int(cfg.min_face),
            max_faces=int(cfg.max_faces),
            max_pixels=int(cfg.max_pixels),
            batch_size=int(cfg.batch_size),
            device=device,
        )

    def faces(self, img: Image.Image, scale: float = 1.0) -> list[Face]:
        """The faces of one photo (detect=false: the whole image is one face); `scale` is the photo's size
        over the size it was decoded at, so min_face still counts the photo's own pixels."""
        if not self.detect:
            return [whole_image(img)]
        min_face = max(1, round(self.min_face / scale))
        return find_faces(img, finder=self.finder, min_face=min_face, max_faces=self.max_faces)

    def crops(self, img: Image.Image, faces: list[Face]) -> list[list[Image.Image]]:
        """Per model, the crop of every face cut out with that model's framing."""
        return [[cut_out(img, f, framing, self.align) for f in faces] for framing in self.framings]

    def classify(self, crops: list[list[Image.Image]] | list[Image.Image]) -> list[dict[str, dict[str, Any]]]:
        """Per face {attribute: {label, prob, probs}}; the mean probabilities of an attribute's ensemble.
        `crops`: per model, every face's crop (or one list of crops every model sees)."""
        if crops and not isinstance(crops[0], list):
            crops = [crops] * len(self.models)
        n = len(crops[0]) if crops else 0
        total = {attr: np.zeros((n, len(names))) for attr, names in self.class_names.items()}
        members = dict.fromkeys(self.class_names, 0)
        for model, model_crops in zip(self.models, crops, strict=True):
            squares = [model.preprocess.decode(c) for c in model_crops]
            for attr in model.class_names:
                members[attr] += 1
            for start in range(0, n, self.batch_size):
                x = model.tensor(squares[start : start + self.batch_size]).to(self.device)
                for attr, probs in attribute_probs(model.module, x).items():
                    rows = probs.float().cpu().numpy()
                    total[attr][start : start + len(rows)] += rows
        out: list[dict[str, dict[str, Any]]] = [{} for _ in range(n)]
        for attr, names in self.class_names.items():
            for i, row in enumerate(total[attr] / max(1, members[attr])):
                k = int(row.argmax())
                out[i][attr] = {
                    "label": names[k],
                    "prob": round(float(row[k]), 6),
                    "probs": {n: round(float(p), 6) for n, p in zip(names, row, strict=True)},
                }
        return out

    def predict_image(self, img: Image.Image, scale: float = 1.0, *, thumbnails: bool = False) -> list[dict]:
        """Every face of a decoded photo: box, detector, aligned, and per attribute label/prob/probs; boxes
        in the photo's own pixels when it was decoded `scale` times smaller. With `thumbnails`, each face
        also carries its crop as the (first) model saw it (a JPEG data URL, THUMBNAIL px)."""
        faces = self.faces(img, scale)
        crops = self.crops(img, faces) if faces else []
        preds = self.classify(crops) if faces else []
        return [
            {
                "face": i,
                "box": [round(v * scale) for v in f.box],
                "detector": f.detector,
                "aligned": f.aligned,
                "angle": f.angle,
                **p,
                **(
                    {"thumbnail": thumbnail_url(self.models[0].preprocess.decode(crops[0][i]))}
                    if thumbnails
                    else {}
                ),
            }
            for i, (f, p) in enumerate(zip(faces, preds, strict=True))
        ]

    def predict_file(self, data: bytes | str | Path, name: str = "", *, thumbnails: bool = False) -> dict:
        """{file, status: ok | no_face | error, width, height, faces, error} for one file or upload."""
        label = name or str(data)
        try:
            img = open_image(data, self.max_pixels, label)
        except ImageError as exc:
            log.debug("skipped: %s", exc)
            return {"file": label, "status": "error", "error": str(exc), "faces": []}
        return image_result(label, img, self.predict_image(img, thumbnails=thumbnails))


THUMBNAIL = 112  # side of the face thumbnails the page shows
FOLDER_FIT = 200  # images of a framing=FOLDER fit


def folder_framing(folder: Path, finder: str) -> Framing:
    """The framing fitted on up to FOLDER_FIT images of a folder of training-style face crops, kept in the
    cache folder until the folder's files change; UsageError naming the folder when it holds none the finder
    recognises."""
    files = [p for p in list_images(folder) if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp")]
    if not files:
        raise UsageError(
            f"framing={folder}: no images there (a folder of the face crops a model was trained on)"
        )
    cache_dir = Path(str(default_paths().cache_dir))
    got = data_framing(files, folder_key(files), cache_dir, FOLDER_FIT, finders=(finder,))[finder]
    if "error" in got:
        raise UsageError(f"framing={folder}: {got['error']}")
    fitted = Framing.from_dict(got, f"framing={folder}")
    log.info("framing of %s (fitted once, kept in %s): %s", folder, cache_dir, fitted)
    return fitted


def thumbnail_url(square: np.ndarray, side: int = THUMBNAIL) -> str:
    """A face as the model sees it (its decoded (size, size, C) square: its pixels and colour mode),
    enlarged to `side` px, as a JPEG data URL the page can show as it is."""
    img = Image.fromarray(square[:, :, 0] if square.shape[2] == 1 else square)
    buf = io.BytesIO()
    img.resize((side, side), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------------------------- outputs


def csv_rows(results: list[dict[str, Any]], attributes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per face (face=-1 and empty predictions for a photo without a face or an unreadable file)."""
    rows = []
    for r in results:
        base = {"file": r["file"], "status": r["status"], "error": r.get("error", "")}
        for face in r["faces"] or [None]:
            row = {
                **base,
                "face": -1,
                "x": "",
                "y": "",
                "w": "",
                "h": "",
                "detector": "",
                "aligned": "",
                "crop": "",
            }
            if face is not None:
                x, y, w, h = face["box"]
                row.update(
                    face=face["face"], x=x, y=y, w=w, h=h, detector=face["detector"], aligned=face["aligned"]
                )
                row["crop"] = face.get("crop", "")
            for a in attributes:
                got = face.get(a) if face else None
                row[a] = got["label"] if got else ""
                row[f"{a}_prob"] = got["prob"] if got else ""
                row[f"{a}_probs"] = json.dumps(got["probs"]) if got else ""
            rows.append(row)
    return rows


def face_caption(face: dict[str, Any], attributes: Sequence[str]) -> str:
    """'25-32 (0.61), female (0.93), asian (0.70)'."""
    return ", ".join(f"{face[a]['label']} ({face[a]['prob']:.2f})" for a in attributes if a in face)


def _wrap(draw: Any, text: str, width: int) -> list[str]:
    """`text` broken at spaces into lines at most `width` pixels wide (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def grid_png(
    results: list[dict[str, Any]],
    images: dict[str, Image.Image],
    attributes: Sequence[str],
    crops: dict[tuple[str, int], Image.Image] | None = None,
) -> bytes:
    """An annotated grid sized to its content: each photo (at most 256 px, at most 4 a row) with its face
    boxes numbered from 1, under it the file name, each face's predictions and the faces as the model saw
    them (`crops`, at most 6 a photo)."""
    from PIL import ImageDraw

    tile, pad, cols_max, line_h, face_px = 256, 8, 4, 12, 40
    crops = crops or {}
    shown = [r for r in results if r["file"] in images][:64]
    if not shown:
        empty = Image.new("RGB", (2 * tile, 2 * line_h + 2 * pad), "white")
        ImageDraw.Draw(empty).text((pad, pad), "no readable photo", fill=(0, 0, 0))
        return _png(empty)
    cells = [_grid_cell(r, images[r["file"]], attributes, tile) for r in shown]
    cols = math.ceil(len(cells) / math.ceil(len(cells) / cols_max))  # rows as full as possible: 5 -> 3 + 2
    rows = [cells[i : i + cols] for i in range(0, len(cells), cols)]
    strip = [face_px + 4 if any(c[0]["faces"] for c in row) else 0 for row in rows]
    heights = [
        max(c[1].height for c in row) + max(len(c[3]) for c in row) * line_h + 2 * pad + extra
        for row, extra in zip(rows, strip, strict=True)
    ]
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    oy = 0
    for row, height in zip(rows, heights, strict=True):
        thumb_h = max(c[1].height for c in row)
        text_h = max(len(c[3]) for c in row) * line_h
        for n, (r, thumb, scale, lines) in enumerate(row):
            ox = pad + n * (tile + pad)
            sheet.paste(thumb, (ox, oy + pad))
            for face in r["faces"]:
                x, y, w, h = (v * scale for v in face["box"])
                box = (ox + x, oy + pad + y, ox + x + w - 1, oy + pad + y + h - 1)
                draw.rectangle(box, outline=(255, 210, 0), width=2)
                _badge(draw, box[0], box[1], face["face"] + 1)
            draw.multiline_text((ox, oy + pad + thumb_h + 4), "\n".join(lines), fill=(0, 0, 0), spacing=2)
            fy = oy + pad + thumb_h + text_h + 6
            for k, face in enumerate(r["faces"][:6]):
                seen = crops.get((r["file"], face["face"]))
                if seen is not None:
                    sheet.paste(seen.convert("RGB").resize((face_px, face_px)), (ox + k * (face_px + 4), fy))
                    _badge(draw, ox + k * (face_px + 4), fy, face["face"] + 1)
        oy += height
    return _png(sheet)


def _grid_cell(r: dict[str, Any], img: Image.Image, attributes: Sequence[str], tile: int) -> tuple:
    """(result, photo at most `tile` px, its scale, caption lines) of one photo of the grid."""
    from PIL import ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    scale = tile / max(img.width, img.height)
    thumb = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    lines = [Path(r["file"]).name[:40]]
    for f in r["faces"][:6]:
        lines += _wrap(measure, f"{f['face'] + 1}: {face_caption(f, attributes)}", tile)
    if len(r["faces"]) > 6:
        lines.append(f"... {len(r['faces']) - 6} more faces")
    if r["status"] == "no_face":
        lines.append("no face found")
    return r, thumb, scale, lines


def _badge(draw: Any, x: float, y: float, number: int) -> None:
    """A face's number, white on black, readable on any photo."""
    text = str(number)
    w = draw.textlength(text) + 6
    draw.rectangle((x, y, x + w, y + 13), fill=(0, 0, 0))
    draw.text((x + 3, y + 1), text, fill=(255, 255, 255))


def save_crops(result: dict[str, Any], out: Path, index: int) -> dict[tuple[str, int], Image.Image]:
    """Each face's crop as the model saw it written to out/crops/ (its path in the face's `crop`, in place of
    the thumbnail data URL); the decoded thumbnails by (file, face) for the grid."""
    shown = {}
    for face in result["faces"]:
        data = base64.b64decode(face.pop("thumbnail").split(",", 1)[1])
        name = f"crops/{index:04d}-{Path(result['file']).stem[:40]}-face{face['face'] + 1}.jpg"
        write_atomic(out / name, data)
        face["crop"] = name
        shown[(result["file"], face["face"])] = Image.open(io.BytesIO(data))
    return shown


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def console_table(summary: dict[str, Any]) -> list[str]:
    """The lines agecls-predict prints: the model(s), then one row per face (file, face number, box x,y,w,h,
    each attribute's class and probability), one per photo without a face or unreadable file."""
    attributes = list(summary["class_names"])
    lines = [f"model: {describe_model(card)}" for card in summary.get("models", [])]
    lines += [
        f"warning: {card['source']} was {SYNTHETIC_WARNING}"
        for card in summary.get("models", [])
        if card.get("synthetic")
    ]
    rows = [["file", "face", "box", *attributes]]
    for r in summary["images"]:
        name = Path(r["file"]).name
        if r["status"] == "error":
            rows.append([name, "-", f"error: {r.get('error', '')}"])
        elif not r["faces"]:
            rows.append([name, "-", "no face found"])
        for f in r["faces"]:
            x, y, w, h = f["box"]
            cells = [f"{f[a]['label']} ({f[a]['prob']:.2f})" if a in f else "-" for a in attributes]
            rows.append([name, str(f["face"] + 1), f"{x},{y},{w}x{h}", *cells])
    # a column is as wide as its longest cell that is not the last of its row: a row's last cell is not
    # padded, so a long error message does not widen the box column of every face
    widths = [max([len(row[i]) for row in rows if len(row) > i + 1], default=0) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row)))
    return lines


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of cfg.images and write the outputs under cfg.out; the summary."""
    started = time.perf_counter()
    files = list_images(Path(str(cfg.images)).expanduser())
    predictor = Predictor.from_config(cfg)
    attributes = list(predictor.class_names)
    results, images, crops = [], {}, {}
    out = Path(str(cfg.out)).expanduser()
    for i, path in enumerate(files):
        result = predictor.predict_file(path, str(path), thumbnails=True)
        crops.update(save_crops(result, out, i))
        if result["status"] != "error" and cfg.grid and len(images) < 64:
            images[result["file"]] = open_image(path, predictor.max_pixels)
        results.append(result)
    summary = {
        "models": [m.card for m in predictor.models],
        "class_names": predictor.class_names,
        "detect": predictor.detect,
        "finder": predictor.finder if predictor.detect else None,
        "n_files": len(results),
        "n_faces": sum(len(r["faces"]) for r in results),
        "n_no_face": sum(r["status"] == "no_face" for r in results),
        "n_errors": sum(r["status"] == "error" for r in results),
        "seconds": round(time.perf_counter() - started, 2),
        "outputs": [str(out / name) for name in OUTPUTS[: 3 if cfg.grid else 2]]
        + ([str(out / "crops")] if crops else []),
        "images": results,
    }
    write_atomic(out / "predictions.json", (json.dumps(summary, indent=2) + "\n").encode())
    buf = io.StringIO()
    rows = csv_rows(results, attributes)
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["file"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "predictions.csv", buf.getvalue().encode())
    if cfg.grid:
        write_atomic(out / "predictions.png", grid_png(results, images, attributes, crops))
    return summary
