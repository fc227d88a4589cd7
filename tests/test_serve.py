"""`agecls-serve`: the JSON API refuses every bad upload with a clear 4xx and predicts good ones; the upload
page works end to end in a real headless Chromium (Playwright with the system browser, `make browser`)."""

from __future__ import annotations

import io
import os
import re
import shutil

import pytest
from PIL import Image
from tests.browser import browser_or_skip, page_at, served

from agecls.cli.predict import parse_args
from agecls.errors import UsageError
from agecls.serving.predict import Predictor
from agecls.serving.serve import synthetic_warning
from agecls.serving.sources import SYNTHETIC_WARNING, describe_model, model_card, val_scores

pytestmark = pytest.mark.slow


def jpeg(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def face_jpeg() -> bytes:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def app(tiny_multitask_ckpt):
    from agecls.serving.serve import create_app

    cfg = parse_args([f"ckpt={tiny_multitask_ckpt}", "images=-", "max_pixels=1000000"])
    return create_app(Predictor.from_config(cfg), max_upload_mb=0.5, max_batch=3)


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)


def test_command_line_keys_reach_the_predictor_and_the_app(tiny_multitask_ckpt):
    from agecls.cli import serve

    cfg = serve.parse_args([f"ckpt={tiny_multitask_ckpt}", "port=9000", "host=0.0.0.0", "detect=false"])
    assert (cfg.port, cfg.host, cfg.max_upload_mb, cfg.max_batch, cfg.max_pixels) == (
        9000,
        "0.0.0.0",
        10,
        16,
        40_000_000,
    )
    limits = (cfg.max_concurrent, cfg.max_queue, cfg.max_wait_s, cfg.max_decoded_pixels)
    assert limits == (2, 16, 60, 16_000_000)
    assert "images" not in cfg and "grid" not in cfg
    predictor = Predictor.from_config(cfg)
    assert predictor.detect is False and predictor.finder == "mtcnn" and len(predictor.models) == 1
    for argv, message in (
        (["port=80"], "ckpt=... is required"),
        ([f"ckpt={tiny_multitask_ckpt}", "max_batch=0"], "max_batch=0: valid: a whole number >= 1"),
        ([f"ckpt={tiny_multitask_ckpt}", "finder=dlib"], "finder='dlib': valid: mtcnn | haar"),
        ([f"ckpt={tiny_multitask_ckpt}", "max_uploadmb=3"], "did you mean max_upload_mb?"),
        ([f"ckpt={tiny_multitask_ckpt}", "port=99999"], "port=99999: valid: a whole number from 1 to 65535"),
        ([f"ckpt={tiny_multitask_ckpt}", "port=0"], "port=0: valid: a whole number from 1 to 65535"),
        ([f"ckpt={tiny_multitask_ckpt}", "max_queue=-1"], "max_queue=-1: valid: a whole number >= 0"),
        ([f"ckpt={tiny_multitask_ckpt}", "max_wait_s=0"], "max_wait_s=0: valid: a number of seconds > 0"),
    ):
        with pytest.raises(UsageError, match=re.escape(message)):
            serve.parse_args(argv)


def test_the_app_defaults_are_those_of_serve_yaml():
    import inspect

    from omegaconf import OmegaConf

    from agecls.config import CONFIG_DIR
    from agecls.serving.serve import create_app

    conf = OmegaConf.load(CONFIG_DIR / "serve.yaml")
    defaults = {k: v.default for k, v in inspect.signature(create_app).parameters.items() if k != "predictor"}
    assert defaults == {k: conf[k] for k in defaults}


