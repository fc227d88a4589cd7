"""`agecls-predict`: find faces in photos and predict age group, gender and ethnicity with probabilities.

    agecls-predict ckpt=PATH images=FILE_OR_DIR [out=DIR] [detect=true|false] [margin=0.3] [align=true]

`ckpt` is one checkpoint (a single-attribute or a multitask one), a list of checkpoints, one per attribute
(`ckpt=[age.ckpt,gender.ckpt,eth.ckpt]`), or an MLflow registered model `models:/NAME@ALIAS` or
`models:/NAME/VERSION` (with `tracking_uri=`). Each checkpoint's own config decides its preprocessing.
Several checkpoints that predict the same attribute with the same classes are an ensemble for it: their
class probabilities are averaged (a registered ensemble, e.g. a study's seeds, holds them all).

Faces are found with OpenCV's bundled Haar cascades (frontal face default, then alt2, then profile, both
ways round); overlapping boxes are merged. A face is cut out as a square centred on the detector's box
whose side is the box side * (1 + 2 * margin): UTKFace's aligned crops show the whole head with some hair
and neck, about 1.6x the tight Haar box, hence margin=0.3 by default. With align=true and two eyes found
(haarcascade_eye, upper half of the box), the photo is rotated about the face centre so the eyes are level
first. The square crop is then resized and centre-cropped exactly as training decoded UTKFace files
(agecls.data.cache.decode_image), centre-cropped by the eval transform and normalised as the run was (the
checkpoint's `agecls.evaluation.inference.Preprocess`, which agecls-eval and post-fit scoring share).
`detect=false` treats every image as an already-cropped face (decoded exactly like a training image).

Writes predictions.json (with each model's card: its file or registered version, MLflow run, training
data and validation macro-F1), predictions.csv (one row per face; a row with face=-1 for a photo without a
face) and predictions.png (an annotated grid sized to its photos) atomically under `out`; `console_table`
is what the command prints. Unreadable or non-image files are reported and skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageOps

from agecls.errors import UsageError
from agecls.evaluation.inference import Preprocess, load_checkpoint
from agecls.evaluation.scoring import EvalError
from agecls.files import write_atomic

PROG = "agecls-predict"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OUTPUTS = ("predictions.json", "predictions.csv", "predictions.png")
DEFAULT_MAX_PIXELS = 40_000_000  # larger photos are refused (decompression-bomb guard); conf/predict.yaml too


class ImageError(ValueError):
    """A file that is not a readable image, or one too large."""


class TooLargeError(ImageError):
    """An image with more pixels than allowed."""


def image_result(
    name: str, img: Image.Image, faces: list[dict], size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """One photo's entry of predictions.json and of the web API's answer; `size` is the photo's own size
    when it was decoded reduced (face boxes are then already in the photo's own pixels)."""
    width, height = size or img.size
    return {
        "file": name,
        "status": "ok" if faces else "no_face",
        "width": width,
        "height": height,
        "faces": faces,
    }


# ----------------------------------------------------------------------------------------------- images


def open_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "") -> Image.Image:
    """A decoded RGB image (EXIF orientation applied) from a path or bytes; ImageError / TooLargeError.

    The pixel count is checked from the header before any pixel is decoded."""
    return decode_image(data, max_pixels, name)[0]


