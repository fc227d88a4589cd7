"""`agecls-serve`: a local web page and JSON API predicting age group, gender and ethnicity of photos.

    agecls-serve ckpt=PATH [host=127.0.0.1] [port=8000] [max_upload_mb=10] [max_pixels=40000000]

GET /                 upload page (HTML + a little inline JS; no external assets)
GET /api/info         the attributes and class names the checkpoint(s) predict
POST /api/predict     one photo (multipart field `file`) -> {status, width, height, faces: [...]}
POST /api/predict/batch  several photos (multipart field `files`, at most max_batch) -> {results: [...]}

Security: only uploads are accepted (the server never fetches a URL); the request body is capped
(max_upload_mb per file, max_batch files) before it is parsed (413), a photo's pixel count is checked from
its header before decoding (decompression bombs: 413), and anything that is not an image is refused with a
4xx JSON {"detail": ...}. Photos are decoded in memory; the multipart parser's spool files live in the
system's private temp folder and are closed (deleted) after each request; nothing is written where it is
served. ckpt and the face-finding keys are those of agecls-predict.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import Request

from agecls.serving.predict import (
    ImageError,
    Predictor,
    TooLargeError,
    image_result,
    open_image,
)


class BodyTooLarge(Exception):
    """The request body passed the server's limit."""


class LimitBody:
    """ASGI middleware: 413 for a request whose Content-Length, or streamed body, exceeds `limit` bytes."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _json(send, 413, f"request body larger than the {self.limit} bytes allowed")
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BodyTooLarge:
            if not started:
                await _json(send, 413, f"request body larger than the {self.limit} bytes allowed")


async def _json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(predictor: Predictor, *, max_upload_mb: float = 10, max_batch: int = 16):
    """The FastAPI app serving `predictor`."""
    import threading

    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse
    from starlette.concurrency import run_in_threadpool

    max_bytes = int(max_upload_mb * 1024 * 1024)
    page = resources.files("agecls.serving").joinpath("static/index.html").read_text()
    lock = threading.Lock()  # one forward pass at a time: torch already uses every core
    app = FastAPI(title="agecls", docs_url=None, redoc_url=None, openapi_url=None)

    async def uploads(request: Request, field: str, most: int) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPException(
                415, f"send the photo as multipart/form-data field {field!r}, not {ctype or 'no type'}"
            )
        try:
            form = await request.form(max_files=most + 1, max_fields=most + 4)
        except BodyTooLarge:
            raise
        except Exception as exc:  # malformed multipart, too many parts
            raise HTTPException(400, f"cannot read the form: {exc}") from None
        try:
            files = [f for f in form.getlist(field) if hasattr(f, "read")]
            if not files:
                raise HTTPException(400, f"no file in form field {field!r}")
            if len(files) > most:
                raise HTTPException(400, f"{len(files)} files sent; at most {most} per request")
            got = []
            for f in files:
                name = f.filename or "upload"
                if f.content_type and not (
                    f.content_type.startswith("image/") or f.content_type == "application/octet-stream"
                ):
                    raise HTTPException(415, f"{name}: content type {f.content_type} is not an image")
                data = await f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise HTTPException(413, f"{name}: larger than the {max_upload_mb} MB allowed per file")
                got.append((name, data))
            return got
        finally:
            await form.close()  # deletes the parser's spooled temporary files

    def predict_one(name: str, data: bytes) -> dict[str, Any]:
        try:
            img = open_image(data, predictor.max_pixels, name)
        except TooLargeError as exc:
            raise HTTPException(413, str(exc)) from None
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        with lock:
            faces = predictor.predict_image(img)
        return image_result(name, img, faces)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "class_names": predictor.class_names,
            "detect": predictor.detect,
            "max_upload_mb": max_upload_mb,
            "max_batch": max_batch,
            "max_pixels": predictor.max_pixels,
        }

    @app.post("/api/predict")
    async def predict(request: Request) -> dict[str, Any]:
        ((name, data),) = await uploads(request, "file", 1)
        return await run_in_threadpool(predict_one, name, data)

    @app.post("/api/predict/batch")
    async def predict_batch(request: Request) -> dict[str, Any]:
        results = []
        for name, data in await uploads(request, "files", max_batch):
            try:
                results.append(await run_in_threadpool(predict_one, name, data))
            except HTTPException as exc:  # one bad photo does not sink the batch
                results.append(
                    {
                        "file": name,
                        "status": "error",
                        "error": exc.detail,
                        "code": exc.status_code,
                        "faces": [],
                    }
                )
        return {"results": results}

    # the whole body: every file plus multipart overhead
    return LimitBody(app, limit=max_bytes * max_batch + 64 * 1024)
