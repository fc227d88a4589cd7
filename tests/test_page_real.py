"""The upload page with a real multitask model (a tiny one trained on a few hundred UTKFace photos): each face
shows every attribute's classes with their probabilities, numbered from 1 alike on the photo and in the list;
the model line gives each attribute's validation macro-F1, and nothing on the page or in /api/info speaks of
synthetic faces."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from tests.browser import browser_or_skip, page_at, served
from tests.conftest import compose_train
from tests.data_helpers import REAL_SKIP_REASON, TINY_REAL, real_utkface_root

pytestmark = [pytest.mark.slow, pytest.mark.real_data]
ATTRS = ["age", "gender", "ethnicity"]
SUBSET_EVERY = 60  # 1 photo in 60 of the folder (about 316 of UTKFace's 18,964): seconds to scan and train


@pytest.fixture(scope="module")
def real_multitask_ckpt(output_dir, tmp_path_factory) -> Path:
    """A multitask checkpoint trained one epoch at 16 px on a subset of the real UTKFace folder."""
    source = real_utkface_root()
    if source is None:
        pytest.skip(REAL_SKIP_REASON)
    from agecls.training.train import train

    subset = tmp_path_factory.mktemp("utk") / "UTKFace"
    subset.mkdir()
    for photo in sorted(source.rglob("*.jpg"))[::SUBSET_EVERY]:
        shutil.copy(photo, subset / photo.name)
    cfg = compose_train(
        ["experiment=utkface", f"data.root={subset}", *TINY_REAL, "tracking.experiment=page-real"]
    )
    return Path(train(cfg)["checkpoint"])


@pytest.fixture(scope="module")
def two_faces() -> bytes:
    """grace_hopper.jpg twice side by side: a photo where the face finder finds two faces."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        face = Image.open(fh).convert("RGB")
    both = Image.new("RGB", (2 * face.width, face.height))
    both.paste(face, (0, 0))
    both.paste(face, (face.width, 0))
    buf = io.BytesIO()
    both.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _page_faces(page) -> tuple[list[str], list[str], list[dict[str, dict[str, float]]]]:
    """The numbers on the photo's boxes, the numbers in the list, and each listed face's bars as
    {attribute: {class: probability}}, read from what the page shows."""
    boxes = page.locator("#stage .box .badge").all_inner_texts()
    listed = page.locator("li.prediction > .badge").all_inner_texts()
    bars = page.evaluate(
        """() => [...document.querySelectorAll('li.prediction')].map(li => Object.fromEntries(
            [...li.querySelectorAll('.attr')].map(a => [a.dataset.attribute, Object.fromEntries(
                [...a.querySelectorAll('.row')].map(r => [r.dataset.class, {
                    shown: parseFloat(r.querySelector('.p').textContent),
                    width: parseFloat(r.querySelector('.fill').style.width)}]))])))"""
    )
    return boxes, listed, bars


def test_the_page_shows_every_probability_and_one_numbering_for_a_real_multitask_model(
    real_multitask_ckpt, two_faces, tmp_path
):
    sync_api = browser_or_skip()
    from fastapi.testclient import TestClient

    from agecls.cli import serve
    from agecls.serving.predict import Predictor
    from agecls.serving.serve import create_app

    app = create_app(Predictor.from_config(serve.parse_args([f"ckpt={real_multitask_ckpt}"])))
    client = TestClient(app)
    info = client.get("/api/info").json()
    results = json.loads((real_multitask_ckpt.parent.parent / "results.json").read_text())
    (card,) = info["models"]
    assert "synthetic" not in json.dumps(info).replace('"synthetic": false', "")
    assert card["data"]["name"] == "utkface" and card["synthetic"] is False
    expected = {a: round(results[f"best_val/{a}/macro_f1"], 4) for a in ATTRS}
    assert card["val_macro_f1_by_attribute"] == expected and card["val_macro_f1"] == expected["age"]
    answer = client.post("/api/predict", files={"file": ("two.jpg", two_faces, "image/jpeg")}).json()
    assert [f["face"] for f in answer["faces"]] == [0, 1]

    photo = tmp_path / "two.jpg"
    photo.write_bytes(two_faces)
    with served(app) as url, page_at(sync_api, url, 1000, 900) as page:
        page.wait_for_function("document.getElementById('model').innerText.includes('utkface')")
        model_line = page.inner_text("#model")
        page.set_input_files("#file", str(photo))
        page.click("#go")
        page.wait_for_selector("li.prediction", timeout=60_000)
        boxes, listed, bars = _page_faces(page)
        thumbs = page.eval_on_selector_all(
            "li.prediction img.thumb", "els => els.map(i => [i.alt, i.naturalWidth, i.complete])"
        )
        legend = page.inner_text("#legend")
        warning_shown = page.locator("#warning").is_visible()
        body = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "page-real.png"), full_page=True)
        if os.environ.get("AGECLS_SCREENSHOT_DIR"):  # to look at the page
            shutil.copy(tmp_path / "page-real.png", os.environ["AGECLS_SCREENSHOT_DIR"])
    scores = ", ".join(f"{a} {expected[a]:.3f}" for a in ATTRS)
    data = card["data"]
    assert model_line == (
        f"Model: {card['source']}; MLflow run {card['run_id']}; predicts age, gender, ethnicity; trained on "
        f"utkface ({data['root']}, manifest {data['manifest_hash']}); validation macro-F1 {scores}"
    )
    assert not warning_shown and "synthetic" not in body.lower()
    assert boxes == listed == ["1", "2"]  # one numbering, from 1, on the photo and in the list
    assert thumbs == [["face 1 as the model saw it", 112, True], ["face 2 as the model saw it", 112, True]]
    assert "numbered as on the photo" in legend and "chance" in legend
    assert len(bars) == 2
    for face, shown in zip(answer["faces"], bars, strict=True):
        assert list(shown) == ATTRS
        for attr, names in info["class_names"].items():
            assert list(shown[attr]) == names  # every class, in the model's order
            for name, bar in shown[attr].items():
                p = face[attr]["probs"][name]
                assert bar["shown"] == pytest.approx(p, abs=0.0051)  # shown to 2 decimals: 0.195 -> 0.20
                assert bar["width"] == pytest.approx(100 * p, abs=0.05)
