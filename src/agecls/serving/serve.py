"""`agecls-serve`: a local web page and JSON API predicting age group, gender and ethnicity of photos.

    agecls-serve ckpt=PATH [host=127.0.0.1] [port=8000] [max_upload_mb=10] [max_concurrent=2] [max_queue=16]

GET /                 upload page (HTML + a little inline JS; no external assets)
GET /api/info         the attributes and class names the checkpoint(s) predict, each model's card (models:
                      source, registered, version, run_id, attributes, data {name, root, manifest_hash},
                      val_macro_f1, val_macro_f1_by_attribute, synthetic), synthetic_warning only where a
                      model was trained on generated faces, and the server's limits
POST /api/predict     one photo (multipart field `file`) -> {status, width, height, faces: [...]}, each face
                      with its crop as the model saw it (`thumbnail`, a JPEG data URL at most 112 px)
POST /api/predict/batch  several photos (multipart field `files`, at most max_batch) -> {results: [...]}, 200
                      whenever the request itself is readable: each file has its own result, a refused or
                      unreadable one {status: "error", code, error} (413 too large, 415 not an image, 400
                      unreadable)

Load: at most max_concurrent requests decode and predict at once (a batch counts once); up to max_queue more
wait for a turn, at most max_wait_s; any other gets 503 with a Retry-After header and a JSON detail. Uploads
are spooled to the system's private temp folder while they arrive and read into memory only in their turn,
so memory is bounded by max_concurrent photos, whatever the number of clients.

Security and memory: only uploads are accepted (the server never fetches a URL); the request body is capped
(max_upload_mb per file, max_batch files) before and while it is parsed (JSON 413, chunked bodies too); a
photo's size is checked from its header before decoding: more than max_pixels is refused (413), and so is
one that would decode to more than max_decoded_pixels. JPEGs decode at 1/2, 1/4 or 1/8 of their size, no
smaller than 2x the detector's working size (DETECT_MAX_SIDE) unless max_decoded_pixels needs it, so a
40 Mpx JPEG decodes to about 10 Mpx or less; other formats decode at full size. Face boxes and width/height
are always in the photo's own pixels. Anything that is not an image is refused with a 4xx JSON
{"detail": ...}. Spool files are closed (deleted) after each request; nothing is written where it is
served. ckpt and the face-finding keys are those of agecls-predict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from agecls.serving.faces import DETECT_MAX_SIDE, ImageError, TooLargeError, decode_image
from agecls.serving.predict import Predictor, image_result
from agecls.serving.sources import SYNTHETIC_WARNING, model_card

log = logging.getLogger(__name__)

# JPEGs decode reduced to no less than this longer side: twice what the detector searches at, so the faces
# it finds and the crops cut from them (a few hundred pixels at most) are as in the full-size photo
REDUCE_TO = 2 * DETECT_MAX_SIDE
DEFAULT_MAX_DECODED_PIXELS = 16_000_000  # 48 MB as RGB; conf/serve.yaml max_decoded_pixels


class BodyTooLarge(Exception):
    """The request body passed the server's limit."""


class LimitBody:
    """ASGI middleware: JSON 413 for a request whose Content-Length, or streamed (chunked) body, exceeds
    `limit` bytes; whatever the app was answering when the stream passed the limit is dropped."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"request body larger than the {self.limit} bytes allowed"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _json(send, 413, detail)
        seen = 0
        over = started = False

        async def counted():
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if over:  # the app's answer to BodyTooLarge (a 500 from Starlette's error middleware)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _json(send, 413, detail)


async def _json(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Busy(Exception):
    """No turn for this request: every slot busy and the queue full, or its wait ran out."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


class Gate:
    """At most `slots` requests at work at once; at most `queue` more wait for a turn, each at most `wait_s`
    seconds; any other is Busy at once. Retry-After is estimated from recent service times."""

    def __init__(self, slots: int, queue: int, wait_s: float) -> None:
        self.slots, self.queue, self.wait_s = slots, queue, wait_s
        self.waiting = self.working = 0
        self.service_s = 1.0  # running mean seconds per request, for Retry-After
        self._sem: asyncio.Semaphore | None = None  # made in the server's event loop, on first use

    def _busy(self, why: str) -> Busy:
        ahead = self.working + self.waiting
        retry = max(1, math.ceil(self.service_s * (ahead + 1) / self.slots))
        limits = f"max_concurrent={self.slots}, max_queue={self.queue}, max_wait_s={self.wait_s:g}"
        return Busy(f"server busy: {why} ({limits}); retry after {retry} s", retry)

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for a slot (Busy when the queue is full or the wait runs out), hold it for the block."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        if not self._sem.locked():
            await self._sem.acquire()  # a free slot: taken at once, without suspending
        elif self.waiting >= self.queue:
            raise self._busy(f"{self.working} requests at work and {self.waiting} waiting")
        else:
            self.waiting += 1
            try:
                await asyncio.wait_for(self._sem.acquire(), self.wait_s)
            except asyncio.TimeoutError:
                raise self._busy(f"no turn within {self.wait_s:g} s") from None
            finally:
                self.waiting -= 1
        self.working += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.working -= 1
            self._sem.release()
            self.service_s = 0.8 * self.service_s + 0.2 * (time.perf_counter() - start)


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing): the decoders'
    large buffers come from per-thread malloc arenas, which glibc otherwise keeps after they are freed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list[Any] = []


def _malloc_trim():
    if not _TRIM:
        import ctypes
        import ctypes.util

        trim = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            trim = libc.malloc_trim
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
            trim = None
        _TRIM.append(trim)
    return _TRIM[0]


