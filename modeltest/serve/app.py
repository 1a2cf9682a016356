"""The HTTP side: a FastAPI app (run by uvicorn) in front of the engine loop.

    POST /v1/chat/completions   text, images, a video; greedy or sampled; JSON or SSE stream
    GET  /v1/models             the served model (clients read data[0].id)
    GET  /health                200 when serving; 503 while loading, draining, or with a dead engine
    GET  /metrics               Prometheus text

A request is parsed on the event loop (cheap), preprocessed in a worker thread (media decoding
and the chat template never block the loop: /health answers while a video decodes), then
submitted to the engine thread; its tokens come back through an asyncio queue. A client that
disconnects has its request aborted, which frees its KV blocks at the engine's next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.request import STOP_TOKEN_IDS, Request, RequestStatus, SamplingParams
from ..errors import first_line
from .config import ServeConfig
from .engine_loop import EngineLoop, TokenEvent
from .metrics import ServerMetrics
from .preprocess import ModelInput, Preprocessor
from .protocol import (ChatRequest, RequestError, chunk_body, completion_body, error_body, models_body,
                       parse_chat_request, usage_chunk_body)

DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    draining: bool = False


@dataclass
class SamplingDefaults:
    """What a request that names no temperature / top_p / top_k gets: the model's
    generation_config.json where it has one (as vLLM does), else OpenAI's defaults."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_model(cls, model_path: str) -> "SamplingDefaults":
        from pathlib import Path
        try:
            g = json.loads((Path(model_path) / "generation_config.json").read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(g, dict):
            return cls()
        if g.get("do_sample") is False:
            return cls(temperature=0.0)
        return cls(temperature=float(g.get("temperature", 1.0)), top_p=float(g.get("top_p", 1.0)),
                   top_k=int(g.get("top_k") or 0))


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class TextAssembler:
    """Token ids -> text for one request: the stop token left out (as in-process runs decode),
    `stop` strings cut, and in streaming only text that can no longer change is emitted (an
    incomplete UTF-8 character or a possible start of a stop string is held back).

    Decoding is incremental (each step decodes its new tokens with the few before them, as vLLM
    does), so a long answer costs the event loop linear, not quadratic, work; the final text is
    one full decode, exactly what the in-process engine returns."""

    def __init__(self, tokenizer, stop: List[str], ignore_eos: bool):
        self.tokenizer, self.stop, self.ignore_eos = tokenizer, stop, ignore_eos
        self.ids: List[int] = []
        self.sent = ""
        self.stopped_by_string = False
        self._text = ""
        self._decoded = ""          # text of the visible ids[:_read]
        self._prefix = self._read = 0
        self._longest_stop = max((len(s) for s in stop), default=0)

    def _visible(self) -> List[int]:
        if self.ids and not self.ignore_eos and self.ids[-1] in STOP_TOKEN_IDS:
            return self.ids[:-1]
        return self.ids

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _decode_new(self) -> None:
        ids = self._visible()
        before = self._decode(ids[self._prefix:self._read])
        now = self._decode(ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):   # a whole new character
            self._decoded += now[len(before):]
            self._prefix, self._read = self._read, len(ids)

    def _cut_at_stop(self, text: str, start: int) -> str:
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped_by_string = True
            return text[:cut]
        return text

    def add(self, token_ids: List[int]) -> str:
        """Take new tokens; return the text delta safe to send now."""
        self.ids += token_ids
        searched = max(0, len(self._decoded) - self._longest_stop + 1)
        self._decode_new()
        text = self._text = self._cut_at_stop(self._decoded, searched)
        if self.stopped_by_string:
            return self._delta(text)
        safe = text[: len(text) - (self._longest_stop - 1)] if self._longest_stop > 1 else text
        return self._delta(safe)

    def finish(self) -> str:
        """The rest of the text once the request has ended (the final text: one full decode)."""
        if not self.stopped_by_string:
            self._text = self._cut_at_stop(self._decode(self._visible()), 0)
        return self._delta(self._text)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def text(self) -> str:
        return self._text

    def finish_reason(self, status: RequestStatus, max_tokens: int) -> str:
        if self.stopped_by_string:
            return "stop"
        if status is RequestStatus.ABORTED:
            return "abort"
        if not self.ignore_eos and self.ids and self.ids[-1] in STOP_TOKEN_IDS:
            return "stop"
        return "length" if len(self.ids) >= max_tokens else "stop"


def create_app(cfg: ServeConfig, loop: EngineLoop, pre: Preprocessor, metrics: ServerMetrics,
               state: ServerState) -> FastAPI:
    app = FastAPI(title="modeltest serve", docs_url=None, redoc_url=None, openapi_url=None)
    pool = ThreadPoolExecutor(max_workers=cfg.preprocess_workers, thread_name_prefix="preprocess")
    defaults = SamplingDefaults.from_model(cfg.model_path)
    model_name = cfg.model_name

    @app.get("/health")
    async def health():
        if loop.state == "dead" or (loop.state != "loading" and not loop.alive):
            return JSONResponse({"status": "dead", "error": loop.error}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if loop.state == "loading":
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return models_body(model_name, cfg.max_input_length + cfg.max_output_length, cfg.model_path)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(loop.snapshot), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        arrival = time.perf_counter()
        try:
            req = await _parse(http)
            if req.model is not None and req.model != model_name:
                raise RequestError(404, f"model '{req.model}' does not exist; this server serves '{model_name}' "
                                        "(GET /v1/models)", "model")
            if state.draining or loop.state != "ready" or not loop.alive:
                why = "is shutting down" if state.draining else ("is still loading the model" if loop.state == "loading"
                                                                  else f"has no working engine ({loop.error})")
                raise RequestError(503, f"the server {why}; retry later")
            engine_req = _engine_request(req)
            model_input = await asyncio.get_running_loop().run_in_executor(pool, pre, req)
        except RequestError as e:
            metrics.requests.labels(code=str(e.status)).inc()
            return error_response(e.status, e.message, e.param, e.code)
        except Exception as e:   # a bug must cost one request, not the server
            metrics.requests.labels(code="500").inc()
            return error_response(500, f"preprocessing failed: {first_line(e)}")
        _attach(engine_req, model_input)
        events: asyncio.Queue = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        loop.submit(engine_req, lambda ev: aloop.call_soon_threadsafe(events.put_nowait, ev))
        handler = _Run(engine_req, req, model_input, events, http, arrival)
        if req.stream:
            first = await handler.next_event()
            if first is None:       # the client left before the first token
                return Response(status_code=499)
            if first.done and first.status is RequestStatus.FAILED:
                return handler.failed(first)
            return StreamingResponse(handler.stream(first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await handler.complete()

    async def _parse(http: HTTPRequest) -> ChatRequest:
        ctype = http.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(415, f"Content-Type must be application/json, got '{ctype or 'none'}'")
        raw = await http.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON ({first_line(e, 120, with_type=False)})") from None
        return parse_chat_request(body)

    def _engine_request(req: ChatRequest) -> Request:
        max_tokens = req.max_tokens if req.max_tokens is not None else cfg.max_output_length
        if max_tokens > cfg.max_output_length:
            raise RequestError(400, f"max_tokens {max_tokens} is over this server's max_output_length "
                                    f"{cfg.max_output_length}", "max_tokens")
        temperature = defaults.temperature if req.temperature is None else req.temperature
        top_p = defaults.top_p if req.top_p is None else req.top_p
        top_k = defaults.top_k if req.top_k is None else max(req.top_k, 0)
        if top_p <= 0:
            raise RequestError(400, "'top_p' must be above 0", "top_p")
        seed = req.seed if req.seed is not None else (secrets.randbits(62) if temperature > 0 else None)
        params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=req.ignore_eos, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed)
        return Request(id=f"chatcmpl-{uuid.uuid4().hex}", input_ids=[], params=params)

    def _attach(engine_req: Request, mi: ModelInput) -> None:
        inp = mi.inputs
        engine_req.input_ids = inp["input_ids"][0].tolist()
        engine_req.pixel_values, engine_req.image_grid_thw = inp.get("pixel_values"), inp.get("image_grid_thw")
        engine_req.pixel_values_videos = inp.get("pixel_values_videos")
        engine_req.video_grid_thw = inp.get("video_grid_thw")

    class _Run:
        """One admitted request: reads its events, builds its text, answers its client."""

        def __init__(self, engine_req: Request, req: ChatRequest, mi: ModelInput, events: asyncio.Queue,
                     http: HTTPRequest, arrival: float):
            self.engine_req, self.req, self.events, self.http, self.arrival = engine_req, req, events, http, arrival
            self.prompt_tokens = mi.prompt_tokens
            self.text = TextAssembler(pre.tokenizer, req.stop, req.ignore_eos)
            self.done = False
            self.first_token_at: Optional[float] = None
            self.created = int(time.time())

        async def next_event(self) -> Optional[TokenEvent]:
            """The next event, or None if the client disconnected (the request is then aborted)."""
            while True:
                try:
                    ev = await asyncio.wait_for(self.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await self.http.is_disconnected():
                        self.abort()
                        return None
                    continue
                if ev.token_ids and self.first_token_at is None:
                    self.first_token_at = ev.time
                    metrics.ttft.observe(max(0.0, ev.time - self.arrival))
                if ev.done:
                    self.done = True
                return ev

        def abort(self) -> None:
            if not self.done:
                loop.abort(self.engine_req.id)
                self.done = True

        def take(self, ev: TokenEvent) -> str:
            """Text delta of an event; a stop string found ends the request in the engine."""
            if self.text.stopped_by_string:
                return ""
            delta = self.text.add(ev.token_ids)
            if self.text.stopped_by_string and not ev.done:
                loop.abort(self.engine_req.id)
            return delta

        def failed(self, ev: TokenEvent) -> JSONResponse:
            status = 503 if loop.state == "dead" else 400
            metrics.requests.labels(code=str(status)).inc()
            return error_response(status, ev.error or "the request failed")

        def finished(self, status: RequestStatus):
            completion = len(self.text.ids)
            metrics.requests.labels(code="200").inc()
            metrics.prompt_tokens.inc(self.prompt_tokens)
            metrics.generation_tokens.inc(completion)
            metrics.latency.observe(time.perf_counter() - self.arrival)
            return self.text.finish_reason(status, self.engine_req.max_new_tokens), completion

        async def complete(self):
            try:
                return await self._complete()
            finally:
                self.abort()      # cancelled while waiting (or already done: a no-op)

        async def _complete(self):
            while True:
                ev = await self.next_event()
                if ev is None:
                    return Response(status_code=499)
                self.take(ev)
                if ev.done:
                    if ev.status is RequestStatus.FAILED:
                        return self.failed(ev)
                    self.text.finish()
                    reason, completion = self.finished(ev.status)
                    return completion_body(self.engine_req.id, model_name, self.text.text, reason,
                                           self.prompt_tokens, completion)

        async def stream(self, first: TokenEvent) -> AsyncIterator[str]:
            rid = self.engine_req.id

            def sse(obj) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
            try:
                yield sse(chunk_body(rid, model_name, self.created, {"role": "assistant", "content": ""}))
                ev = first
                while True:
                    delta = self.take(ev)
                    if ev.done:
                        if ev.status is RequestStatus.FAILED:
                            yield sse(error_body(500, ev.error or "the request failed"))
                            metrics.requests.labels(code="500").inc()
                            break
                        delta += self.text.finish()
                        if delta:
                            yield sse(chunk_body(rid, model_name, self.created, {"content": delta}))
                        reason, completion = self.finished(ev.status)
                        yield sse(chunk_body(rid, model_name, self.created, {}, reason))
                        if self.req.include_usage:
                            yield sse(usage_chunk_body(rid, model_name, self.created, self.prompt_tokens, completion))
                        break
                    if delta:
                        yield sse(chunk_body(rid, model_name, self.created, {"content": delta}))
                    ev = await self.next_event()
                    if ev is None:
                        return
                yield "data: [DONE]\n\n"
            finally:
                self.abort()      # the client went away mid-stream (or the stream ended: a no-op)

    app.state.pool = pool
    return app


class Gatekeeper:
    """ASGI middleware in front of the app: the API key (every path but /health) and the body
    size limit (413, checked on Content-Length and again while reading), both answered in the
    OpenAI error shape before the app sees the request."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") != "/health":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                why = "a wrong API key" if token else "no API key (send 'Authorization: Bearer KEY')"
                return await _send_error(send, 401, f"unauthorized: {why}")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                declared = int(headers.get("content-length", "0") or 0)
            except ValueError:
                declared = 0
            if declared > self.limit:
                return await _send_error(send, 413, self._too_large(declared))
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.limit:
                    return await _send_error(send, 413, self._too_large(len(body)))
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()
            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    def _too_large(self, size: int) -> str:
        return (f"the request body is {size} bytes, over this server's limit of {self.limit} "
                "(--max-body-mb); send media as file URLs or raise the limit")


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message, code={401: "invalid_api_key", 413: "request_too_large"}.get(status)))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body.encode()})
