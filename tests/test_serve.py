"""`agecls-serve`: the JSON API refuses every bad upload with a clear 4xx and predicts good ones; the upload
page works end to end in a real headless Chromium (Playwright with the system browser, `make browser`)."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from agecls.cli.predict import parse_args
from agecls.errors import UsageError
from agecls.serving.predict import Predictor

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("AGECLS_CHROMIUM", "/usr/bin/chromium")


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
    assert "images" not in cfg and "grid" not in cfg
    predictor = Predictor.from_config(cfg)
    assert predictor.detect is False and predictor.margin == 0.3 and len(predictor.models) == 1
    for argv, message in (
        (["port=80"], "ckpt=... is required"),
        ([f"ckpt={tiny_multitask_ckpt}", "max_batch=0"], "max_batch=0: valid: a whole number >= 1"),
        ([f"ckpt={tiny_multitask_ckpt}", "margin=3"], "margin=3: valid: a number from 0 to 2"),
        ([f"ckpt={tiny_multitask_ckpt}", "max_uploadmb=3"], "did you mean max_upload_mb?"),
    ):
        with pytest.raises(UsageError, match=re.escape(message)):
            serve.parse_args(argv)


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "http" not in page.text.split("<script>")[1]
    info = client.get("/api/info").json()
    assert list(info["class_names"]) == ["age", "gender", "ethnicity"] and info["max_batch"] == 3


def test_one_photo_is_predicted(client, face_jpeg):
    got = client.post("/api/predict", files={"file": ("grace.jpg", face_jpeg, "image/jpeg")})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["status"] == "ok" and len(body["faces"]) == 1 and body["width"] == 512
    face = body["faces"][0]
    assert set(face) >= {"box", "age", "gender", "ethnicity"}
    assert sum(face["gender"]["probs"].values()) == pytest.approx(1, abs=1e-4)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_upload_page_in_headless_chromium(app, face_jpeg, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')"
    )
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) or set AGECLS_CHROMIUM"
        )
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        photo = tmp_path / "grace.jpg"
        photo.write_bytes(face_jpeg)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.set_input_files("#file", str(photo))
                page.click("#go")
                page.wait_for_selector("li.prediction", timeout=30_000)
                text = page.inner_text("#result")
                assert "age:" in text and "gender:" in text and "ethnicity:" in text
                assert page.inner_text("#status") == "1 face(s) found"
                assert page.locator(".box").count() == 1
                page.set_input_files("#file", {"name": "x.txt", "mimeType": "text/plain", "buffer": b"hi"})
                page.click("#go")
                page.wait_for_selector("#status.error", timeout=30_000)
                assert "415" in page.inner_text("#status")
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