@dataclasses.dataclass
class Service:
    """What the app's handlers share (`app.state.service`): the predictor, the limits, the turns."""

    predictor: Predictor
    max_upload_mb: float
    max_batch: int
    max_concurrent: int
    max_queue: int
    max_decoded_pixels: int
    gate: Gate
    page: str
    # which model answers: shown, so a user can tell a demo model from a real one
    models: list[dict[str, Any]]
    # one detection + forward pass at a time: OpenCV and torch already use every core
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def check_upload(self, upload) -> None:
        """415 / 413 for a file whose declared type is not an image or whose spooled size is over the limit:
        cheap, so a single upload is checked before it waits for a turn."""
        name = upload.filename or "upload"
        ctype = upload.content_type
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise HTTPException(415, f"{name}: content type {ctype} is not an image")
        if upload.size is not None and upload.size > self.max_bytes:
            raise HTTPException(413, f"{name}: larger than the {self.max_upload_mb:g} MB allowed per file")

    def predict_one(self, upload, thumbnails: bool = False) -> dict[str, Any]:
        """Check, read, decode and predict one uploaded file (in a worker thread, in the request's turn); with
        `thumbnails` each face carries its crop (the page shows it)."""
        self.check_upload(upload)
        name = upload.filename or "upload"
        upload.file.seek(0)
        data = upload.file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"{name}: larger than the {self.max_upload_mb:g} MB allowed per file")
        try:
            img, size = decode_image(
                data,
                self.predictor.max_pixels,
                name,
                reduce_to=REDUCE_TO,
                max_decoded_pixels=self.max_decoded_pixels,
            )
        except TooLargeError as exc:
            raise HTTPException(413, str(exc)) from None
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        del data
        try:
            with self.lock:
                faces = self.predictor.predict_image(img, size[0] / img.width, thumbnails=thumbnails)
            return image_result(name, img, faces, size)
        finally:
            img.close()

    def predict_many(self, files: list[Any]) -> list[dict[str, Any]]:
        """Each file's result: a refused or unreadable file is an error entry, the others are predicted."""
        results = []
        for upload in files:
            try:
                results.append(self.predict_one(upload))
            except HTTPException as exc:
                name = upload.filename or "upload"
                results.append(
                    {
                        "file": name,
                        "status": "error",
                        "error": exc.detail,
                        "code": exc.status_code,
                        "faces": [],
                    }
                )
        return results


@asynccontextmanager
async def uploads(request: Request, field: str, most: int) -> AsyncIterator[list[Any]]:
    """The form's files in `field` (UploadFile, still spooled) while the block runs; 4xx for a form that is
    not one, has none or too many."""
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
        yield files
    finally:
        await form.close()  # deletes the parser's spooled temporary files


def settled(fn, *args):
    """fn(*args), then the freed decode buffers go back to the system before the turn ends."""
    try:
        return fn(*args)
    finally:
        release_memory()


def _service(request: Request) -> Service:
    return request.app.state.service


async def busy(request: Request, exc: Busy) -> JSONResponse:
    log.debug("%s refused: %s", request.url.path, exc.detail)
    return JSONResponse({"detail": exc.detail}, 503, headers={"Retry-After": str(exc.retry_after)})


def index(request: Request) -> str:
    return _service(request).page


def model_cards(predictor: Predictor) -> list[dict[str, Any]]:
    """Each served model's card (agecls.serving.sources.model_card)."""
    return [m.card or model_card(m.path, m.module) for m in predictor.models]


def synthetic_warning(cards: list[dict[str, Any]]) -> dict[str, str]:
    """{"synthetic_warning": ...} when a model was trained on generated faces, else nothing: the API says
    only what is true of the models it serves."""
    return {"synthetic_warning": SYNTHETIC_WARNING} if any(c.get("synthetic") for c in cards) else {}


def info(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {
        "class_names": service.predictor.class_names,
        "models": service.models,
        **synthetic_warning(service.models),
        "detect": service.predictor.detect,
        "max_upload_mb": service.max_upload_mb,
        "max_batch": service.max_batch,
        "max_pixels": service.predictor.max_pixels,
        "max_decoded_pixels": service.max_decoded_pixels,
        "max_concurrent": service.max_concurrent,
        "max_queue": service.max_queue,
    }


async def predict(request: Request) -> dict[str, Any]:
    service = _service(request)
    async with uploads(request, "file", 1) as (upload,):
        service.check_upload(upload)
        async with service.gate.turn():
            return await run_in_threadpool(settled, service.predict_one, upload, True)


async def predict_batch(request: Request) -> dict[str, Any]:
    service = _service(request)
    async with uploads(request, "files", service.max_batch) as files, service.gate.turn():
        return {"results": await run_in_threadpool(settled, service.predict_many, files)}


def create_app(
    predictor: Predictor,
    *,
    max_upload_mb: float = 10,
    max_batch: int = 16,
    max_concurrent: int = 2,
    max_queue: int = 16,
    max_wait_s: float = 60,
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
):
    """The FastAPI app serving `predictor`: its request bodies capped, its work bounded (module docstring)."""
    service = Service(
        predictor,
        max_upload_mb,
        max_batch,
        max_concurrent,
        max_queue,
        max_decoded_pixels,
        gate=Gate(max_concurrent, max_queue, max_wait_s),
        page=resources.files("agecls.serving").joinpath("static/index.html").read_text(),
        models=model_cards(predictor),
    )
    app = FastAPI(title="agecls", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_exception_handler(Busy, busy)
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/api/info", info, methods=["GET"])
    app.add_api_route("/api/predict", predict, methods=["POST"])
    app.add_api_route("/api/predict/batch", predict_batch, methods=["POST"])
    # the whole body: every file plus multipart overhead
    return LimitBody(app, limit=service.max_bytes * max_batch + 64 * 1024)
