"""The Starlette app: endpoints, request bodies to queued work, answers and errors as JSON.

Startup work runs in the lifespan handler (the batcher thread starts and a warm-up forward runs
in the background: ``/healthz`` answers 503 until it is done); decoding and resizing run in worker
threads and forwards in the batcher's thread, so the event loop only moves bytes. At shutdown
the batcher finishes what is queued and in a forward before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, Awaitable, Callable

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from navit.serve.batcher import Batcher, BatchingConfig, Ticket, WorkItem
from navit.serve.inputs import (RawInput, embedding_inputs, integer, json_predict_inputs, multipart_inputs,
                                parse_json, predict_options, upload_input)  # fmt: skip
from navit.serve.limits import ServeError, ServeLimits, bad_request, check_pixels, decode_image, too_large
from navit.serve.metrics import ServeMetrics
from navit.serve.served import ServedModel

logger = logging.getLogger("navit.serve")


class Service:
    """One served model with its batcher, limits and metrics; the endpoints are its methods."""

    def __init__(self, served: ServedModel, batching: BatchingConfig, limits: ServeLimits) -> None:
        self.served, self.batching, self.limits = served, batching, limits
        self.metrics = ServeMetrics()
        self.batcher = Batcher(served, batching, limits.max_queue, self.metrics)
        self.ready = threading.Event()
        self.warm_error: str | None = None

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()
        threading.Thread(target=self._warm_up, name="navit-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.served.warm_up()
            self.ready.set()
        except Exception as error:  # the server stays up, unhealthy, and says why
            self.warm_error = f"warm-up failed: {error}"
            logger.exception("navit serve: warm-up failed")

    def stop(self) -> None:
        self.ready.clear()
        self.batcher.stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.start()
        yield
        await anyio.to_thread.run_sync(self.stop)

    # -- endpoints -------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        if self.ready.is_set():
            return JSONResponse({"status": "ok"})
        why = self.warm_error or "the model is warming up"
        return JSONResponse({"status": "unavailable", "reason": why}, 503, headers={"Retry-After": "1"})

    async def models(self, request: Request) -> Response:
        entry = {**self.served.describe(), "batching": vars(self.batching), "limits": vars(self.limits)}
        return JSONResponse({"object": "list", "data": [entry]})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def predict(self, request: Request) -> Response:
        self._check_ready()
        body = await read_body(request, self.limits)
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            uploads, fields = multipart_inputs(await parse_form(request, body, self.limits), self.limits)
            raws = [upload_input(name, await upload.read()) for name, upload in uploads]
        elif kind.startswith("application/json") or not kind:
            fields = parse_json(body)
            raws = json_predict_inputs(fields, self.limits)
        else:
            raise bad_request(f"content type {kind!r}: send multipart/form-data (file fields) or application/json")
        if self.served.task is None:
            raise bad_request(f"model {self.served.name} has no task to predict with; ask /v1/embeddings")
        budget, options = predict_options(fields, self.served.predict_options, self.batching.budget,
                                          self.batching.max_batch_tokens)  # fmt: skip
        entries = await self.run(request, "predict", raws, budget, options)
        results = [{key: v for key, v in e.items() if key != "output"} | (e["output"] or {}) for e in entries]
        return JSONResponse({"model": self.served.name, "results": results})

    async def embeddings(self, request: Request) -> Response:
        self._check_ready()
        values = parse_json(await read_body(request, self.limits))
        if values.get("model") not in (None, self.served.name):
            raise ServeError(404, "model-not-found", f"model {values['model']!r} is not served here; this server "
                             f"serves {self.served.name!r}")  # fmt: skip
        raws = embedding_inputs(values, self.limits, self.served.text_encoder is not None)
        if self.served.image_encoder is None and any(raw.text is None for raw in raws):
            raise bad_request(f"model {self.served.name} pools no vectors (its head reads tokens): no image embeddings")
        budget = integer(values, "budget", self.batching.budget, 1, self.batching.max_batch_tokens)
        entries = await self.run(request, "embed", raws, budget, ())
        data = [{"object": "embedding", "index": i, "embedding": e["output"]}
                | ({"error": e["error"]} if e["error"] else {}) for i, e in enumerate(entries)]  # fmt: skip
        tokens = sum(e["tokens"] for e in entries)
        return JSONResponse({"object": "list", "data": data, "model": self.served.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip

    # -- work ------------------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if not self.ready.is_set():
            raise ServeError(503, "not-ready", self.warm_error or "the model is warming up", {"Retry-After": "1"})

    async def run(self, request: Request, kind: str, raws: list[RawInput], budget: int | None,
                  options: tuple[tuple[str, Any], ...]) -> list[dict[str, Any]]:  # fmt: skip
        """Each input's ``{"input", "tokens", "error", "output"}``, once its forward has run."""
        prepared = await anyio.to_thread.run_sync(self.prepare, raws, budget)
        ticket = Ticket(asyncio.get_running_loop())
        items: dict[int, WorkItem] = {}
        for i, (raw, (payload, source, tokens)) in enumerate(zip(raws, prepared)):
            if raw.error is None:
                future = ticket.loop.create_future()
                items[i] = WorkItem("text" if raw.text is not None else kind, options, payload, source, tokens,
                                    ticket, future)  # fmt: skip
        self.metrics.errors.labels("undecodable").inc(len(raws) - len(items))
        outcomes = await self.wait(request, ticket, list(items.values())) if items else []
        done = dict(zip(items, outcomes))
        entries = []
        for i, raw in enumerate(raws):
            outcome = done.get(i)
            if isinstance(outcome, BaseException):
                logger.error("navit serve: a forward failed: %s", outcome)
                raw.error = f"the forward failed: {outcome}"
            ok = raw.error is None
            entries.append({"input": raw.name, "tokens": items[i].tokens if ok else 0, "error": raw.error,
                            "output": outcome if ok else None})  # fmt: skip
        return entries

    def prepare(self, raws: list[RawInput], budget: int | None) -> list[tuple[Any, Any, int]]:
        """(tokens or text, decoded source, token count) per input, in a worker thread; an input
        that cannot be read gets its ``error``. Limits over the whole request raise first."""
        for raw in raws:
            if raw.data is not None and not raw.video:
                check_pixels(raw.data, raw.name, self.limits)
        out: list[tuple[Any, Any, int]] = []
        for raw in raws:
            if raw.error is not None:
                out.append((None, None, 0))
            elif raw.text is not None:
                out.append((raw.text, raw.text, self.served.text_tokens(raw.text)))
            else:
                try:
                    source = open_clip(raw, self.limits) if raw.video else decode_image(raw.data, raw.name)
                    example = self.served.to_example(source, budget, raw.name)
                    out.append((example, source, example.num_tokens))
                except ServeError:
                    raise
                except Exception as error:  # this input only
                    raw.error = str(error)
                    out.append((None, None, 0))
        return out

    async def wait(self, request: Request, ticket: Ticket, items: list[WorkItem]) -> list[Any]:
        """The items' results (or exceptions), in order; a client that goes away meanwhile has its
        queued items dropped."""
        self.batcher.submit(items)
        gathered = asyncio.gather(*(item.future for item in items), return_exceptions=True)
        watch = asyncio.ensure_future(request.receive())  # answers http.disconnect when the client leaves
        try:
            while True:
                waiting = {gathered} if watch.done() else {gathered, watch}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if gathered in done:
                    return gathered.result()
                if watch.result().get("type") == "http.disconnect":
                    self.batcher.cancel(ticket)
                    gathered.cancel()
                    raise ServeError(499, "disconnected", "the client went away")
        finally:
            watch.cancel()