def test_page_and_info(client, tiny_multitask_ckpt):
    import json

    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "http" not in page.text.split("<script>")[1]
    assert "age, gender and ethnicity" not in page.text  # the model's own attributes are filled in from info
    info = client.get("/api/info").json()
    assert list(info["class_names"]) == ["age", "gender", "ethnicity"] and info["max_batch"] == 3
    results = json.loads((tiny_multitask_ckpt.parent.parent / "results.json").read_text())
    (card,) = info["models"]
    assert card["source"] == str(tiny_multitask_ckpt.resolve()) and card["registered"] is None
    assert card["run_id"] == results["mlflow_run_id"] and card["attributes"] == ["age", "gender", "ethnicity"]
    assert card["data"]["name"] == "synthetic" and card["data"]["root"].endswith("synthetic-n200-s0")
    assert len(card["data"]["manifest_hash"]) == 12 and card["synthetic"] is True
    assert card["val_macro_f1"] == round(results["best_val/macro_f1"], 4)
    by_attribute = {a: round(results[f"best_val/{a}/macro_f1"], 4) for a in ("age", "gender", "ethnicity")}
    assert card["val_macro_f1_by_attribute"] == by_attribute and by_attribute["age"] == card["val_macro_f1"]
    assert info["synthetic_warning"] == (
        "trained on generated synthetic faces, not real photos: its predictions on real faces are not "
        "meaningful"
    )


def test_only_a_model_trained_on_generated_faces_carries_the_synthetic_warning():
    real = {"source": "a.ckpt", "synthetic": False}
    assert synthetic_warning([real]) == {}
    assert synthetic_warning([real, {"source": "b.ckpt", "synthetic": True}]) == {
        "synthetic_warning": SYNTHETIC_WARNING
    }


def test_the_model_line_names_each_attributes_validation_score():
    card = {
        "source": "models:/agecls-utkface@best",
        "version": "3",
        "run_id": "abc123",
        "attributes": ["age", "gender", "ethnicity"],
        "data": {"name": "utkface", "root": "/data/UTKFace", "manifest_hash": "1a2b3c4d5e6f"},
        "val_macro_f1": 0.556,
        "val_macro_f1_by_attribute": {"age": 0.556, "gender": 0.9012, "ethnicity": None},
    }
    assert describe_model(card) == (
        "models:/agecls-utkface@best (version 3, MLflow run abc123): age, gender, ethnicity; trained on "
        "utkface (/data/UTKFace, manifest 1a2b3c4d5e6f); validation macro-F1 age 0.556, gender 0.901, "
        "ethnicity unknown"
    )
    single = {**card, "attributes": ["age"], "val_macro_f1_by_attribute": {"age": 0.556}}
    assert describe_model(single).endswith("; validation macro-F1 0.556")
    assert val_scores(
        {"best_val/macro_f1": 0.5, "best_val/gender/macro_f1": 0.8}, ["age", "gender"], "age"
    ) == {
        "age": 0.5,
        "gender": 0.8,
    }
    assert val_scores({"val/macro_f1": 0.41}, ["gender"], "gender") == {"gender": 0.41}


def test_start_up_names_the_model_and_the_url_to_open(tiny_multitask_ckpt, monkeypatch, capsys):
    import uvicorn

    from agecls.cli import serve

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(kw))
    assert serve.main([f"ckpt={tiny_multitask_ckpt}", "host=0.0.0.0", "port=8123"]) == 0
    err = capsys.readouterr().err.splitlines()
    card = model_card(
        tiny_multitask_ckpt,
        Predictor.from_config(serve.parse_args([f"ckpt={tiny_multitask_ckpt}"])).models[0].module,
    )
    assert err[-2:] == [
        f"agecls-serve: model {describe_model(card)}",
        "agecls-serve: open http://127.0.0.1:8123/ in a browser (Ctrl-C stops)",
    ]
    assert err[-2].startswith(f"agecls-serve: model {tiny_multitask_ckpt.resolve()} (MLflow run ")
    assert ": age, gender, ethnicity; trained on synthetic" in err[-2]
    assert (served["host"], served["port"]) == ("0.0.0.0", 8123)


def test_one_photo_is_predicted(client, face_jpeg):
    got = client.post("/api/predict", files={"file": ("grace.jpg", face_jpeg, "image/jpeg")})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["status"] == "ok" and len(body["faces"]) == 1 and body["width"] == 512
    face = body["faces"][0]
    assert set(face) >= {"box", "age", "gender", "ethnicity"}
    assert sum(face["gender"]["probs"].values()) == pytest.approx(1, abs=1e-4)
    import base64

    head, _, data = face["thumbnail"].partition(",")
    assert head == "data:image/jpeg;base64"
    crop = Image.open(io.BytesIO(base64.b64decode(data)))  # the square crop, cut to the page's 112 px
    assert (crop.format, crop.size) == ("JPEG", (112, 112))


