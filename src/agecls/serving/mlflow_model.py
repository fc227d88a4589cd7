"""A checkpoint as an MLflow Model with the `python_function` flavor, so MLflow itself can load and serve it.

`mlflow.pyfunc.load_model("models:/agecls-demo@best").predict(frame)` takes a DataFrame with one column
`image` (encoded image bytes: JPEG, PNG, ...; base64 strings in `mlflow models serve`'s JSON) and answers
one row per face: the image's row number, the face number and box, and for each attribute the model predicts
its class and probability. With `detect` on (the default) each image is a photo whose faces are found first,
as agecls-predict does; with it off each image is already a face crop.

The model folder holds the checkpoint under `artifacts/`, so agecls-predict and agecls-serve also take the
registered `models:/...` directly (they look for the .ckpt inside)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from agecls.serving.predict import DEFAULT_MAX_PIXELS, Predictor, load_model

CHECKPOINT = "checkpoint"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agecls")
    except PackageNotFoundError:
        return "0"


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):  # JSON transports carry binary columns as base64 text
        return base64.b64decode(value)
    raise TypeError(f"image: expected encoded image bytes (or base64 text), got {type(value).__name__}")


def _images(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"expected a column 'image'; got columns {list(model_input.columns)}")
        return list(model_input["image"])
    if isinstance(model_input, dict) and "image" in model_input:
        return list(model_input["image"])
    if isinstance(model_input, list | tuple):
        return list(model_input)
    raise TypeError("expected a DataFrame with an 'image' column of encoded image bytes")


def predictions_frame(results: list[dict[str, Any]], attributes: list[str]) -> pd.DataFrame:
    """One row per face (one row with status no_face/error for an image without one)."""
    rows = []
    for index, result in enumerate(results):
        base = {"image": index, "status": result["status"], "error": result.get("error", "")}
        if not result["faces"]:
            rows.append({**base, "face": -1, "box": ""})
            continue
        for face in result["faces"]:
            row = {**base, "face": int(face["face"]), "box": ",".join(str(int(v)) for v in face["box"])}
            for attr in attributes:
                row[attr] = face[attr]["label"]
                row[f"{attr}_prob"] = float(face[attr]["prob"])
            rows.append(row)
    columns = ["image", "face", "box", "status", "error"]
    columns += [c for attr in attributes for c in (attr, f"{attr}_prob")]
    return pd.DataFrame(rows, columns=columns)


class FaceClassifier(mlflow.pyfunc.PythonModel):
    """agecls's Predictor behind MLflow's pyfunc interface (pickled by reference: the loading process imports
    agecls, which `mlflow models serve --env-manager local` and the model's pip requirement provide)."""

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.predictor = Predictor(
            [load_model(Path(context.artifacts[CHECKPOINT]))],
            detect=bool(config.get("detect", True)),
            max_pixels=int(config.get("max_pixels", DEFAULT_MAX_PIXELS)),
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        results = [
            self.predictor.predict_file(_as_bytes(img), name=f"image {i}")
            for i, img in enumerate(_images(model_input))
        ]
        return predictions_frame(results, list(self.predictor.class_names))


def example_image(size: int = 64) -> bytes:
    """A small JPEG of a generated face: the model's input example."""
    from PIL import Image

    from agecls.data.synthetic import render_face

    buf = io.BytesIO()
    pixels = render_face(40, 1, 0, np.random.default_rng(0), size=size)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def save_pyfunc(checkpoint: Path, path: Path, *, detect: bool = True, version: str | None = None) -> Path:
    """Write the checkpoint as an MLflow Model folder at `path` (python_function flavor, signature, an input
    example of one generated face); returns `path`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    predictor = Predictor([load_model(checkpoint)], detect=False)
    attributes = list(predictor.class_names)
    outputs = [ColSpec("long", "image"), ColSpec("long", "face"), ColSpec("string", "box")]
    outputs += [ColSpec("string", "status"), ColSpec("string", "error")]
    for attr in attributes:
        outputs += [ColSpec("string", attr), ColSpec("double", f"{attr}_prob")]
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs))
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=FaceClassifier(),
        artifacts={CHECKPOINT: str(checkpoint)},
        signature=signature,
        input_example=pd.DataFrame({"image": [example_image()]}),
        # Declared, not inferred: inferring loads the model in a subprocess and guesses a long list.
        pip_requirements=[f"agecls=={version or package_version()}"],
        model_config={"detect": detect},
        metadata={"agecls.attributes": json.dumps({a: predictor.class_names[a] for a in attributes})},
    )
    return path


def register_run_model(
    tracking_uri: str, run_id: str, name: str, alias: str = "best", *, detect: bool = True
) -> str:
    """Log the run's best checkpoint (its `checkpoints` artifacts) as the MLflow Model `model` of that run and
    register it as a version of `name` with `alias`; returns the version. A run already registered under
    `name` keeps its version (the alias moves to it)."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    with contextlib.suppress(MlflowException):  # registered by an earlier session or another worker
        client.create_registered_model(name)
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            client.set_registered_model_alias(name, alias, version.version)
            return str(version.version)
    with tempfile.TemporaryDirectory(prefix="agecls-register-") as tmp:
        local = Path(
            download_artifacts(
                run_id=run_id, artifact_path="checkpoints", dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        found = sorted(local.rglob("*.ckpt"))
        best = [f for f in found if f.name == "best.ckpt"] or found
        if not best:
            raise FileNotFoundError(f"run {run_id}: no checkpoint (*.ckpt) under its artifacts 'checkpoints'")
        model_dir = save_pyfunc(best[0], Path(tmp) / "model", detect=detect)
        client.log_artifacts(run_id, str(model_dir), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source, run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
