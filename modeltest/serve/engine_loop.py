"""The engine in one thread, fed from the HTTP event loop; the other tensor-parallel ranks follow.

HTTP handlers `submit` requests and `abort` them (a client that disconnects) from the event loop;
the engine thread applies those commands between steps, runs a step, and hands each tracked
request its new tokens through the callback it came with (handlers put them on an asyncio queue
with `call_soon_threadsafe`). No engine state is touched outside this thread: /metrics reads a
snapshot the thread publishes after every step.

Under tensor parallelism rank 0 serves HTTP and runs this loop; every other rank runs `follow`:
rank 0 broadcasts each batch of commands (requests with their preprocessed tensors, aborts, stop)
before applying it, so every rank adds and aborts the same requests before the same step and
meets the others at the same collectives. When idle, rank 0 sends an empty batch every second,
so the followers' blocking receive never reaches the process group's timeout.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..engine.engine import LLMEngine
from ..engine.request import Request, RequestStatus
from ..errors import UserError, first_line

IDLE_HEARTBEAT_S = 1.0


@dataclass
class TokenEvent:
    """New tokens of one request; `done` on its last event, with its final status and error."""

    token_ids: List[int]
    done: bool = False
    logprobs: Optional[list] = None  # per token (requests asking for logprobs): engine Request.output_logprobs
    status: Optional[RequestStatus] = None
    error: Optional[str] = None
    time: float = field(default_factory=time.perf_counter)


Deliver = Callable[[TokenEvent], None]


class Channel:
    """Rank 0 -> every rank: one picklable batch of commands per loop iteration."""

    def __init__(self, tp_group=None):
        self.group = tp_group

    def send(self, cmds: list) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([cmds], src=0, group=self.group)

    def receive(self) -> list:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def apply_commands(engine: LLMEngine, cmds: list) -> bool:
    """Add / abort as told; True when told to stop."""
    for cmd in cmds:
        if cmd[0] == "add":
            engine.add_request(cmd[1])
        elif cmd[0] == "abort":
            engine.abort(cmd[1])
        elif cmd[0] == "stop":
            return True
    return False


def follow(engine: LLMEngine, channel: Channel) -> None:
    """A tensor-parallel rank other than 0: do what rank 0 does, step for step, until told to stop."""
    while True:
        if apply_commands(engine, channel.receive()):
            return
        if engine.has_work():
            engine.step()


class EngineLoop:
    def __init__(
        self,
        build_engine: Callable[[], LLMEngine],
        channel: Optional[Channel] = None,
        on_ready: Optional[Callable[["EngineLoop"], None]] = None,
        on_dead: Optional[Callable[["EngineLoop"], None]] = None,
    ):
        self._build, self._channel, self._on_ready, self._on_dead = build_engine, channel, on_ready, on_dead
        self._cmds: "queue.Queue[tuple]" = queue.Queue()
        self._tracked: Dict[str, Tuple[Request, Deliver, int]] = {}
        self.state = "loading"  # loading -> ready -> stopped; or dead
        self.error: Optional[str] = None
        self.engine: Optional[LLMEngine] = None
        self.snapshot = {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 0}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- from the event loop --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request, deliver: Deliver) -> None:
        self._cmds.put(("add", req, deliver))

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request in the engine (the end of a drain): each gets its final event."""
        self._cmds.put(("abort_all",))

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is still running, stop the followers, end the thread."""
        self._cmds.put(("stop",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.state in ("loading", "ready")

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as e:  # noqa: B036 — a failed load must reach /health, not vanish
            # a UserError is already a sentence for the user; anything else keeps its type name
            self.state, self.error = (
                "dead",
                f"the model failed to load: {first_line(e, with_type=not isinstance(e, UserError))}",
            )
            if self._channel is not None:
                self._send([("stop",)])
            if self._on_dead:
                self._on_dead(self)
            return
        self.state = "ready"
        self._publish_snapshot()
        if self._on_ready:
            self._on_ready(self)
        try:
            while True:
                cmds = self._take(block=not self.engine.has_work())
                stop = any(c[0] == "stop" for c in cmds)
                if stop or any(c[0] == "abort_all" for c in cmds):
                    # abort every request, so its client gets an answer and its blocks are freed
                    cmds = [c for c in cmds if c[0] not in ("stop", "abort_all")] + [
                        ("abort", rid) for rid in self._tracked
                    ]
                self._send([c[:2] for c in cmds] + ([("stop",)] if stop else []))
                for c in cmds:
                    if c[0] == "add":
                        self._tracked[c[1].id] = (c[1], c[2], 0)
                apply_commands(self.engine, [c[:2] for c in cmds])
                if self.engine.has_work() or stop:
                    ended = self.engine.step() if self.engine.has_work() else []
                    self._deliver(ended)
                self._publish_snapshot()
                if stop:
                    self.state = "stopped"
                    return
        except BaseException as e:  # noqa: B036 — a dead engine must fail its requests, not hang them
            self.state, self.error = "dead", f"the engine stopped: {first_line(e)}"
            for _req, deliver, _ in self._tracked.values():
                deliver(TokenEvent([], done=True, status=RequestStatus.FAILED, error=self.error))
            self._tracked.clear()
            if self._on_dead:
                self._on_dead(self)

    def _take(self, block: bool) -> List[tuple]:
        cmds = []
        try:
            cmds.append(self._cmds.get(timeout=IDLE_HEARTBEAT_S) if block else self._cmds.get_nowait())
        except queue.Empty:
            return cmds
        while True:
            try:
                cmds.append(self._cmds.get_nowait())
            except queue.Empty:
                return cmds

    def _send(self, cmds: list) -> None:
        if self._channel is not None:
            self._channel.send(cmds)

    def _deliver(self, ended: List[Request]) -> None:
        ended_ids = {r.id for r in ended}
        for rid, (req, deliver, sent) in list(self._tracked.items()):
            new = req.output_ids[sent:]
            done = rid in ended_ids
            if new or done:
                deliver(
                    TokenEvent(
                        list(new),
                        done=done,
                        status=req.status if done else None,
                        error=req.error if done else None,
                        logprobs=list(req.output_logprobs[sent:]) if req.params.logprobs is not None else None,
                    )
                )
                self._tracked[rid] = (req, deliver, len(req.output_ids))
            if done:
                del self._tracked[rid]

    def _publish_snapshot(self) -> None:
        s = self.engine.stats(timings=False)
        self.snapshot = {
            "running": s.running,
            "waiting": s.waiting,
            "kv_blocks_used": s.num_blocks - s.free_blocks,
            "kv_blocks_free": s.free_blocks,
            "prefix_cache_queries": s.prompt_tokens,
            "prefix_cache_hits": s.cached_prompt_tokens,
            "vision_cache_hits": s.vision_cache_hits,
            "vision_cache_misses": s.vision_cache_misses,
            "preemptions": s.preemptions,
        }
