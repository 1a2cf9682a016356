"""The HTTP side: a FastAPI app (run by uvicorn) in front of the engine loop. Thin routes:

    POST /v1/chat/completions   text, images, a video; greedy or sampled; JSON or SSE stream
    GET  /v1/models             the served model (clients read data[0].id)
    GET  /v1/models/{id}        that model, or 404
    GET  /health                200 when serving; 503 while loading, draining, or with a dead engine
    GET  /metrics               Prometheus text

A request is parsed on the event loop (cheap: protocol.py), preprocessed in a worker thread
(preprocess.py: media decoding and the chat template never block the loop, so /health answers
while a video decodes), then submitted to the engine thread; its tokens come back through an
asyncio queue to its RequestRun (responses.py). A client that disconnects has its request aborted,
which frees its KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.config import checkpoint_stop_ids
from ..engine.request import RequestStatus, SamplingParams
from ..errors import first_line
from ..inputs import engine_request
from .config import ServeConfig
from .engine_loop import EngineLoop
from .metrics import ServerMetrics
from .preprocess import Preprocessor
from .protocol import ChatRequest, RequestError, SamplingDefaults, model_card, models_body, parse_chat_request
from .responses import RequestRun, ServingContext, access_log, complete_choices, error_response


@dataclass
class ServerState:
    draining: bool = False


async def parse_body(http: HTTPRequest) -> ChatRequest:
    ctype = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got '{ctype or 'none'}'")
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({first_line(e, 120, with_type=False)})") from None
    return parse_chat_request(body)


def fingerprint(cfg: ServeConfig, data_type: str) -> str:
    """system_fingerprint: what computes the answers — a change of any part may change them."""
    return f"modeltest-{__version__}-{data_type}-{cfg.model_name}"


def create_app(
    cfg: ServeConfig, loop: EngineLoop, pre: Preprocessor, metrics: ServerMetrics, state: ServerState, data_type: str
) -> FastAPI:
    app = FastAPI(title="modeltest serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: HTTPRequest, exc: StarletteHTTPException):
        # 404 / 405 and the like in OpenAI's shape, as every other error
        what = {404: f"no route {http.method} {http.url.path}", 405: f"{http.method} is not allowed on {http.url.path}"}
        access_log(http.method, http.url.path, exc.status_code, 0.0)
        return error_response(exc.status_code, what.get(exc.status_code, str(exc.detail)), code=str(exc.status_code))

    pool = ThreadPoolExecutor(max_workers=cfg.preprocess_workers, thread_name_prefix="preprocess")
    defaults = SamplingDefaults.from_model(cfg.model_path)
    stop_ids = checkpoint_stop_ids(cfg.model_path)
    ctx = ServingContext(
        loop=loop,
        metrics=metrics,
        tokenizer=pre.tokenizer,
        model_name=cfg.model_name,
        fingerprint=fingerprint(cfg, data_type),
    )

    @app.get("/health")
    async def health():
        if loop.state == "dead" or (loop.state != "loading" and not loop.alive):
            return JSONResponse({"status": "dead", "error": loop.error}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if loop.state == "loading":
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": cfg.model_name}

    @app.get("/v1/models")
    async def models():
        return models_body(cfg.model_name, cfg.max_input_length + cfg.max_output_length, cfg.model_path)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.model_name:
            return error_response(
                404,
                f"model '{model_id}' does not exist; this server serves '{cfg.model_name}'",
                "model",
                "model_not_found",
            )
        return model_card(cfg.model_name, cfg.max_input_length + cfg.max_output_length, cfg.model_path)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(loop.snapshot), media_type="text/plain; version=0.0.4; charset=utf-8")

    def check_serving(req: ChatRequest) -> None:
        if req.model is not None and req.model != cfg.model_name:
            raise RequestError(
                404,
                f"model '{req.model}' does not exist; this server serves '{cfg.model_name}' (GET /v1/models)",
                "model",
            )
        if state.draining or loop.state != "ready" or not loop.alive:
            why = (
                "is shutting down"
                if state.draining
                else (
                    "is still loading the model" if loop.state == "loading" else f"has no working engine ({loop.error})"
                )
            )
            raise RequestError(503, f"the server {why}; retry later")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        arrival = time.perf_counter()
        try:
            req = await parse_body(http)
            check_serving(req)
            params = SamplingParams(**req.sampling(defaults, cfg.max_output_length), stop_token_ids=stop_ids)
            model_input = await asyncio.get_running_loop().run_in_executor(pool, pre, req)
        except RequestError as e:
            metrics.requests.labels(code=str(e.status)).inc()
            access_log("POST", http.url.path, e.status, time.perf_counter() - arrival)
            return error_response(e.status, e.message, e.param, e.code)
        except Exception as e:  # a bug must cost one request, not the server
            metrics.requests.labels(code="500").inc()
            access_log("POST", http.url.path, 500, time.perf_counter() - arrival)
            return error_response(500, f"preprocessing failed: {first_line(e)}")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        aloop = asyncio.get_running_loop()

        def start(choice: int) -> RequestRun:
            p = params if choice == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + choice)
            engine_req = engine_request(rid if req.n == 1 else f"{rid}-{choice}", model_input, p)
            events: asyncio.Queue = asyncio.Queue()
            loop.submit(engine_req, lambda ev: aloop.call_soon_threadsafe(events.put_nowait, ev))
            return RequestRun(ctx, engine_req, req, model_input, events, http, arrival, report=req.n == 1)

        if req.n > 1:
            return await complete_choices(ctx, [start(i) for i in range(req.n)], rid, http.url.path, arrival)
        run = start(0)
        if not req.stream:
            return await run.complete()
        first = await run.next_event()
        if first is None:  # the client left before the first token
            run.log(499, 0)
            return Response(status_code=499)
        if first.done and first.status is RequestStatus.FAILED:
            return run.failed(first)
        return StreamingResponse(
            run.stream(first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    app.state.pool = pool
    return app
