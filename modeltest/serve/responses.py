"""Answering an admitted request: each of its choices is one engine request (`RequestRun`: reads
its token events, builds its text, aborts it in the engine when the client goes away);
`respond` gathers the choices into one JSON body or interleaves them in one SSE stream, in the
endpoint's shape (shapes.py). Metrics and the access-log line are per HTTP request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, List, Optional

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.request import Request, RequestStatus
from .detokenize import Detokenizer
from .engine_loop import EngineLoop, TokenEvent
from .metrics import ServerMetrics
from .protocol import GenerationRequest, error_body
from .shapes import Piece, Shape

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


class ChoiceFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Disconnected(Exception):
    """The client went away: every choice is aborted."""


class RequestRun:
    """One choice: one engine request, its events, its text."""

    def __init__(
        self,
        ctx: ServingContext,
        engine_req: Request,
        req: GenerationRequest,
        events: asyncio.Queue,
        http: HTTPRequest,
        arrival: float,
        prompt: int = 0,
        prompt_text: Optional[str] = None,
    ):
        # prompt: which of the request's prompts it answers (completions take several);
        # prompt_text: that prompt, echoed before the answer (completions' echo)
        self.ctx, self.engine_req, self.req, self.events, self.http = ctx, engine_req, req, events, http
        self.arrival, self.prompt, self.prompt_text = arrival, prompt, prompt_text
        self.prompt_tokens = len(engine_req.input_ids)
        self.text = Detokenizer(ctx.tokenizer, req.stop, engine_req.params.stop_token_ids or (), req.ignore_eos)
        self.scoring_only = req.max_tokens == 0  # the one token the engine made is not part of the answer
        self.done = False
        self.logprobs: list = []  # per generated token, from the engine (requests with logprobs)
        self.logprobs_sent = 0
        self.first_token_at: Optional[float] = None

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
            if ev.done:
                self.done = True
            return ev

    def abort(self) -> None:
        if not self.done:
            self.ctx.loop.abort(self.engine_req.id)
            self.done = True

    def echo(self) -> Optional[Piece]:
        """The prompt as the answer's beginning (completions' echo): its text, and with logprobs
        its tokens and their logprobs (the first has none). Read after the first event: the
        engine has scored the whole prompt by then."""
        if self.prompt_text is None:
            return None
        ids = self.engine_req.input_ids if self.req.logprobs is not None else []
        lps = ([None] + list(self.engine_req.prompt_logprobs))[: len(ids)]
        return Piece(self.prompt_text, list(ids), lps)

    def _new_tokens(self) -> Piece:
        """The answer's tokens not sent yet with their logprobs (none: logprobs not asked for)."""
        if self.req.logprobs is None:
            return Piece()
        n = self.text.kept_tokens()
        piece = Piece("", self.text.ids[self.logprobs_sent : n], self.logprobs[self.logprobs_sent : n])
        self.logprobs_sent = max(self.logprobs_sent, n)
        return piece

    def _take(self, ev: TokenEvent) -> Piece:
        """Text delta of an event; a stop string found ends the request in the engine."""
        if self.text.stopped_by_string or self.scoring_only:
            return Piece()
        self.logprobs += ev.logprobs or []
        delta = self.text.add(ev.token_ids)
        if self.text.stopped_by_string and not ev.done:
            self.ctx.loop.abort(self.engine_req.id)
        return Piece(delta) + self._new_tokens()

    def _end(self, ev: TokenEvent) -> Piece:
        piece = self._take(ev)
        if self.scoring_only:
            return Piece(finish_reason="length")
        piece.text += self.text.finish()
        piece = piece + self._new_tokens()
        piece.finish_reason = self.text.finish_reason(ev.status, self.engine_req.max_new_tokens)
        return piece

    @property
    def completion_tokens(self) -> int:
        return 0 if self.scoring_only else len(self.text.ids)

    async def pieces(self) -> AsyncIterator[Piece]:
        """The choice's answer as it comes, ending with a piece that has its finish_reason.
        Raises ChoiceFailed (the engine failed it) or Disconnected."""
        while True:
            ev = await self.next_event()
            if ev is None:
                raise Disconnected()
            if ev.done and ev.status is RequestStatus.FAILED:
                raise ChoiceFailed(503 if self.ctx.loop.state == "dead" else 400, ev.error or "the request failed")
            if ev.done:
                yield self._end(ev)
                return
            piece = self._take(ev)
            if not piece.empty:
                yield piece


