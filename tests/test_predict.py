"""`agecls-predict`: faces found in real photos (matplotlib's grace_hopper.jpg), cropped and preprocessed as
training decoded UTKFace, every attribute predicted; bad files reported and skipped; models:/ resolution."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agecls.cli.predict import main, parse_args
from agecls.data.cache import decode_image, fit_square
from agecls.serving.predict import (
    Predictor,
    UsageError,
    attribute_probs,
    run,
)
from agecls.serving.sources import resolve_checkpoint
from data_helpers import REAL_SKIP_REASON, real_utkface_root

pytestmark = pytest.mark.slow
ATTRS = ["age", "gender", "ethnicity"]


def grace() -> Image.Image:
    """A real portrait shipped with matplotlib (a required dependency)."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return Image.open(fh).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """One face (JPEG), two faces side by side (PNG), greyscale (PNG), WebP, no face, and two bad files."""
    folder = tmp_path_factory.mktemp("photos")
    face = grace()
    face.save(folder / "one.jpg", quality=92)
    pair = Image.new("RGB", (face.width * 2, face.height))
    pair.paste(face, (0, 0))
    pair.paste(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (face.width, 0))
    pair.save(folder / "two.png")
    face.convert("L").save(folder / "grey.png")
    face.resize((301, 377)).save(folder / "odd.webp")
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    Image.fromarray(gradient).save(folder / "noface.jpg")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 50)
    return folder


def test_faces_are_found_and_every_output_is_well_formed(tiny_multitask_ckpt, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([f"ckpt={tiny_multitask_ckpt}", f"images={photos}", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "broken.jpg  -     error: " in printed and "noface.jpg  -     no face found" in printed
    summary = json.loads((out / "predictions.json").read_text())
    by_name = {Path(r["file"]).name: r for r in summary["images"]}
    assert set(by_name) == {
        "one.jpg",
        "two.png",
        "grey.png",
        "odd.webp",
        "noface.jpg",
        "notes.txt",
        "broken.jpg",
    }
    assert len(by_name["one.jpg"]["faces"]) == 1 and len(by_name["two.png"]["faces"]) == 2
    assert len(by_name["grey.png"]["faces"]) == 1 and len(by_name["odd.webp"]["faces"]) == 1
    assert by_name["noface.jpg"]["status"] == "no_face" and by_name["noface.jpg"]["faces"] == []
    for bad in ("notes.txt", "broken.jpg"):
        assert by_name[bad]["status"] == "error" and bad in by_name[bad]["error"]
    assert summary["n_faces"] == 5 and summary["n_errors"] == 2 and summary["n_no_face"] == 1
    assert list(summary["class_names"]) == ATTRS
    x, y, w, h = by_name["one.jpg"]["faces"][0]["box"]
    assert 100 < x + w / 2 < 420 and 100 < y + h / 2 < 420 and w > 100  # the face, not the uniform
    for face in (f for r in summary["images"] for f in r["faces"]):
        for attr in ATTRS:
            probs = face[attr]["probs"]
            assert list(probs) == summary["class_names"][attr]
            assert sum(probs.values()) == pytest.approx(1, abs=1e-4)
            assert face[attr]["label"] == max(probs, key=probs.get)
            assert face[attr]["prob"] == pytest.approx(max(probs.values()))

    rows = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))
    assert len(rows) == 5 + 1 + 2  # a row per face, per face-less photo, per bad file
    assert [r["face"] for r in rows if r["file"].endswith("two.png")] == ["0", "1"]
    assert all(json.loads(r["gender_probs"]) for r in rows if r["status"] == "ok")
    with Image.open(out / "predictions.png") as grid:  # 5 readable photos: a row of 3 and a row of 2
        assert grid.width == 3 * (256 + 8) + 8 and 2 * 256 < grid.height < 2 * 256 + 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_large_photo_is_searched_downscaled_and_boxes_map_back():
    from agecls.serving.faces import find_faces

    small, large = grace(), grace().resize((1536, 1800))
    a, b = find_faces(small)[0], find_faces(large)[0]  # the largest face (at 1536 px the cascade also
    # reports a small false face in the cap, with or without downscaling)
    assert all(abs(3 * u - v) < 0.1 * 3 * a.box[2] for u, v in zip(a.box, b.box, strict=True))


def test_detect_false_decodes_like_training_and_matches_the_square_crop(tiny_multitask_ckpt, tmp_path):
    img = grace().resize((203, 250))
    img.save(tmp_path / "crop.png")
    assert np.array_equal(fit_square(img, 48, True), decode_image(tmp_path / "crop.png", 48, True))
    assert np.array_equal(fit_square(img, 40, False), decode_image(tmp_path / "crop.png", 40, False))
    predictor = Predictor.from_config(parse_args([f"ckpt={tiny_multitask_ckpt}", "images=x", "detect=false"]))
    got = predictor.predict_file(tmp_path / "crop.png")
    assert got["status"] == "ok" and got["faces"][0]["box"] == [0, 0, 203, 250]
    assert "thumbnail" not in got["faces"][0]
    shown = predictor.predict_file(tmp_path / "crop.png", thumbnails=True)["faces"][0]["thumbnail"]
    assert shown.startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1])))
    assert thumb.size == (112, 112) and thumb.mode == "L"  # the tiny model's own input: a greyscale square


def test_one_checkpoint_per_attribute_and_the_softmax_fallback(tiny_multitask_ckpt):
    # two checkpoints of the same attributes are an ensemble: the same one twice answers as it does alone
    twice = Predictor.from_config(
        parse_args([f"ckpt=[{tiny_multitask_ckpt},{tiny_multitask_ckpt}]", "images=x"])
    )
    once = Predictor.from_config(parse_args([f"ckpt={tiny_multitask_ckpt}", "images=x"]))
    assert len(twice.models) == 2 and twice.classify([grace()]) == once.classify([grace()])

    class Plain(torch.nn.Module):  # a module without predict_proba: softmax of its logits for cfg.task.target
        cfg = type("C", (), {"task": type("T", (), {"target": "gender"})})()

        def forward(self, x):
            return torch.tensor([[2.0, 0.0]]).expand(len(x), 2)

    probs = attribute_probs(Plain(), torch.zeros(3, 1, 8, 8))
    assert list(probs) == ["gender"] and probs["gender"].shape == (3, 2)
    assert torch.allclose(probs["gender"].sum(1), torch.ones(3))

    # one model per attribute, each with its own preprocessing (grey 32 px, RGB 40 px cropped to 32)
    from agecls.evaluation.inference import Preprocess
    from agecls.serving.predict import Model

    age = Model(Path("age"), Plain(), Preprocess(32, 0, grayscale=True), {"gender": ["male", "female"]})

    class Eth(Plain):
        cfg = type("C", (), {"task": type("T", (), {"target": "ethnicity"})})()

        def forward(self, x):
            assert x.shape[1:] == (3, 32, 32)
            return torch.zeros(len(x), 5)

    eth = Model(Path("eth"), Eth(), Preprocess(32, 8, grayscale=False), {"ethnicity": list("abcde")})
    predictor = Predictor([age, eth], detect=False)
    (face,) = predictor.predict_image(grace())
    assert face["gender"]["label"] == "male" and face["ethnicity"]["prob"] == pytest.approx(0.2)
    assert list(predictor.class_names) == ["gender", "ethnicity"]
    probs = attribute_probs(Plain(), torch.zeros(3, 1, 8, 8))
    assert list(probs) == ["gender"] and probs["gender"].shape == (3, 2)
    assert torch.allclose(probs["gender"].sum(1), torch.ones(3))


def test_bad_arguments_are_named():
    with pytest.raises(UsageError, match="images=... is required"):
        parse_args(["ckpt=a.ckpt"])
    with pytest.raises(UsageError, match="unknown key 'imgs'"):
        parse_args(["ckpt=a.ckpt", "imgs=x"])
    with pytest.raises(UsageError, match="margin"):
        parse_args(["ckpt=a.ckpt", "images=x", "margin=-1"])
    with pytest.raises(UsageError, match="no such checkpoint"):
        run(parse_args(["ckpt=/nope.ckpt", f"images={Path(__file__).parent}"]))


def test_models_uri_resolves_the_registered_best_checkpoint(tiny_multitask_ckpt, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("predict-registry", artifact_location=str(tmp_path / "artifacts"))
    run_ = client.create_run(exp)
    client.log_artifact(run_.info.run_id, str(tiny_multitask_ckpt), "checkpoints")
    client.create_registered_model("agecls-demo")
    source = f"{client.get_run(run_.info.run_id).info.artifact_uri}/checkpoints"
    version = client.create_model_version("agecls-demo", source, run_id=run_.info.run_id)
    client.set_registered_model_alias("agecls-demo", "best", version.version)
    mlflow.set_tracking_uri(None)

    folder = tmp_path / "faces"
    folder.mkdir()
    grace().resize((64, 80)).save(folder / "face.png")
    summary = run(
        parse_args(
            [
                "ckpt=models:/agecls-demo@best",
                f"tracking_uri={uri}",
                f"images={folder}",
                f"out={tmp_path / 'o'}",
            ]
            + ["detect=false", "grid=false"]
        )
    )
    (card,) = summary["models"]
    assert (card["source"], card["registered"], card["version"]) == (
        "models:/agecls-demo@best",
        "agecls-demo",
        "1",
    )
    assert card["run_id"] == run_.info.run_id and 0 <= card["val_macro_f1"] <= 1  # the checkpoint's own score
    written = (tmp_path / "o" / "predictions.json").read_text()
    assert "agecls-model-" not in written and ".ckpt" not in written  # no deleted download folder named

    path = resolve_checkpoint("models:/agecls-demo@best", uri, tmp_path / "dl")
    assert path.name == "best.ckpt" and path.read_bytes() == tiny_multitask_ckpt.read_bytes()
    assert resolve_checkpoint(f"models:/agecls-demo/{version.version}", uri, tmp_path / "dl2").is_file()
    with pytest.raises(UsageError, match="models:/agecls-demo@nope"):
        resolve_checkpoint("models:/agecls-demo@nope", uri, tmp_path / "dl3")


@pytest.mark.real_data
def test_real_utkface_crops_predict_with_and_without_detection(tiny_multitask_ckpt, tmp_path):
    root = real_utkface_root()
    if root is None:
        pytest.skip(REAL_SKIP_REASON)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:12]
    folder = tmp_path / "utk"
    folder.mkdir()
    for p in files:
        (folder / p.name).write_bytes(p.read_bytes())
    for detect in ("true", "false"):
        summary = run(
            parse_args(
                [
                    f"ckpt={tiny_multitask_ckpt}",
                    f"images={folder}",
                    f"out={tmp_path / detect}",
                    f"detect={detect}",
                    "grid=false",
                ]
            )
        )
        assert summary["n_errors"] == 0
        # the finder searches a grey border around the photo, so a face cut by a tight crop's frame is found
        assert summary["n_faces"] >= (len(files) if detect == "false" else len(files) - 1)


def test_the_console_names_the_model_and_lists_every_face_and_the_output_files_are_0644(
    tiny_multitask_ckpt, tmp_path, capsys
):
    import os

    from agecls.data.synthetic import render_face

    folder = tmp_path / "faces"
    folder.mkdir()
    Image.fromarray(render_face(70, 1, 2, np.random.default_rng(0), size=32)).save(folder / "face.png")
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    old_mask = os.umask(0o022)
    try:
        assert main([f"ckpt={tiny_multitask_ckpt}", f"images={folder}", f"out={out}", "detect=false"]) == 0
    finally:
        os.umask(old_mask)
    printed = capsys.readouterr()
    summary = json.loads((out / "predictions.json").read_text())
    results = json.loads((tiny_multitask_ckpt.parent.parent / "results.json").read_text())
    (card,) = summary["models"]
    assert card["source"] == str(tiny_multitask_ckpt.resolve()) and card["run_id"] == results["mlflow_run_id"]
    assert card["attributes"] == ATTRS and card["synthetic"] is True and card["data"]["name"] == "synthetic"
    assert card["val_macro_f1"] == round(results["best_val/macro_f1"], 4)
    assert len(card["data"]["manifest_hash"]) == 12  # from the run's MLflow tags
    face = summary["images"][0]["faces"][0]
    age, gender, eth = (f"{face[a]['label']} ({face[a]['prob']:.2f})" for a in ATTRS)
    age_w, gender_w = max(3, len(age)), max(6, len(gender))  # a column is as wide as its widest cell
    error = summary["images"][1]["error"]
    assert printed.out.splitlines() == [
        f"model: {card['source']} (MLflow run {card['run_id']}): age, gender, ethnicity; trained on "
        f"synthetic ({card['data']['root']}, manifest {card['data']['manifest_hash']}); validation "
        "macro-F1 " + ", ".join(f"{a} {card['val_macro_f1_by_attribute'][a]:.3f}" for a in ATTRS),
        f"warning: {card['source']} was trained on generated synthetic faces, not real photos: its "
        "predictions on real faces are not meaningful",
        f"file       face  box        {'age'.ljust(age_w)}  {'gender'.ljust(gender_w)}  ethnicity",
        f"face.png   1     0,0,32x32  {age.ljust(age_w)}  {gender.ljust(gender_w)}  {eth}",
        f"notes.txt  -     error: {error}",
        "2 files: 1 faces, 0 without a face, 1 unreadable " + f"({summary['seconds']:g} s)",
        "wrote "
        + ", ".join(
            str(out / n) for n in ("predictions.json", "predictions.csv", "predictions.png", "crops")
        ),
    ]
    assert "Downloading" not in printed.err
    (crop,) = (out / "crops").iterdir()
    assert crop.name == "0000-face-face1.jpg" and oct(crop.stat().st_mode & 0o777) == "0o644"
    assert summary["images"][0]["faces"][0]["crop"] == "crops/0000-face-face1.jpg"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        "predictions.json": "0o644",
        "predictions.csv": "0o644",
        "predictions.png": "0o644",
        "crops": "0o755",  # each face as the model saw it: its greyscale 32 px input, enlarged
    }
    with Image.open(out / "predictions.png") as grid:  # one 32 px face shown at 256 px, with its caption
        assert grid.width == 256 + 2 * 8 and 256 < grid.height < 400


def test_atomic_files_get_the_mode_the_umask_allows(tmp_path):
    import os

    from agecls.files import atomic_path, write_atomic

    old_mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"png")
        os.umask(0o077)
        write_atomic(tmp_path / "private.json", b"{}")
    finally:
        os.umask(old_mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"a.json": "0o644", "b.png": "0o644", "private.json": "0o600"}
