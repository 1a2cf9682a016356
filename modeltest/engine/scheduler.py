"""Admission and KV-cache blocks: which requests run in the next pass.

Scheduling depends only on the requests (never on time), so every tensor-parallel rank, fed the
same requests, takes the same decisions and meets the others at the same collectives.

A request is admitted when a batch slot is free and the blocks for its prompt plus its
`max_new_tokens` are free, so a running request never waits for memory; it leaves as soon as it
stops, and its blocks go back. Admission is first come, first served: a request that does not fit
yet holds back the ones behind it (no starvation of long prompts).
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass
from typing import Deque, List, Optional

from .kv_cache import BlockAllocator, blocks_needed
from .request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_batch_size: int  # sequences decoding together
    max_input_length: int  # prompt tokens, vision placeholders expanded
    max_output_length: int  # most max_new_tokens a request may ask for
    block_size: int  # tokens per KV cache block
    num_blocks: int  # KV cache blocks (sized by the model runner)
    max_prefill_tokens: int = 16384  # most prompt tokens packed in one prefill (one request always goes)


@dataclass
class ScheduledPass:
    prefill: bool  # True: prefill `requests` (newly admitted); False: decode them
    requests: List[Request]


class Scheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.max_batch_size = cfg.max_batch_size
        self.allocator = BlockAllocator(cfg.num_blocks)
        self.waiting: Deque[Request] = collections.deque()
        self.running: List[Request] = []
        self._ended: List[Request] = []  # failed on arrival or aborted; reported by the next step

    @property
    def capacity_tokens(self) -> int:
        return self.cfg.num_blocks * self.cfg.block_size

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._ended)

    # ---- arrival ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.t_arrival = time.perf_counter()
        if not req.params.greedy and req.params.seed is None:
            # Tensor-parallel ranks must draw alike: a server gives the seed before broadcasting
            # the request; a lone process may pick one here.
            req.params.seed = random.getrandbits(62)
        error = self._refusal(req)
        if error:
            self._end(req, RequestStatus.FAILED, error)
            self._ended.append(req)
        else:
            req.status = RequestStatus.WAITING
            self.waiting.append(req)

    def _refusal(self, req: Request) -> Optional[str]:
        c, n, p = self.cfg, len(req.input_ids), req.params
        if n > c.max_input_length:
            return (
                f"input is {n} tokens, over max_input_length {c.max_input_length}; "
                "lower the image/video resolution or raise max_input_length"
            )
        if p.max_new_tokens < 1:
            return f"max_new_tokens must be at least 1, got {p.max_new_tokens}"
        if p.max_new_tokens > c.max_output_length:
            return f"max_new_tokens {p.max_new_tokens} is over max_output_length {c.max_output_length}"
        if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
            return (
                f"sampling parameters out of range (temperature {p.temperature} must be >= 0, top_p "
                f"{p.top_p} in (0, 1], top_k {p.top_k} >= 0)"
            )
        if blocks_needed(n + p.max_new_tokens, c.block_size) > c.num_blocks:
            return (
                f"input {n} + output {p.max_new_tokens} tokens do not fit the KV cache "
                f"({self.capacity_tokens} tokens); give it more memory or lower the lengths"
            )
        return None

    # ---- the next pass ----------------------------------------------------------------------
    def schedule(self) -> Optional[ScheduledPass]:
        """Prefill newly admitted requests if any can be admitted, else decode the running ones."""
        admitted = self._admit()
        if admitted:
            return ScheduledPass(prefill=True, requests=admitted)
        if self.running:
            return ScheduledPass(prefill=False, requests=list(self.running))
        return None

    def _admit(self) -> List[Request]:
        admitted, tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            req = self.waiting[0]
            n = len(req.input_ids)
            if admitted and tokens + n > self.cfg.max_prefill_tokens:
                break
            need = blocks_needed(n + req.max_new_tokens, self.cfg.block_size)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            req.blocks = self.allocator.allocate(need)
            req.t_admitted = time.perf_counter()
            req.status = RequestStatus.RUNNING
            admitted.append(req)
            tokens += n
        return admitted

    # ---- after a pass -----------------------------------------------------------------------
    def prefilled(self, reqs: List[Request]) -> None:
        self.running.extend(reqs)

    def fail(self, reqs: List[Request], error: str, retryable: bool = False) -> None:
        """A pass failed: its requests end with `error` (the run goes on); `retryable`: the failure
        may not be theirs (a whole decode batch), so a later run should compute them again."""
        ids = {id(r) for r in reqs}
        self.running = [r for r in self.running if id(r) not in ids]
        for r in reqs:
            self._end(r, RequestStatus.FAILED, error)
            r.retryable = retryable

    def retire(self) -> List[Request]:
        """End the running requests that reached a stop; return them with every request that
        ended outside a pass (refused on arrival, aborted) since the last call."""
        ended, self._ended = self._ended, []
        still = []
        for r in self.running:
            if r.reached_stop():
                self._end(r, RequestStatus.FINISHED)
                ended.append(r)
            else:
                still.append(r)
        self.running = still
        return ended

    def abort(self, request_id) -> Optional[Request]:
        """Stop a waiting or running request and free its blocks; it is reported by the next
        step with status ABORTED. Under tensor parallelism every rank must abort the same
        request before the same step. Returns the request, or None if it is not in the engine."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                break
        else:
            for r in self.running:
                if r.id == request_id:
                    self.running.remove(r)
                    break
            else:
                return None
        self._end(r, RequestStatus.ABORTED, "aborted")
        self._ended.append(r)
        return r

    def _end(self, r: Request, status: RequestStatus, error: Optional[str] = None) -> None:
        r.status = status
        r.error = error
        r.t_finish = time.perf_counter()
        if r.blocks:
            self.allocator.release(r.blocks)
            r.blocks = []