def open_clip(raw: RawInput, limits: ServeLimits) -> Any:
    """A video input as a clip (decoded lazily), checked against the pixel and frame limits."""
    from navit.media.video import VideoFile

    clip = VideoFile(raw.data, name=raw.name)
    info = clip.info()
    if info.width * info.height > limits.max_pixels:
        raise too_large("max-pixels", f"{raw.name}'s frames are {info.width}x{info.height} pixels")
    frames = round(info.duration * info.fps) if info.duration and info.fps else 0
    if frames > limits.max_frames:
        raise too_large("max-frames", f"{raw.name} has {frames} frames")
    return clip


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, or a 413 as soon as it passes ``max_body_mb`` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large("max-body-mb", f"the body is {declared} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_large("max-body-mb", f"the body is over {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes, limits: ServeLimits) -> Any:
    """The multipart form of a body already read (and size-checked)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=limits.max_images + 1, max_fields=64)
    except HTTPException as error:
        if "files" in str(error.detail).lower():
            raise too_large("max-images", f"the form holds more than {limits.max_images} files") from None
        raise bad_request(f"the multipart body cannot be read: {error.detail}") from None


def create_app(service: Service) -> Starlette:
    """The ASGI app of ``service``: its endpoints with JSON errors and per-endpoint metrics."""

    def route(path: str, name: str, handler: Callable[[Request], Awaitable[Response]], method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except ServeError as error:
                service.metrics.errors.labels(error.cause).inc()
                response = JSONResponse(error.body(), error.status, headers=error.headers)
            except Exception as error:
                logger.exception("navit serve: %s failed", path)
                service.metrics.errors.labels("internal").inc()
                response = JSONResponse({"error": {"message": f"internal error: {error}", "type": "internal",
                                                   "status": 500}}, 500)  # fmt: skip
            service.metrics.requests.labels(name, str(response.status_code)).inc()
            service.metrics.latency.labels(name).observe(time.perf_counter() - start)
            return response

        return Route(path, endpoint, methods=[method])

    async def http_error(request: Request, error: HTTPException) -> Response:
        body = {"error": {"message": str(error.detail), "type": "http", "status": error.status_code}}
        return JSONResponse(body, error.status_code, headers=getattr(error, "headers", None))

    routes = [
        route("/healthz", "healthz", service.healthz, "GET"),
        route("/v1/models", "models", service.models, "GET"),
        route("/v1/predict", "predict", service.predict, "POST"),
        route("/v1/embeddings", "embeddings", service.embeddings, "POST"),
        route("/metrics", "metrics", service.metrics_text, "GET"),
    ]
    return Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: http_error})