class Report:
    """A request's metrics and access-log line, once, whatever its choices did."""

    def __init__(self, ctx: ServingContext, runs: List[RequestRun], path: str, arrival: float, rid: str):
        self.ctx, self.runs, self.path, self.arrival, self.rid = ctx, runs, path, arrival, rid
        self.reported = False

    def tokens(self):
        """(prompt tokens — each prompt once, however many choices share it —, completion tokens)."""
        prompts = {run.prompt: run.prompt_tokens for run in self.runs}
        return sum(prompts.values()), sum(run.completion_tokens for run in self.runs)

    def done(self, status: int) -> None:
        if self.reported:
            return
        self.reported = True
        m, seconds = self.ctx.metrics, time.perf_counter() - self.arrival
        m.requests.labels(code=str(status)).inc()
        prompt, completion = self.tokens()
        m.generation_tokens.inc(completion)
        firsts = [run.first_token_at for run in self.runs if run.first_token_at is not None]
        if firsts:
            m.ttft.observe(max(0.0, min(firsts) - self.arrival))
        if status == 200:
            m.prompt_tokens.inc(prompt)
            m.latency.observe(seconds)
            access_log("POST", self.path, status, seconds, self.rid, prompt, completion)
        else:
            access_log("POST", self.path, status, seconds, self.rid)

    def abort_all(self) -> None:
        for run in self.runs:
            run.abort()


async def respond(
    ctx: ServingContext,
    shape: Shape,
    runs: List[RequestRun],
    req: GenerationRequest,
    rid: str,
    path: str,
    arrival: float,
):
    """The answer to a request whose choices are `runs`: a JSON body, or an SSE stream (the
    choices interleaved as their tokens come). A choice that fails fails the request (the others
    are aborted): before the first token, with its HTTP status; mid-stream, with an error event."""
    report = Report(ctx, runs, path, arrival, rid)
    streams = [run.pieces() for run in runs]
    try:
        if not req.stream:
            totals = await asyncio.gather(*(collect(s) for s in streams))
            choices = [shape.choice(i, piece, run.echo()) for i, (run, piece) in enumerate(zip(runs, totals))]
            report.done(200)
            return shape.body(rid, ctx.model_name, ctx.fingerprint, choices, report.tokens())
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))
    except Disconnected:
        report.done(499)
        return Response(status_code=499)
    except ChoiceFailed as e:
        report.done(e.status)
        return error_response(e.status, e.message)
    finally:
        if not req.stream:
            report.abort_all()
    return StreamingResponse(
        stream(ctx, shape, runs, streams, firsts, req, rid, report),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def collect(pieces: AsyncIterator[Piece]) -> Piece:
    total = Piece()
    async for p in pieces:
        total = total + p
    return total


async def stream(ctx, shape: Shape, runs, streams, firsts, req: GenerationRequest, rid: str, report: "Report"):
    created = int(time.time())

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chunk(choices, tokens=None) -> str:
        return sse(shape.chunk(rid, ctx.model_name, created, ctx.fingerprint, choices, tokens))

    merged = interleave(streams, firsts)
    try:

        def tokens(run: RequestRun):  # usage in every chunk (continuous_usage_stats)
            return (run.prompt_tokens, run.completion_tokens) if req.continuous_usage else None

        for i, run in enumerate(runs):
            for choice in shape.opening(i, run.echo()):
                yield chunk([choice], tokens(run))
        async for i, piece in merged:
            if isinstance(piece, ChoiceFailed):
                yield sse(error_body(500, piece.message))
                report.done(500)
                return
            for choice in shape.chunk_choices(i, piece):  # a chunk each: clients read choices[0]
                yield chunk([choice], tokens(runs[i]))
        report.done(200)
        if req.include_usage:
            yield chunk([], report.tokens())
        yield "data: [DONE]\n\n"
    except Disconnected:
        report.done(499)
    finally:
        # the client went away mid-stream (this generator cancelled), or the stream ended: abort
        # what still runs and report the request once, before anything here can be interrupted
        report.abort_all()
        report.done(499)  # (a no-op when it was reported)
        await merged.aclose()


async def interleave(streams: List[AsyncIterator[Piece]], firsts: List[Piece]):
    """(choice index, piece) from every stream as they come, each stream's first piece first;
    a failed choice comes as its ChoiceFailed, after which nothing more is read."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[Piece]) -> None:
        try:
            async for p in s:
                await queue.put((i, p))
            await queue.put((i, None))
        except (ChoiceFailed, Disconnected) as e:
            await queue.put((i, e))

    for i, p in enumerate(firsts):
        queue.put_nowait((i, p))
    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams) if firsts[i].finish_reason is None]
    left = len(tasks)
    try:
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Disconnected):
                raise item
            else:
                yield i, item
                if isinstance(item, ChoiceFailed):
                    return
        while not queue.empty():  # first pieces of choices that ended with them
            i, item = queue.get_nowait()
            if item is not None:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
