"""`tlops serve`: a thin FastAPI app around `components.serve.ModelServer`, run by uvicorn.

The app only translates HTTP: it reads the body (bounded), picks the images out of it by
content type, hands them to the server and writes the answer. Decoding, batching, reloads
and metrics live in `components/serving/server.py`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from components.core.errors import UserError
from components.serving.config import ServeConfig
from components.serving.image_decoding import BadInputError, images_from_json
from components.serving.micro_batcher import NotReadyError, QueueFullError
from components.serving.server import ModelServer

log = logging.getLogger(__name__)


def error_response(server: ModelServer, status: int, kind: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    server.metrics.errors.labels(kind).inc()
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing it as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = BadInputError("body_too_large", f"the body is larger than max_body_mb ({limit / 2**20:g} MiB); "
                              f"send fewer or smaller images per request.", 413)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def images_from_multipart(request: Request, body: bytes, max_files: int) -> list[bytes]:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=max_files, max_fields=max_files,
                             max_part_size=len(body) + 1)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise BadInputError("bad_multipart", f"the multipart body cannot be parsed: {error.message}", 400) from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    try:
        if not files:
            raise BadInputError("no_images", "the multipart form holds no file part; send images as files.", 400)
        return [await upload.read() for upload in files]
    finally:
        await form.close()


async def request_images(request: Request, cfg: ServeConfig) -> list[bytes]:
    body = await read_body(request, cfg.max_body_bytes)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type.startswith("image/"):
        return [body]
    if content_type == "application/json":
        return await anyio.to_thread.run_sync(images_from_json, body)
    if content_type == "multipart/form-data":
        return await images_from_multipart(request, body, cfg.queue_size)
    raise BadInputError(
        "unsupported_media_type",
        f"content type {content_type or '(none)'!r} is not accepted; send image/* bytes, multipart/form-data "
        f"files or application/json with base64 images.",
        415,
    )


def create_app(server: ModelServer) -> FastAPI:
    """The HTTP face of `server`; starts it (in the background) with the app unless already started."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not server.started:
            # In the background, so /healthz answers and /readyz says 503 while the model loads.
            threading.Thread(target=server.start, name="tlops-model-load", daemon=True).start()
        yield
        await anyio.to_thread.run_sync(server.stop)

    app = FastAPI(title="tlops serve", lifespan=lifespan)

    @app.middleware("http")
    async def measure(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's middleware signature
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        server.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        server.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        try:
            with server.batcher.arriving():
                payloads = await request_images(request, server.cfg)
                futures = await anyio.to_thread.run_sync(server.submit, payloads)
            predictions = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except BadInputError as error:
            return error_response(server, error.status, error.kind, str(error))
        except QueueFullError as error:
            return error_response(server, 503, "queue_full", str(error), {"Retry-After": str(error.retry_after_s)})
        except NotReadyError as error:
            return error_response(server, 503, "not_ready", str(error), {"Retry-After": "1"})
        except ClientDisconnect:
            return error_response(server, 400, "client_disconnected", "the client went away before sending the body")
        except Exception as error:  # noqa: BLE001 - a server fault is answered and counted, never a dropped connection
            log.exception("prediction failed")
            return error_response(server, 500, "internal", f"{type(error).__name__}: {error}")
        server.count(predictions)
        return JSONResponse({"model_version": predictions[0].model_version,
                             "predictions": [p.to_json() for p in predictions]})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        model = server.model
        if model is None:
            return JSONResponse({"ready": False, "error": server.load_error or "loading"}, status_code=503)
        return JSONResponse({"ready": True, "model_version": model.source.version})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model")
    async def model_info() -> Response:
        model = server.model
        if model is None:
            return error_response(server, 503, "not_ready", server.load_error or "the model is still loading")
        return JSONResponse(model.describe())

    @app.post("/admin/reload")
    async def reload() -> Response:
        try:
            result = await anyio.to_thread.run_sync(server.reload)
        except UserError as error:
            return error_response(server, 409, "reload_failed", f"{error}; still serving the previous model")
        return JSONResponse({"changed": result.changed, "previous_version": result.previous_version,
                             "version": result.version})

    return app


def uvicorn_config(app: FastAPI, cfg: ServeConfig, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=30)


def serve(cfg: ServeConfig) -> None:
    """`tlops serve`: load the model first (a bad URI stops here with one line), then listen."""
    server = ModelServer(cfg)
    server.start(raise_on_error=True)
    uvicorn.Server(uvicorn_config(create_app(server), cfg)).run()


@contextmanager
def running_service(cfg: ServeConfig, log_level: str = "warning") -> Iterator[tuple[str, ModelServer]]:
    """The real service on `cfg.host:cfg.port` in a thread, for tests and benchmarks; yields (url, server)."""
    server = ModelServer(cfg)
    service = uvicorn.Server(uvicorn_config(create_app(server), cfg, log_level))
    thread = threading.Thread(target=service.run, name="tlops-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not service.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {cfg.host}:{cfg.port}")
        time.sleep(0.02)
    try:
        yield f"http://{cfg.host}:{cfg.port}", server
    finally:
        service.should_exit = True
        thread.join(timeout=60)