def test_a_batch_reports_each_photo(client, face_jpeg):
    blank = jpeg(Image.new("RGB", (64, 48), "gray"))
    files = [
        ("files", ("a.jpg", face_jpeg, "image/jpeg")),
        ("files", ("b.jpg", blank, "image/jpeg")),
        ("files", ("c.jpg", b"not an image", "image/jpeg")),
    ]
    got = client.post("/api/predict/batch", files=files)
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    assert [r["status"] for r in results] == ["ok", "no_face", "error"]
    assert "thumbnail" not in results[0]["faces"][0]  # the page's crops only where the page asks
    assert results[2]["code"] == 400 and "c.jpg" in results[2]["error"]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"files": {"file": ("x.txt", b"hello", "text/plain")}}, 415, "not an image"),
        ({"files": {"file": ("x.jpg", b"hello", "image/jpeg")}}, 400, "not a readable image"),
        ({"files": {"photo": ("x.jpg", b"hello", "image/jpeg")}}, 400, "no file in form field 'file'"),
        ({"data": {"file": "just text"}}, 415, "multipart/form-data"),
        ({"files": {"file": (None, "just text")}}, 400, "no file in form field"),
        ({"json": {"url": "http://example.com/face.jpg"}}, 415, "multipart/form-data"),
        ({"content": b"\xff\xd8", "headers": {"content-type": "image/jpeg"}}, 415, "multipart/form-data"),
    ],
)
def test_bad_uploads_get_a_clear_4xx(client, kwargs, status, message):
    got = client.post("/api/predict", **kwargs)
    assert got.status_code == status and message in got.json()["detail"], got.text


