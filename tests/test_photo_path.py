"""The photo path (find a face, cut it out with the model's framing) against the crop path on the same faces:
real UTKFace crops from ../shared when present, else generated faces, pasted into composed photos."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agecls.data.faces import framing as framing_module
from agecls.data.faces.compose import compose, match
from agecls.data.faces.finders import find
from agecls.data.faces.framing import UTKFACE, Framing, FramingError, fit_framing, square_iou
from agecls.data.faces.mtcnn import detect
from agecls.serving.predict import Predictor, UsageError, checkpoint_framings, load_models
from data_helpers import real_utkface_root

pytestmark = pytest.mark.slow
N_FACES = 12


def grace() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def test_mtcnn_finds_the_face_and_its_eyes_in_a_real_portrait():
    (face,) = detect(grace())
    x, y, w, h = face.box
    assert face.score > 0.99 and 160 <= x <= 180 and 100 <= y <= 120 and 170 <= w <= 200 and 200 <= h <= 235
    left_eye, right_eye = face.landmarks[:2]
    assert left_eye[0] < right_eye[0] and abs(left_eye[1] - right_eye[1]) < 0.1 * w  # level, left first
    assert y < left_eye[1] < y + h / 2  # in the upper half of the box
    assert detect(np.full((300, 400, 3), 128, np.uint8)) == []


def test_the_framing_is_recovered_from_crops_cut_with_a_known_one():
    # crops cut out of the portrait as 2x its landmarks' reference length, centred 0.1 of it lower than the
    # landmarks' centroid: the fit finds that framing again
    photo = grace()
    box = find(photo, "mtcnn")[0]
    truth = Framing("mtcnn", "landmarks", 2.0, 0.0, 0.1, 0.0, 1, 1, 0.0)
    from agecls.data.faces.framing import crop

    crops = [crop(photo, box, truth, align=False)]
    crops += [np.asarray(Image.fromarray(crops[0]).resize((s, s))) for s in (150, 180, 260)]
    fitted = fit_framing(crops, "mtcnn")
    assert fitted.found == 4 and fitted.ref == "landmarks"
    assert abs(fitted.scale - 2.0) < 0.1 and abs(fitted.dx) < 0.04 and abs(fitted.dy - 0.1) < 0.04
    with pytest.raises(FramingError, match="found a face in 0 of 3 training images"):
        fit_framing([np.full((64, 64, 3), v, np.uint8) for v in (0, 90, 200)], "mtcnn")


def _faces(tmp_path: Path) -> tuple[list[Image.Image], Framing, str]:
    """Up to N_FACES crops and the framing of their kind: real UTKFace crops with UTKFace's fitted framing,
    else generated faces the finder finds, with the framing fitted on them."""
    root = real_utkface_root()
    if root is not None:
        files = sorted(p for p in root.iterdir() if p.suffix == ".jpg")[:: 1 + 18_000 // N_FACES][:N_FACES]
        return [Image.open(p).convert("RGB") for p in files], Framing.from_dict(UTKFACE["mtcnn"]), "utkface"
    from agecls.data.synthetic import render_face

    rng = np.random.default_rng(3)
    drawn = [
        render_face(int(rng.integers(1, 90)), int(rng.integers(0, 2)), int(rng.integers(0, 5)), rng)
        for _ in range(60)
    ]
    seen = [d for d in drawn if find(d, "mtcnn", 50)][:N_FACES]
    return [Image.fromarray(d) for d in seen], fit_framing(seen, "mtcnn"), "generated"


def test_a_face_in_a_photo_is_cut_out_and_classified_as_its_crop(tiny_multitask_ckpt, tmp_path):
    crops, framing, kind = _faces(tmp_path)
    assert len(crops) >= 8, kind
    models = load_models([str(tiny_multitask_ckpt)], None)
    on_crops = Predictor(models, detect=False)
    in_photos = Predictor(models, detect=True)
    in_photos.framings = [framing]  # the faces' own kind (the tiny model was trained on generated faces)
    rng, ious, crop_rows, photo_rows, probs = random.Random(0), [], [], [], []
    for face in crops:
        photo, pasted = compose([face], rng, sides=(220, 360), max_angle=6.0)
        faces = in_photos.faces(photo)
        squares = [framing.square(f.found)[:3] for f in faces]
        pairs, pair_ious = match(squares, pasted)
        assert len(pairs) == 1 and len(faces) == 1, (kind, len(faces))  # found, and nothing else
        ious += pair_ious
        (seen,) = in_photos.crops(photo, [faces[next(iter(pairs))]])[0]
        crop_rows.append(on_crops.classify([face])[0])
        photo_rows.append(in_photos.classify([[seen]])[0])
    assert np.median(ious) > 0.85, (kind, ious)
    for attr in on_crops.class_names:
        a = np.array([[r[attr]["probs"][n] for n in on_crops.class_names[attr]] for r in crop_rows])
        b = np.array([[r[attr]["probs"][n] for n in on_crops.class_names[attr]] for r in photo_rows])
        probs.append(np.abs(a - b).sum(axis=1).mean() / 2)  # mean total-variation distance, 0 to 1
    same = np.mean(
        [c[a]["label"] == p[a]["label"] for c, p in zip(crop_rows, photo_rows, strict=True) for a in c]
    )
    assert same >= 0.8 and max(probs) < 0.1, (kind, same, probs)


def test_a_checkpoint_without_a_framing_is_refused_for_detect_with_what_to_pass(
    tiny_multitask_ckpt, tmp_path, monkeypatch
):
    monkeypatch.setenv("AGECLS_OUTPUT_DIR", str(tmp_path / "outputs"))
    old = tmp_path / "old.ckpt"
    ckpt = torch.load(tiny_multitask_ckpt, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"].pop("framing", None)
    torch.save(ckpt, old)
    models = load_models([str(old)], None)
    assert set(checkpoint_framings(models[0].module, old)) == {"mtcnn", "haar"}
    with pytest.raises(
        UsageError, match=r"old.ckpt: no face framing for finder=mtcnn: it keeps no face framing"
    ):
        Predictor(models, detect=True)
    assert Predictor(models, detect=False).framings == [None]
    folder = tmp_path / "crops"
    folder.mkdir()
    for side in (300, 400, 512):
        Image.fromarray(grace()).resize((side, round(side * 600 / 512))).save(folder / f"portrait{side}.jpg")
    fitted = Predictor(models, detect=True, framing=str(folder)).framings[0]
    assert fitted.found == 3 and fitted.scale > 1.5 * UTKFACE["mtcnn"]["scale"]  # far more than the face
    # fitted once: the next start reads it back, until the folder's files change
    assert len(list((tmp_path / "outputs" / "cache").glob("folder-*_framing.json"))) == 1
    fits = []
    monkeypatch.setattr(framing_module, "fit_framing", lambda *a, **k: fits.append(1) or fitted)
    assert Predictor(models, detect=True, framing=str(folder)).framings[0] == fitted and fits == []
    Image.fromarray(grace()).save(folder / "portrait-full.jpg")
    Predictor(models, detect=True, framing=str(folder))
    assert fits == [1]
    with pytest.raises(UsageError, match="framing=.*empty: no images there"):
        (tmp_path / "empty").mkdir()
        Predictor(models, detect=True, framing=str(tmp_path / "empty"))


def test_the_square_iou_of_equal_and_shifted_squares():
    assert square_iou((10, 10, 10), (10, 10, 10)) == 1.0
    assert abs(square_iou((10, 10, 10), (15, 10, 10)) - 50 / 150) < 1e-9
    assert square_iou((0, 0, 2), (10, 10, 2)) == 0.0


def test_a_photo_that_is_a_crop_in_the_models_framing_is_taken_as_it_is(tiny_multitask_ckpt):
    # the portrait cut out as UTKFace's framing would: detect=true then answers exactly as detect=false
    portrait = grace()
    framing = Framing.from_dict(UTKFACE["mtcnn"])
    from agecls.data.faces.framing import crop

    as_crop = Image.fromarray(crop(portrait, find(portrait, "mtcnn")[0], framing))
    models = load_models([str(tiny_multitask_ckpt)], None)
    found = Predictor(models, detect=True)
    faces = found.faces(as_crop)
    assert len(faces) == 1 and found.crops(as_crop, faces)[0][0] is as_crop
    assert (
        found.predict_image(as_crop)[0]["age"]
        == Predictor(models, detect=False).predict_image(as_crop)[0]["age"]
    )
    # the portrait itself is not such a crop: its face is cut out
    whole = Image.fromarray(portrait)
    assert found.crops(whole, found.faces(whole))[0][0].size != whole.size