def decode_image(
    data: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "",
    *,
    reduce_to: int | None = None,
    max_decoded_pixels: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """An RGB image (EXIF orientation applied) and the photo's own (width, height); ImageError /
    TooLargeError.

    With `reduce_to`, formats that can decode at a fraction of their size (JPEG: 1/2, 1/4, 1/8) are decoded
    at the smallest fraction whose longer side is still >= reduce_to. `max_decoded_pixels` refuses photos
    that would still decode to more pixels (every other format decodes at full size). Both pixel checks use
    the header, before any pixel is decoded."""
    label = name or (str(data) if not isinstance(data, bytes) else "upload")
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise TooLargeError(f"{label}: {w}x{h} = {w * h} pixels, more than the {max_pixels} allowed")
            if reduce_to:
                scale = _reduction(w, h, reduce_to, max_decoded_pixels)
                if scale > 1:  # PIL picks the largest of 8, 4, 2 that this requested size allows
                    img.draft("RGB", (w // scale, h // scale))
            dw, dh = img.size  # the size it decodes at: reduced by draft() for a JPEG, else unchanged
            if max_decoded_pixels is not None and dw * dh > max_decoded_pixels:
                raise TooLargeError(
                    f"{label}: {w}x{h} = {w * h} pixels, more than the {max_decoded_pixels} allowed for a "
                    f"{img.format or 'photo of this format'} (a JPEG is decoded reduced and may have up to "
                    f"{max_pixels})"
                )
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: a copy would double the peak memory
            if img.size != (dw, dh):  # turned a quarter by its EXIF orientation: the photo's size too
                w, h = h, w
            return (img if img.mode == "RGB" else img.convert("RGB")), (w, h)
    except Image.DecompressionBombError as exc:
        raise TooLargeError(f"{label}: {exc}") from None
    except TooLargeError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{label}: not a readable image ({type(exc).__name__}: {exc})") from None


def _reduction(w: int, h: int, reduce_to: int, max_decoded_pixels: int | None) -> int:
    """The JPEG scale denominator (1, 2, 4 or 8): the largest keeping the longer side >= reduce_to, larger
    still when that is needed to decode within max_decoded_pixels."""
    scale = 1
    for k in (2, 4, 8):
        if math.ceil(max(w, h) / k) >= reduce_to:
            scale = k
    limit = max_decoded_pixels or math.inf
    while scale < 8 and math.ceil(w / scale) * math.ceil(h / scale) > limit:
        scale *= 2
    return scale


# -------------------------------------------------------------------------------------------- detection


@dataclass
class Face:
    """One face: its box (x, y, w, h) in the photo, the square crop fed to the model, how it was found."""

    box: tuple[int, int, int, int]
    crop: Image.Image
    detector: str
    aligned: bool = False
    angle: float = 0.0


_CASCADES: dict[str, Any] = {}


def _cascade(name: str):
    import cv2

    if name not in _CASCADES:
        path = Path(cv2.data.haarcascades) / name
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise RuntimeError(f"OpenCV cannot load its bundled cascade {path}")
        _CASCADES[name] = cascade
    return _CASCADES[name]


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0, min(ax2, bx2) - max(a[0], b[0])), max(0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def detect_boxes(gray: np.ndarray, min_face: int = 24) -> list[tuple[tuple[int, int, int, int], str]]:
    """Face boxes (x, y, w, h) and the cascade that found them, largest first: frontal default, else alt2,
    else the profile cascade on the photo and its mirror image."""
    import cv2

    gray = cv2.equalizeHist(gray)
    h, w = gray.shape
    min_size = (min_face, min_face)
    found: list[tuple[tuple[int, int, int, int], str]] = []
    for name, neighbours in (
        ("haarcascade_frontalface_default.xml", 5),
        ("haarcascade_frontalface_alt2.xml", 4),
    ):
        boxes = _cascade(name).detectMultiScale(gray, 1.1, neighbours, minSize=min_size)
        if len(boxes):
            found = [(tuple(int(v) for v in b), name.split(".")[0][12:]) for b in boxes]
            break
    if not found:
        profile = _cascade("haarcascade_profileface.xml")
        for b in profile.detectMultiScale(gray, 1.1, 5, minSize=min_size):
            found.append((tuple(int(v) for v in b), "profileface"))
        for b in profile.detectMultiScale(cv2.flip(gray, 1), 1.1, 5, minSize=min_size):
            x, y, bw, bh = (int(v) for v in b)
            found.append(((w - x - bw, y, bw, bh), "profileface"))
    found.sort(key=lambda f: -f[0][2] * f[0][3])
    kept: list[tuple[tuple[int, int, int, int], str]] = []
    for box, name in found:  # non-maximum suppression: a box mostly inside a larger one is the same face
        if all(_iou(box, k) < 0.3 and not _inside(box, k) for k, _ in kept):
            kept.append((box, name))
    return kept


def _inside(small: Sequence[int], big: Sequence[int]) -> bool:
    cx, cy = small[0] + small[2] / 2, small[1] + small[3] / 2
    return big[0] <= cx <= big[0] + big[2] and big[1] <= cy <= big[1] + big[3]


def eye_angle(gray: np.ndarray, box: Sequence[int]) -> float | None:
    """Degrees the line between the two eyes is tilted (image y down), when haarcascade_eye finds one eye in
    each upper quarter of the face box; None otherwise."""
    x, y, w, h = box
    roi = gray[y : y + h // 2, x : x + w]
    min_eye = max(4, w // 10)
    eyes = _cascade("haarcascade_eye.xml").detectMultiScale(roi, 1.1, 5, minSize=(min_eye, min_eye))
    left = [e for e in eyes if e[0] + e[2] / 2 < w / 2]
    right = [e for e in eyes if e[0] + e[2] / 2 >= w / 2]
    if not left or not right:
        return None
    (lx, ly, lw, lh), (rx, ry, rw, rh) = max(left, key=lambda e: e[2]), max(right, key=lambda e: e[2])
    dx = (rx + rw / 2) - (lx + lw / 2)
    dy = (ry + rh / 2) - (ly + lh / 2)
    angle = math.degrees(math.atan2(dy, dx))
    return angle if abs(angle) <= 30 else None  # larger tilts are more likely a wrong eye


def square_crop(img: Image.Image, box: Sequence[int], margin: float, angle: float = 0.0) -> Image.Image:
    """The square around `box` (side = box side * (1 + 2 * margin), centred on it), rotated by `angle`
    degrees about the face centre first; outside the photo is black."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    side = max(w, h) * (1 + 2 * margin)
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    half = side / 2
    return img.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))


DETECT_MAX_SIDE = 1024  # larger photos are searched at this size (boxes mapped back): same faces, less time


def _detect_scaled(gray: np.ndarray, min_face: int) -> list[tuple[tuple[int, int, int, int], str]]:
    """detect_boxes on a copy at most DETECT_MAX_SIDE pixels on its longer side, boxes in full-size pixels."""
    import cv2

    scale = DETECT_MAX_SIDE / max(gray.shape)
    if scale >= 1:
        return detect_boxes(gray, min_face)
    small = cv2.resize(
        gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)), interpolation=cv2.INTER_AREA
    )
    found = detect_boxes(small, max(12, round(min_face * scale)))
    return [(tuple(round(v / scale) for v in box), name) for box, name in found]


def find_faces(
    img: Image.Image, *, margin: float = 0.3, align: bool = True, min_face: int = 24, max_faces: int = 20
) -> list[Face]:
    """Every face of an RGB photo (largest first, at most max_faces) with its square crop."""
    gray = np.asarray(img.convert("L"))
    faces = []
    for box, detector in _detect_scaled(gray, min_face)[:max_faces]:
        angle = eye_angle(gray, box) if align else None
        crop = square_crop(img, box, margin, angle or 0.0)
        faces.append(Face(box, crop, detector, angle is not None, round(angle or 0.0, 2)))
    return faces


# ---------------------------------------------------------------------------------------------- models


@dataclass
class Source:
    """Where a checkpoint came from: `spec` as given (a file path or models:/...), and for a registered model
    its name, version and MLflow run id."""

    spec: str
    registered: str | None = None
    version: str | None = None
    run_id: str | None = None
    tracking_uri: str | None = None


def resolve_checkpoint(spec: str, tracking_uri: str | None = None, dest: Path | None = None) -> Path:
    """A checkpoint file: `spec` itself, or for models:/NAME@ALIAS | models:/NAME/VERSION the registered
    version's checkpoint (the .ckpt in its artifact folder, best.ckpt when there are several)."""
    return resolve_model(spec, tracking_uri, dest)[0]


def resolve_model(
    spec: str, tracking_uri: str | None = None, dest: Path | None = None
) -> tuple[Path, Source]:
    """resolve_checkpoint's file and where it came from (registered name, version, run id); UsageError for a
    registered ensemble (resolve_models gives its members)."""
    found = resolve_models(spec, tracking_uri, dest)
    if len(found) > 1:
        raise UsageError(f"ckpt={spec}: an ensemble of {len(found)} checkpoints, not one")
    return found[0]


# A registered ensemble's members are saved under these names (agecls.serving.mlflow_model.save_pyfunc).
MEMBER_PREFIX = "member-"


def resolve_models(
    spec: str, tracking_uri: str | None = None, dest: Path | None = None
) -> list[tuple[Path, Source]]:
    """The checkpoint file(s) of `spec` with where they came from: the file itself, or a registered
    version's checkpoint (the .ckpt in its artifacts, best.ckpt when there are several), or every member of a
    registered ensemble (member-0.ckpt, member-1.ckpt, ...)."""
    if not spec.startswith("models:/"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"ckpt={spec}: no such checkpoint file")
        return [(path, Source(str(path.resolve())))]
    import os

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    ref = spec[len("models:/") :]
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise UsageError(f"ckpt={spec}: give models:/NAME@ALIAS or models:/NAME/VERSION")
        if dest is None:  # a private download folder, removed when the process exits
            import atexit
            import shutil

            dest = Path(tempfile.mkdtemp(prefix="agecls-model-"))
            atexit.register(shutil.rmtree, dest, True)
        # a progress bar on the console would be the only thing a user sees of a local copy
        previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, dst_path=str(dest), tracking_uri=tracking_uri
                )
            )
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    except MlflowException as exc:
        raise UsageError(
            f"ckpt={spec}: cannot resolve it in the MLflow store {tracking_uri}: {exc}"
        ) from None
    files = [local] if local.is_file() else sorted(local.rglob("*.ckpt"))
    members = sorted(
        (f for f in files if f.name.startswith(MEMBER_PREFIX)),
        key=lambda f: int(f.stem[len(MEMBER_PREFIX) :]) if f.stem[len(MEMBER_PREFIX) :].isdigit() else -1,
    )
    if len(files) > 1:
        files = members or [f for f in files if f.name == "best.ckpt"]
    if not files or (len(files) > 1 and not members):
        raise UsageError(f"ckpt={spec}: its artifacts {version.source} hold no single checkpoint (*.ckpt)")
    uri = tracking_uri or mlflow.get_tracking_uri()
    source = Source(spec, version.name, str(version.version), version.run_id or None, uri)
    return [(f, source) for f in files]


VAL_METRIC = "val/macro_f1"


def _best_from_checkpoint(path: Path) -> float | None:
    """The best validation macro-F1 Lightning's ModelCheckpoint kept in the checkpoint (when it monitored
    that metric)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - the weights loaded already; a missing score is only missing
        return None
    for key, value in (state.get("callbacks") or {}).items():
        if (
            key.startswith("ModelCheckpoint")
            and isinstance(value, dict)
            and value.get("monitor") == VAL_METRIC
        ):
            score = value.get("best_model_score")
            if score is not None:
                return float(score)
    return None


def _run_facts(run_id: str, tracking_uri: str | None) -> dict[str, Any]:
    """{manifest_hash, root, val_macro_f1} of an MLflow run, whatever of them the store has; {} when the store
    or the run cannot be read (the card is informative, never a reason to refuse a model)."""
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception:  # noqa: BLE001
        return {}
    metrics, tags = run.data.metrics, run.data.tags
    score = metrics.get(f"best_{VAL_METRIC}", metrics.get(VAL_METRIC))
    return {
        "manifest_hash": tags.get("data.manifest_hash"),
        "root": tags.get("data.root"),
        "val_macro_f1": None if score is None else float(score),
    }


def _local_store(uri: Any) -> bool:
    """A sqlite file or file: store that exists here: read without a network round trip."""
    text = str(uri or "")
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///") :]).is_file()
    if text.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(text).path).exists()
    return False


def model_card(path: Path, module: Any, source: Source | None = None) -> dict[str, Any]:
    """What a user needs to judge a model's answers: where it came from (file or registry name, version and
    MLflow run), the attributes it predicts, the data it was trained on and its validation macro-F1."""
    source = source or Source(str(Path(path).resolve()))
    cfg = getattr(module, "cfg", None)
    data = cfg.get("data") if cfg is not None and hasattr(cfg, "get") else None
    names = getattr(module, "class_names", None)
    attributes = list(names) if isinstance(names, dict) else [str(cfg.task.target)] if cfg is not None else []
    run_id, val = source.run_id, None
    results_file = Path(path).parent.parent / "results.json"  # a run's folder holds checkpoints/ and it
    if source.registered is None and results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
            run_id = run_id or results.get("mlflow_run_id")
            val = results.get(f"best_{VAL_METRIC}")
        except (OSError, ValueError):
            pass
    if val is None:
        val = _best_from_checkpoint(Path(path))
    facts: dict[str, Any] = {}
    uri = source.tracking_uri
    if uri is None and data is not None and cfg.get("tracking") is not None:
        uri = cfg.tracking.get("tracking_uri")
        uri = uri if _local_store(uri) else None
    if run_id and (source.registered is not None or uri):
        facts = _run_facts(run_id, uri)
    if val is None:
        val = facts.get("val_macro_f1")
    name = str(data.get("name")) if data is not None and data.get("name") is not None else None
    root = facts.get("root") or (str(data.get("root")) if data is not None and data.get("root") else None)
    manifest = facts.get("manifest_hash")
    return {
        "source": source.spec,
        "registered": source.registered,
        "version": source.version,
        "run_id": run_id,
        "attributes": attributes,
        "data": {"name": name, "root": root, "manifest_hash": manifest[:12] if manifest else None},
        "val_macro_f1": None if val is None else round(float(val), 4),
        "synthetic": name == "synthetic",
    }


def describe_model(card: dict[str, Any]) -> str:
    """One line: 'models:/agecls-demo@best (version 1, run a70f015f): age; trained on synthetic (ROOT,
    manifest 1a2b3c4d5e6f); validation macro-F1 0.512'."""
    where = card["source"]
    extra = [f"version {card['version']}"] if card.get("version") else []
    if card.get("run_id"):
        extra.append(f"MLflow run {card['run_id']}")
    if extra:
        where += f" ({', '.join(extra)})"
    data = card.get("data") or {}
    trained = data.get("name") or "unknown data"
    details = [
        d for d in (data.get("root"), data.get("manifest_hash") and f"manifest {data['manifest_hash']}") if d
    ]
    if details:
        trained += f" ({', '.join(details)})"
    score = card.get("val_macro_f1")
    score_text = "unknown" if score is None else f"{score:.3f}"
    return f"{where}: {', '.join(card['attributes'])}; trained on {trained}; validation macro-F1 {score_text}"


SYNTHETIC_WARNING = (
    "trained on generated synthetic faces, not real photos: its predictions on real faces are not meaningful"
)


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
    return Model(path, module, Preprocess.of(module), names, model_card(path, module, source))


@dataclass
class Predictor:
    """Checkpoints (one per attribute or one multitask) and the face-finding settings."""

    models: list[Model]
    detect: bool = True
    margin: float = 0.3
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

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Predictor:
        """The predictor for a parse_args config (ckpt may be a list)."""
        import torch

        specs = cfg.ckpt if not isinstance(cfg.ckpt, str) else [cfg.ckpt]
        device = str(cfg.device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        resolved = [found for s in specs for found in resolve_models(str(s), cfg.get("tracking_uri"))]
        return cls(
            [load_model(p, device, source) for p, source in resolved],
            detect=bool(cfg.detect),
            margin=float(cfg.margin),
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
            return [Face((0, 0, img.width, img.height), img, "none")]
        min_face = max(1, round(self.min_face / scale))
        return find_faces(
            img, margin=self.margin, align=self.align, min_face=min_face, max_faces=self.max_faces
        )

    def classify(self, crops: list[Image.Image]) -> list[dict[str, dict[str, Any]]]:
        """Per crop {attribute: {label, prob, probs}}; the mean probabilities of an attribute's ensemble."""
        total = {attr: np.zeros((len(crops), len(names))) for attr, names in self.class_names.items()}
        members = dict.fromkeys(self.class_names, 0)
        for model in self.models:
            squares = [model.preprocess.decode(c) for c in crops]
            for attr in model.class_names:
                members[attr] += 1
            for start in range(0, len(crops), self.batch_size):
                x = model.tensor(squares[start : start + self.batch_size]).to(self.device)
                for attr, probs in attribute_probs(model.module, x).items():
                    rows = probs.float().cpu().numpy()
                    total[attr][start : start + len(rows)] += rows
        out: list[dict[str, dict[str, Any]]] = [{} for _ in crops]
        for attr, names in self.class_names.items():
            for i, row in enumerate(total[attr] / max(1, members[attr])):
                k = int(row.argmax())
                out[i][attr] = {
                    "label": names[k],
                    "prob": round(float(row[k]), 6),
                    "probs": {n: round(float(p), 6) for n, p in zip(names, row, strict=True)},
                }
        return out

    def predict_image(self, img: Image.Image, scale: float = 1.0) -> list[dict[str, Any]]:
        """Every face of a decoded photo: box, detector, aligned, and per attribute label/prob/probs; boxes
        in the photo's own pixels when it was decoded `scale` times smaller."""
        faces = self.faces(img, scale)
        preds = self.classify([f.crop for f in faces]) if faces else []
        return [
            {
                "face": i,
                "box": [round(v * scale) for v in f.box],
                "detector": f.detector,
                "aligned": f.aligned,
                "angle": f.angle,
                **p,
            }
            for i, (f, p) in enumerate(zip(faces, preds, strict=True))
        ]

    def predict_file(self, data: bytes | str | Path, name: str = "") -> dict[str, Any]:
        """{file, status: ok | no_face | error, width, height, faces, error} for one file or upload."""
        label = name or str(data)
        try:
            img = open_image(data, self.max_pixels, label)
        except ImageError as exc:
            return {"file": label, "status": "error", "error": str(exc), "faces": []}
        return image_result(label, img, self.predict_image(img))


# --------------------------------------------------------------------------------------------- outputs


def list_images(source: Path) -> list[Path]:
    """The file itself, or every file in the folder (sorted; hidden files skipped; the scan reports
    non-images as errors when they fail to decode, so a .jpg that is not one is still reported)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise UsageError(f"images={source}: no such file or folder")
    return sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))


def csv_rows(results: list[dict[str, Any]], attributes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per face (face=-1 and empty predictions for a photo without a face or an unreadable file)."""
    rows = []
    for r in results:
        base = {"file": r["file"], "status": r["status"], "error": r.get("error", "")}
        for face in r["faces"] or [None]:
            row = {**base, "face": -1, "x": "", "y": "", "w": "", "h": "", "detector": "", "aligned": ""}
            if face is not None:
                x, y, w, h = face["box"]
                row.update(
                    face=face["face"], x=x, y=y, w=w, h=h, detector=face["detector"], aligned=face["aligned"]
                )
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
    results: list[dict[str, Any]], images: dict[str, Image.Image], attributes: Sequence[str]
) -> bytes:
    """An annotated grid sized to its content: each photo (at most 256 px, at most 4 a row) with its face
    boxes and numbers, and under it the file name and each face's predictions."""
    from PIL import ImageDraw

    tile, pad, cols_max, line_h = 256, 8, 4, 12
    shown = [r for r in results if r["file"] in images][:64]
    if not shown:
        shown_empty = Image.new("RGB", (2 * tile, 2 * line_h + 2 * pad), "white")
        ImageDraw.Draw(shown_empty).text((pad, pad), "no readable photo", fill=(0, 0, 0))
        buf = io.BytesIO()
        shown_empty.save(buf, format="PNG")
        return buf.getvalue()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cells = []
    for r in shown:
        img = images[r["file"]]
        scale = tile / max(img.width, img.height)
        thumb = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        lines = [Path(r["file"]).name[:40]]
        for f in r["faces"][:6]:
            lines += _wrap(measure, f"{f['face']}: {face_caption(f, attributes)}", tile)
        if len(r["faces"]) > 6:
            lines.append(f"... {len(r['faces']) - 6} more faces")
        if r["status"] == "no_face":
            lines.append("no face found")
        cells.append((r, thumb, scale, lines))
    cols = math.ceil(len(cells) / math.ceil(len(cells) / cols_max))  # rows as full as possible: 5 -> 3 + 2
    rows = [cells[i : i + cols] for i in range(0, len(cells), cols)]
    heights = [max(c[1].height for c in row) + max(len(c[3]) for c in row) * line_h + 2 * pad for row in rows]
    width = cols * (tile + pad) + pad
    sheet = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    oy = 0
    for row, height in zip(rows, heights, strict=True):
        thumb_h = max(c[1].height for c in row)
        for n, (r, thumb, scale, lines) in enumerate(row):
            ox = pad + n * (tile + pad)
            sheet.paste(thumb, (ox, oy + pad))
            for face in r["faces"]:
                x, y, w, h = (v * scale for v in face["box"])
                box = (ox + x, oy + pad + y, ox + x + w - 1, oy + pad + y + h - 1)
                draw.rectangle(box, outline=(255, 0, 0), width=2)
                draw.text((box[0] + 3, box[1] + 2), str(face["face"]), fill=(255, 255, 0))
            draw.multiline_text((ox, oy + pad + thumb_h + 4), "\n".join(lines), fill=(0, 0, 0), spacing=2)
        oy += height
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
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
            rows.append([name, str(f["face"]), f"{x},{y},{w}x{h}", *cells])
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
    results, images = [], {}
    for path in files:
        result = predictor.predict_file(path, str(path))
        if result["status"] != "error" and cfg.grid and len(images) < 64:
            images[result["file"]] = open_image(path, predictor.max_pixels)
        results.append(result)
    out = Path(str(cfg.out)).expanduser()
    summary = {
        "models": [m.card for m in predictor.models],
        "class_names": predictor.class_names,
        "detect": predictor.detect,
        "margin": predictor.margin,
        "n_files": len(results),
        "n_faces": sum(len(r["faces"]) for r in results),
        "n_no_face": sum(r["status"] == "no_face" for r in results),
        "n_errors": sum(r["status"] == "error" for r in results),
        "seconds": round(time.perf_counter() - started, 2),
        "outputs": [str(out / name) for name in OUTPUTS[: 3 if cfg.grid else 2]],
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
        write_atomic(out / "predictions.png", grid_png(results, images, attributes))
    return summary
