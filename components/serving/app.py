"""`tlops serve`: a thin FastAPI app around `components.serving.server.ModelServer`, run by uvicorn.

The app only translates HTTP: it reads the body (bounded), picks the images or texts out of it by
content type (the served model's modality decides which it takes), has the server admit, decode
and queue them, and writes the answer. Every
/predict has a deadline (`serve.request_timeout_ms`) covering all of that: past it the client
gets 504 and the request's queued images are dropped. Decoding, batching, reloads and metrics
live in `components/serving/server.py`.
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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from components.core.errors import UserError
from components.serving.config import ServeConfig
from components.serving.image_decoding import BadInputError, images_from_document, json_document
from components.serving.metrics import ServeMetrics
from components.serving.micro_batcher import DeadlineExceededError, NotReadyError, QueueFullError, Ticket
from components.serving.server import ModelServer
from components.serving.text_input import text_from_plain, texts_from_document

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


ACCEPTED = {
    "image": "image/* bytes, multipart/form-data files or application/json {\"images\": [\"<base64>\", ...]}",
    "text": "text/plain (one text) or application/json {\"texts\": [\"...\", ...]}",
}


def wrong_modality(modality: str, sent: str) -> BadInputError:
    return BadInputError("wrong_modality", f"the served model classifies {modality}s and the request sends {sent}s; "
                         f"send {ACCEPTED[modality]}.", 415)


def payloads_from_json(body: bytes, modality: str) -> list[bytes] | list[object]:
    document = json_document(body)
    sent = "text" if ("texts" in document or "text" in document) else "image" if ("images" in document or "image" in document) else None
    if sent is None:
        raise BadInputError("bad_json", f"the JSON body has neither of the keys this model takes; send {ACCEPTED[modality]}.", 400)
    if sent != modality:
        raise wrong_modality(modality, sent)
    return texts_from_document(document) if modality == "text" else images_from_document(document)


async def request_payloads(request: Request, cfg: ServeConfig, modality: str) -> list[bytes] | list[object]:
    """The request's images (bytes, still encoded) or texts (unchecked), for a model of `modality`."""
    body = await read_body(request, cfg.max_body_bytes)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/json":
        return await anyio.to_thread.run_sync(payloads_from_json, body, modality)
    sent = ("image" if content_type.startswith("image/") or content_type == "multipart/form-data"
            else "text" if content_type == "text/plain" else None)
    if sent is None:
        raise BadInputError("unsupported_media_type",
                            f"content type {content_type or '(none)'!r} is not accepted; send {ACCEPTED[modality]}.", 415)
    if sent != modality:
        raise wrong_modality(modality, sent)
    if content_type == "text/plain":
        return [text_from_plain(body)]
    if content_type.startswith("image/"):
        return [body]
    return await images_from_multipart(request, body, cfg.queue_size)


class MeasuredRequests:
    """Counts and times every HTTP request by route and status: a plain ASGI middleware, since Starlette's
    `BaseHTTPMiddleware` (`@app.middleware`) runs each request through an extra task and stream."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the router notes the route in the scope
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


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

    app.add_middleware(MeasuredRequests, metrics=server.metrics)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        timeout_s = server.cfg.request_timeout_s
        deadline = time.monotonic() + timeout_s
        ticket: Ticket | None = None
        try:
            async with asyncio.timeout(timeout_s):
                with server.batcher.arriving():
                    payloads = await request_payloads(request, server.cfg, server.modality())
                    ticket, model = server.admit(len(payloads), deadline)  # room reserved before decoding
                    images = await asyncio.get_running_loop().run_in_executor(server.decoder, server.prepare,
                                                                              model, payloads)
                    future = server.batcher.submit(ticket, model, images)
                predictions = await asyncio.wrap_future(future)
        except (TimeoutError, DeadlineExceededError):
            return error_response(server, 504, "deadline_exceeded",
                                  f"no answer within serve.request_timeout_ms ({server.cfg.request_timeout_ms:g} ms); "
                                  f"the request's images were dropped. Retry later or send fewer images.")
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
        finally:
            if ticket is not None:
                server.batcher.discard(ticket)  # a request that failed or timed out gives its places back now
        server.count(predictions)
        return JSONResponse({"model_version": predictions[0].model_version,
                             "predictions": [p.to_json() for p in predictions]})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        model, problem = server.model, server.problem()
        if problem is not None or model is None:
            return JSONResponse({"ready": False, "error": problem}, status_code=503)
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
    # limit_concurrency: connections (and tasks) beyond it get uvicorn's own 503 before any work.
    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=30,
                          limit_concurrency=cfg.limit_concurrency)


def serve(server: ModelServer) -> None:
    """`tlops serve`: listen with `server`, started beforehand (so a bad model stops before any of this is imported)."""
    uvicorn.Server(uvicorn_config(create_app(server), server.cfg)).run()


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