def test_size_pixel_and_batch_limits(client, face_jpeg):
    big = os.urandom(600 * 1024)  # over 0.5 MB per file
    got = client.post("/api/predict", files={"file": ("big.jpg", big, "image/jpeg")})
    assert got.status_code == 413 and "big.jpg" in got.json()["detail"]
    huge = client.post(
        "/api/predict",
        content=b"0" * (2 * 1024 * 1024),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert huge.status_code == 413 and "request body larger" in huge.json()["detail"]
    bomb = jpeg(Image.new("L", (1200, 1000)), "PNG")  # 1.2 Mpx of zeros: a few KB compressed
    got = client.post("/api/predict", files={"file": ("bomb.png", bomb, "image/png")})
    assert got.status_code == 413 and "pixels" in got.json()["detail"]
    many = [("files", (f"{i}.jpg", face_jpeg, "image/jpeg")) for i in range(4)]
    got = client.post("/api/predict/batch", files=many)
    assert got.status_code == 400 and "at most 3" in got.json()["detail"]
    two = [("file", ("a.jpg", face_jpeg, "image/jpeg"))] * 2
    assert client.post("/api/predict", files=two).status_code == 400


def test_a_bad_port_is_one_line_and_exit_code_2_before_the_checkpoint_loads(capsys):
    from agecls.cli import serve

    assert serve.main(["ckpt=/no/such.ckpt", "port=99999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "agecls-serve: error: port=99999: valid: a whole number from 1 to 65535"


def test_an_oversize_chunked_body_gets_a_json_413(client):
    def chunks():  # no Content-Length: only the streamed count can stop it
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(40):
            yield b"0" * 64 * 1024

    got = client.post(
        "/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    limit = 3 * 512 * 1024 + 64 * 1024  # max_batch files of max_upload_mb, plus the multipart overhead
    assert got.status_code == 413 and got.headers["content-type"] == "application/json", got.text
    assert got.json() == {"detail": f"request body larger than the {limit} bytes allowed"}


def test_a_batch_reports_an_oversize_or_non_image_file_and_predicts_the_rest(client, face_jpeg):
    files = [
        ("files", ("big.jpg", os.urandom(600 * 1024), "image/jpeg")),
        ("files", ("a.jpg", face_jpeg, "image/jpeg")),
        ("files", ("notes.txt", b"hello", "text/plain")),
    ]
    got = client.post("/api/predict/batch", files=files)
    assert got.status_code == 200, got.text
    big, face, text = got.json()["results"]
    assert (big["status"], big["code"], big["error"]) == (
        "error",
        413,
        "big.jpg: larger than the 0.5 MB allowed per file",
    )
    assert face["status"] == "ok" and len(face["faces"]) == 1
    assert (text["code"], text["error"]) == (415, "notes.txt: content type text/plain is not an image")


def test_jpegs_decode_reduced_and_other_formats_over_the_decoded_limit_are_refused(
    tiny_multitask_ckpt, client, face_jpeg, monkeypatch
):
    from fastapi.testclient import TestClient

    from agecls.serving import serve

    full = client.post("/api/predict", files={"file": ("grace.jpg", face_jpeg, "image/jpeg")}).json()
    cfg = parse_args([f"ckpt={tiny_multitask_ckpt}", "images=-", "max_pixels=1000000"])
    small = TestClient(serve.create_app(Predictor.from_config(cfg), max_decoded_pixels=100_000))
    monkeypatch.setattr(serve, "REDUCE_TO", 256)  # grace_hopper.jpg (512x600, 307,200 px) decodes at 1/2
    got = small.post("/api/predict", files={"file": ("grace.jpg", face_jpeg, "image/jpeg")})
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["width"], body["height"], len(body["faces"])) == (512, 600, 1)
    # the box found at half size, in the photo's own pixels: where the full-size decode finds it
    for reduced, whole in zip(body["faces"][0]["box"], full["faces"][0]["box"], strict=True):
        assert abs(reduced - whole) <= 0.1 * full["faces"][0]["box"][2]
    png = jpeg(Image.open(io.BytesIO(face_jpeg)), "PNG")
    got = small.post("/api/predict", files={"file": ("grace.png", png, "image/png")})
    assert got.status_code == 413
    assert got.json()["detail"] == (
        "grace.png: 512x600 = 307200 pixels, more than the 100000 allowed for a PNG "
        "(a JPEG is decoded reduced and may have up to 1000000)"
    )
    assert small.get("/api/info").json()["max_decoded_pixels"] == 100_000


def test_decode_image_reduces_jpegs_to_the_needed_size_and_keeps_the_photos_own_size():
    from agecls.serving.faces import TooLargeError, decode_image

    def encoded(size: tuple[int, int], fmt: str = "JPEG", orientation: int | None = None) -> bytes:
        buf = io.BytesIO()
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        Image.new("RGB", size, (90, 120, 150)).save(buf, format=fmt, exif=exif.tobytes())
        return buf.getvalue()

    def decoded(data: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
        img, size = decode_image(data, 10**6, "x", reduce_to=64, max_decoded_pixels=10_000)
        return img.size, size

    assert decoded(encoded((200, 150))) == ((100, 75), (200, 150))  # 1/4 would be under 64 px
    assert decoded(encoded((127, 120))) == ((64, 60), (127, 120))
    assert decoded(encoded((120, 120))) == ((60, 60), (120, 120))  # below 64 px: 14,400 px would not fit
    assert decoded(encoded((200, 150), orientation=6)) == ((75, 100), (150, 200))  # EXIF: turned a quarter
    assert decoded(encoded((100, 100), "PNG")) == ((100, 100), (100, 100))
    message = "x: 120x120 = 14400 pixels, more than the 10000 allowed for a PNG"
    with pytest.raises(TooLargeError, match=re.escape(message)):
        decoded(encoded((120, 120), "PNG"))


def test_the_gate_queues_a_bounded_number_and_answers_busy_with_retry_after():
    import asyncio

    from agecls.serving.serve import Busy, Gate

    async def scenario() -> list[str]:
        gate = Gate(slots=1, queue=1, wait_s=0.5)
        release = asyncio.Event()
        order: list[str] = []

        async def job(tag: str, hold: bool) -> None:
            try:
                async with gate.turn():
                    order.append(f"{tag} in")
                    if hold:
                        await release.wait()
            except Busy as exc:
                order.append(f"{tag} busy {exc.retry_after}: {exc.detail}")

        first = asyncio.create_task(job("a", True))
        await asyncio.sleep(0)
        second = asyncio.create_task(job("b", False))  # waits: the queue has room for one
        await asyncio.sleep(0)
        await job("c", False)  # one at work, one waiting: refused at once
        release.set()
        await asyncio.gather(first, second)
        third = asyncio.create_task(job("d", True))
        release.clear()
        await asyncio.sleep(0)
        await job("e", False)  # waits its 0.5 s, then busy
        release.set()
        await third
        return order

    order = asyncio.run(scenario())
    assert order[0] == "a in" and order[2:4] == ["b in", "d in"]
    assert order[1] == (
        "c busy 3: server busy: 1 requests at work and 1 waiting "
        "(max_concurrent=1, max_queue=1, max_wait_s=0.5); retry after 3 s"
    )
    assert order[4].startswith("e busy ") and "no turn within 0.5 s" in order[4]


def test_upload_page_in_headless_chromium(app, client, face_jpeg, tmp_path):
    sync_api = browser_or_skip()
    photo = tmp_path / "grace.jpg"
    photo.write_bytes(face_jpeg)
    with served(app) as url, page_at(sync_api, url) as page:
        page.wait_for_selector("#warning:visible", timeout=30_000)
        card = client.get("/api/info").json()["models"][0]
        assert page.inner_text("h1") == "agecls: age, gender and ethnicity from a photo"
        assert "gets an age group, a gender and an ethnicity with probabilities" in page.inner_text("#intro")
        assert page.inner_text("#model") == (
            f"Model: {card['source']}; MLflow run {card['run_id']}; predicts age, gender, ethnicity; "
            f"trained on synthetic ({card['data']['root']}, "
            f"manifest {card['data']['manifest_hash']}); validation macro-F1 "
            + ", ".join(f"{a} {card['val_macro_f1_by_attribute'][a]:.3f}" for a in card["attributes"])
        )
        assert page.inner_text("#warning") == (
            "Warning: This model was trained on generated synthetic faces, not real photos: its "
            "predictions on real faces are not meaningful."
        )
        page.set_input_files("#file", str(photo))
        page.click("#go")
        page.wait_for_selector("li.prediction", timeout=30_000)
        heads = page.locator("li.prediction .attr .head").all_inner_texts()
        assert [h.split(":")[0] for h in heads] == ["age", "gender", "ethnicity"]
        assert page.inner_text("#status") == "1 face(s) found"
        assert page.locator(".box .badge").all_inner_texts() == ["1"]
        assert page.locator("li.prediction > .badge").all_inner_texts() == ["1"]
        shown = page.eval_on_selector("li.prediction img.thumb", "i => [i.naturalWidth, i.naturalHeight]")
        assert shown == [112, 112]  # the face as the model saw it
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        if os.environ.get("AGECLS_SCREENSHOT"):  # to look at the page: AGECLS_SCREENSHOT=PATH
            shutil.copy(tmp_path / "page.png", os.environ["AGECLS_SCREENSHOT"])
        page.set_input_files("#file", {"name": "x.txt", "mimeType": "text/plain", "buffer": b"hi"})
        page.click("#go")
        page.wait_for_selector("#status.error", timeout=30_000)
        assert "415" in page.inner_text("#status")

        # an age-only model on real data: the page promises nothing else and warns of nothing
        def age_only(route):
            info = client.get("/api/info").json()
            info["class_names"] = {"age": info["class_names"]["age"]}
            info["models"] = [
                {**card, "attributes": ["age"], "synthetic": False, "data": {"name": "utkface"}}
            ]
            route.fulfill(json=info)

        page.route("**/api/info", age_only)
        page.reload()
        page.wait_for_function("document.getElementById('model').innerText.includes('utkface')")
        assert page.inner_text("h1") == "agecls: age from a photo"
        assert "gender" not in page.inner_text("#intro") and "ethnicity" not in page.inner_text("#intro")
        assert "each gets an age group with probabilities" in page.inner_text("#intro")
        assert not page.locator("#warning").is_visible()
        page.set_input_files("#file", str(photo))
        page.click("#go")
        page.wait_for_selector("li.prediction", timeout=30_000)
        assert page.locator("li.prediction .attr").count() == 1
        assert re.fullmatch(r"age: \S+ \(\d\.\d\d\)", page.inner_text("li.prediction .head"))
        assert page.inner_text("#model").endswith(f"validation macro-F1 {card['val_macro_f1']:.3f}")
