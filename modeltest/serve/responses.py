"""One admitted request: reads its token events from the engine loop, builds its text, answers
its client (one JSON body, or an SSE stream), and aborts it in the engine when the client goes
away."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, List, Optional

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response

from ..engine.request import Request, RequestStatus
from ..inputs import ModelInput
from .detokenize import Detokenizer
from .engine_loop import EngineLoop, TokenEvent
from .metrics import ServerMetrics
from .protocol import ChatRequest, chunk_body, completion_body, error_body, logprobs_content, usage_chunk_body

DISCONNECT_POLL_S = 0.25


@dataclass
class ServingContext:
    """What every request's answer needs from the server."""

    loop: EngineLoop
    metrics: ServerMetrics
    tokenizer: Any
    model_name: str
    fingerprint: str  # system_fingerprint: what computes the answers (model, dtype, engine version)


ACCESS = logging.getLogger("modeltest.access")


def access_log(method: str, path: str, status: int, seconds: float, rid: str = "-", prompt=None, completion=None):
    """One line per request: method, path, status, tokens, latency, request id — no prompt text."""
    tokens = f" prompt_tokens={prompt} completion_tokens={completion}" if prompt is not None else ""
    ACCESS.info("%s %s %d%s latency=%.3fs id=%s", method, path, status, tokens, seconds, rid)


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class RequestRun:
    """One admitted request: reads its events, builds its text, answers its client."""

    def __init__(
        self,
        ctx: ServingContext,
        engine_req: Request,
        req: ChatRequest,
        mi: ModelInput,
        events: asyncio.Queue,
        http: HTTPRequest,
        arrival: float,
        report: bool = True,
    ):
        # report: count this run in the request metrics and the access log (False for the choices
        # of an n > 1 request, which is reported once, by complete_choices)
        self.report = report
        self.ctx = ctx
        self.engine_req, self.req, self.events, self.http, self.arrival = engine_req, req, events, http, arrival
        self.prompt_tokens = mi.prompt_tokens
        self.text = Detokenizer(ctx.tokenizer, req.stop, engine_req.params.stop_token_ids or (), req.ignore_eos)
        self.done = False
        self.logprobs: list = []  # per generated token, from the engine (requests with logprobs)
        self.logprobs_sent = 0
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
                self.ctx.metrics.ttft.observe(max(0.0, ev.time - self.arrival))
            if ev.done:
                self.done = True
            return ev

    def abort(self) -> None:
        if not self.done:
            self.ctx.loop.abort(self.engine_req.id)
            self.done = True

    def new_logprobs(self) -> Optional[list]:
        """`logprobs.content` entries of the answer's tokens not sent yet (None: not asked for)."""
        if self.req.logprobs is None:
            return None
        n = self.text.kept_tokens()
        entries = logprobs_content(
            self.ctx.tokenizer, self.text.ids[self.logprobs_sent : n], self.logprobs[self.logprobs_sent : n]
        )
        self.logprobs_sent = max(self.logprobs_sent, n)
        return entries

    def take(self, ev: TokenEvent) -> str:
        """Text delta of an event; a stop string found ends the request in the engine."""
        if self.text.stopped_by_string:
            return ""
        self.logprobs += ev.logprobs or []
        delta = self.text.add(ev.token_ids)
        if self.text.stopped_by_string and not ev.done:
            self.ctx.loop.abort(self.engine_req.id)
        return delta

    def log(self, status: int, completion: int) -> None:
        """The request's access-log line (never its text), once it has its answer."""
        if not self.report:
            return
        access_log(
            "POST",
            self.http.url.path,
            status,
            time.perf_counter() - self.arrival,
            self.engine_req.id,
            self.prompt_tokens,
            completion,
        )

    def failed(self, ev: TokenEvent) -> JSONResponse:
        status = 503 if self.ctx.loop.state == "dead" else 400
        if self.report:
            self.ctx.metrics.requests.labels(code=str(status)).inc()
        self.log(status, 0)
        return error_response(status, ev.error or "the request failed")

    def finished(self, status: RequestStatus):
        completion = len(self.text.ids)
        self.ctx.metrics.generation_tokens.inc(completion)
        if self.report:
            self.ctx.metrics.requests.labels(code="200").inc()
            self.ctx.metrics.prompt_tokens.inc(self.prompt_tokens)
            self.ctx.metrics.latency.observe(time.perf_counter() - self.arrival)
        return self.text.finish_reason(status, self.engine_req.max_new_tokens), completion

    async def complete(self):
        try:
            return await self._complete()
        finally:
            self.abort()  # cancelled while waiting (or already done: a no-op)

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
                body = completion_body(
                    self.engine_req.id,
                    self.ctx.model_name,
                    self.text.text,
                    reason,
                    self.prompt_tokens,
                    completion,
                    self.new_logprobs(),
                )
                self.log(200, completion)
                return dict(body, system_fingerprint=self.ctx.fingerprint)

    async def stream(self, first: TokenEvent) -> AsyncIterator[str]:
        rid = self.engine_req.id

        def sse(obj) -> str:
            if "choices" in obj:
                obj["system_fingerprint"] = self.ctx.fingerprint
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(delta, reason=None, logprobs=None):
            tokens = (self.prompt_tokens, len(self.text.ids)) if self.req.continuous_usage else None
            return sse(chunk_body(rid, self.ctx.model_name, self.created, delta, reason, tokens, logprobs))

        try:
            yield chunk({"role": "assistant", "content": ""})
            ev = first
            while True:
                delta = self.take(ev)
                if ev.done:
                    if ev.status is RequestStatus.FAILED:
                        yield sse(error_body(500, ev.error or "the request failed"))
                        self.ctx.metrics.requests.labels(code="500").inc()
                        self.log(500, len(self.text.ids))
                        break
                    delta += self.text.finish()
                    lps = self.new_logprobs()
                    if delta or lps:
                        yield chunk({"content": delta}, logprobs=lps)
                    reason, completion = self.finished(ev.status)
                    yield chunk({}, reason)
                    self.log(200, completion)
                    if self.req.include_usage:
                        yield sse(
                            usage_chunk_body(rid, self.ctx.model_name, self.created, self.prompt_tokens, completion)
                        )
                    break
                lps = self.new_logprobs()
                if delta or lps:
                    yield chunk({"content": delta}, logprobs=lps)
                ev = await self.next_event()
                if ev is None:
                    return
            yield "data: [DONE]\n\n"
        finally:
            self.abort()  # the client went away mid-stream (or the stream ended: a no-op)


async def complete_choices(ctx: ServingContext, runs: List[RequestRun], rid: str, path: str, arrival: float):
    """An n > 1 request: its choices (one engine request each, sharing the prompt's blocks through
    the prefix cache) in one body, index by index; usage counts the prompt once. One failing
    choice fails the request (the others are aborted)."""
    results = await asyncio.gather(*(run.complete() for run in runs))
    failed = next((r for r in results if not isinstance(r, dict)), None)
    if failed is not None:
        for run in runs:
            run.abort()
        status = getattr(failed, "status_code", 500)
        ctx.metrics.requests.labels(code=str(status)).inc()
        access_log("POST", path, status, time.perf_counter() - arrival, rid)
        return failed
    body = dict(results[0], id=rid)
    body["choices"] = [dict(r["choices"][0], index=i) for i, r in enumerate(results)]
    prompt = runs[0].prompt_tokens
    completion = sum(r["usage"]["completion_tokens"] for r in results)
    body["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    ctx.metrics.requests.labels(code="200").inc()
    ctx.metrics.prompt_tokens.inc(prompt)
    ctx.metrics.latency.observe(time.perf_counter() - arrival)
    access_log("POST", path, 200, time.perf_counter() - arrival, rid, prompt, completion)
    return body
