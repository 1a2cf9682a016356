"""The HTTP side: a FastAPI app (run by uvicorn) in front of the engine loop. Thin routes:

    POST /v1/chat/completions   text, images, a video; greedy or sampled; JSON or SSE stream
    POST /v1/completions        raw text or token ids (no template, no media); echo and prompt
                                logprobs for log-likelihood scoring; JSON or SSE stream
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
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.config import checkpoint_stop_ids
from ..engine.request import Request, SamplingParams
from ..errors import first_line
from ..inputs import engine_request
from .chat_protocol import parse_chat_request
from .config import ServeConfig
from .engine_loop import EngineLoop
from .metrics import ServerMetrics
from .preprocess import Preprocessor
from .protocol import GenerationRequest, RequestError, SamplingDefaults, model_card, models_body
from .responses import RequestRun, ServingContext, access_log, error_response, respond
from .shapes import ChatShape, TextShape
from .text_protocol import parse_completion_request


@dataclass
class ServerState:
    draining: bool = False


async def json_body(http: HTTPRequest) -> Any:
    ctype = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got '{ctype or 'none'}'")
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({first_line(e, 120, with_type=False)})") from None
    return body


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

    def check_serving(req: GenerationRequest) -> None:
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

    def refused(e: RequestError, path: str, arrival: float):
        metrics.requests.labels(code=str(e.status)).inc()
        access_log("POST", path, e.status, time.perf_counter() - arrival)
        return error_response(e.status, e.message, e.param, e.code)

    def broken(e: Exception, path: str, arrival: float):  # a bug must cost one request, not the server
        metrics.requests.labels(code="500").inc()
        access_log("POST", path, 500, time.perf_counter() - arrival)
        return error_response(500, f"preprocessing failed: {first_line(e)}")

    def start(
        req: GenerationRequest, rid: str, choice: int, engine_req: Request, http: HTTPRequest, arrival: float, **kw
    ) -> RequestRun:
        """Submit one choice to the engine; choice i of a sampled request draws with seed + i."""
        if choice and engine_req.params.seed is not None:
            engine_req.params = dataclasses.replace(engine_req.params, seed=engine_req.params.seed + choice)
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        loop.submit(engine_req, lambda ev: aloop.call_soon_threadsafe(events.put_nowait, ev))
        return RequestRun(ctx, engine_req, req, events, http, arrival, **kw)

    async def admit(http: HTTPRequest, parse, prepare):
        """Parse, check and preprocess (in a worker thread) a request: ((request, its sampling
        parameters, what `prepare` made of it, arrival time), None), or (None, the error answer)."""
        arrival = time.perf_counter()
        try:
            req = parse(await json_body(http))
            check_serving(req)
            params = SamplingParams(**req.sampling(defaults, cfg.max_output_length), stop_token_ids=stop_ids)
            prepared = await asyncio.get_running_loop().run_in_executor(pool, prepare, req)
        except RequestError as e:
            return None, refused(e, http.url.path, arrival)
        except Exception as e:
            return None, broken(e, http.url.path, arrival)
        return (req, params, prepared, arrival), None

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        admitted, error = await admit(http, parse_chat_request, pre)
        if error is not None:
            return error
        req, params, model_input, arrival = admitted
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        runs = [
            start(req, rid, i, engine_request(f"{rid}-{i}", model_input, dataclasses.replace(params)), http, arrival)
            for i in range(req.n)
        ]
        shape = ChatShape(ctx.tokenizer, req.logprobs is not None, req.tools)
        return await respond(ctx, shape, runs, req, rid, http.url.path, arrival)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        admitted, error = await admit(http, parse_completion_request, pre.text_prompts)
        if error is not None:
            return error
        req, params, prompts, arrival = admitted
        rid = f"cmpl-{uuid.uuid4().hex}"
        runs = []
        for k, (ids, text) in enumerate(prompts):
            for i in range(req.n):
                er = Request(
                    id=f"{rid}-{k}-{i}", input_ids=list(ids), params=dataclasses.replace(params), media_keys=[]
                )
                runs.append(start(req, rid, i, er, http, arrival, prompt=k, prompt_text=text if req.echo else None))
        shape = TextShape(ctx.tokenizer, req.logprobs is not None)
        return await respond(ctx, shape, runs, req, rid, http.url.path, arrival)

    app.state.pool = pool
    return app
