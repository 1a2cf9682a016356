"""Admission, KV-cache blocks and the contents of each pass.

Scheduling depends only on the requests (never on time), so every tensor-parallel rank, fed the
same requests, takes the same decisions and meets the others at the same collectives.

One pass holds at most `max_num_batched_tokens` new tokens: first one token for every decoding
request, then prefill chunks — of requests already prefilling, then of newly admitted ones, first
come first served (a request that does not fit yet holds back the ones behind it). A long prompt
is thus prefilled a chunk per pass while the others keep decoding. Chunks end on block
boundaries (or at the prompt's end), so a block's K/V is always computed the same way, whichever
pass it falls in (model.chunk_attention says how that keeps cached and fresh K/V identical).

Blocks: admission takes the prompt's blocks — first those found in the prefix cache, whose
prefill is skipped —, decoding takes one more block whenever a sequence fills its last one.
When none is left, the newest running sequence is preempted (its blocks go back, it waits at the
head of the queue and later recomputes, mostly from the prefix cache): never an error.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field
from typing import Deque, List, Optional

from .kv_cache import BlockPool, block_hashes, blocks_needed
from .request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_batch_size: int  # sequences running together (prefilling or decoding)
    max_input_length: int  # prompt tokens, vision placeholders expanded
    max_output_length: int  # most max_new_tokens a request may ask for
    block_size: int  # tokens per KV cache block
    num_blocks: int  # KV cache blocks (sized by the model runner)
    max_num_batched_tokens: int = 2048  # new tokens in one pass (decodes + prefill chunks)
    prefix_cache: bool = True
    # False: admission also takes the blocks of every token a request may generate (max_new_tokens),
    # so no sequence is ever preempted, at the price of far fewer sequences at once.
    kv_on_demand: bool = True

    def __post_init__(self):
        problem = batched_tokens_problem(self.max_num_batched_tokens, self.max_batch_size, self.block_size)
        if problem:
            raise ValueError(problem)


def batched_tokens_problem(n: Optional[int], max_batch_size: int, block_size: int) -> Optional[str]:
    """Why a pass of n new tokens cannot work with these sizes (None: it can, or n is unset)."""
    if n is not None and n < max_batch_size + block_size:
        return (
            f"max_num_batched_tokens {n} must be at least max_batch_size + block_size "
            f"({max_batch_size} + {block_size}), so a prefill chunk fits beside a full batch of decodes"
        )
    return None


@dataclass
class Chunk:
    """Prefill of tokens [start, end) of a request's `all_ids` in this pass."""

    request: Request
    start: int
    end: int

    @property
    def last(self) -> bool:
        """Whether it ends the request's prefill (its last row then gives the next token)."""
        return self.end == self.request.prefill_target


@dataclass
class ScheduledPass:
    decodes: List[Request]  # one token each
    chunks: List[Chunk]  # prefill pieces, in pass order after the decodes
    registered: List[int] = field(default_factory=list)  # blocks made findable by this pass

    @property
    def requests(self) -> List[Request]:
        return self.decodes + [c.request for c in self.chunks]

    @property
    def sampled(self) -> List[Request]:
        """The requests that get a token from this pass, in row order."""
        return self.decodes + [c.request for c in self.chunks if c.last]


@dataclass
class SchedulerCounters:
    prompt_tokens: int = 0  # tokens to prefill, over every admission
    cached_tokens: int = 0  # of which found in the prefix cache
    preemptions: int = 0


class Scheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.max_batch_size = cfg.max_batch_size
        self.pool = BlockPool(cfg.num_blocks, cfg.prefix_cache)
        self.waiting: Deque[Request] = collections.deque()
        self.running: List[Request] = []  # in admission order: the last is preempted first
        self._ended: List[Request] = []  # failed on arrival or aborted; reported by the next step
        self.counters = SchedulerCounters()

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
            self.refuse(req, error)
        else:
            req.status = RequestStatus.WAITING
            self.waiting.append(req)

    def refuse(self, req: Request, error: str) -> None:
        """End a request on arrival (reported by the next step)."""
        req.t_arrival = req.t_arrival or time.perf_counter()
        self._end(req, RequestStatus.FAILED, error)
        self._ended.append(req)

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
        if p.repetition_penalty <= 0 or not (-2 <= p.frequency_penalty <= 2 and -2 <= p.presence_penalty <= 2):
            return (
                f"penalties out of range (repetition_penalty {p.repetition_penalty} must be > 0; "
                f"frequency_penalty {p.frequency_penalty} and presence_penalty {p.presence_penalty} in [-2, 2])"
            )
        if not 0 <= p.min_tokens <= p.max_new_tokens:
            return f"min_tokens {p.min_tokens} must be between 0 and max_new_tokens {p.max_new_tokens}"
        if blocks_needed(n + p.max_new_tokens, c.block_size) > c.num_blocks:
            return (
                f"input {n} + output {p.max_new_tokens} tokens do not fit the KV cache "
                f"({self.capacity_tokens} tokens); give it more memory or lower the lengths"
            )
        return None

    # ---- the next pass ----------------------------------------------------------------------
    def schedule(self) -> Optional[ScheduledPass]:
        """The next pass: a token for each decoding request, then prefill chunks; None if idle."""
        budget = self.cfg.max_num_batched_tokens
        decodes = self._decodes()
        budget -= len(decodes)
        sp = ScheduledPass(decodes=decodes, chunks=[])
        for r in self.running:
            if r.prefilling:
                budget = self._chunk(r, budget, sp)
        # A prefill in progress takes the budget first, so a request admitted behind it finds
        # every block it shares with it registered (computed, or computed in this very pass).
        while self.waiting and len(self.running) < self.max_batch_size and budget >= self.cfg.block_size:
            if not self._admit(self.waiting[0]):
                break
            self.running.append(self.waiting.popleft())
            budget = self._chunk(self.running[-1], budget, sp)
        return sp if sp.decodes or sp.chunks else None

    def _decodes(self) -> List[Request]:
        """Every decoding request, each with a block for the token it feeds; preempts the newest
        running requests while blocks run out."""
        out = []
        i = 0
        while i < len(self.running):
            r = self.running[i]
            i += 1
            if r.prefilling:
                continue
            fed = r.num_tokens - 1  # index of the token this pass feeds
            while len(r.blocks) <= fed // self.cfg.block_size:
                if self.pool.num_free:
                    r.blocks += self.pool.allocate(1)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is r:
                    break
            if r.status is RequestStatus.RUNNING:
                out.append(r)
        return out

    def _admit(self, r: Request) -> bool:
        """Give r the blocks of its prefill (cached ones first) if they are free; False if not yet."""
        bs = self.cfg.block_size
        ids = r.all_ids
        target = len(ids)
        r.block_hashes = block_hashes(ids, r.spans, bs, r.block_hashes) if self.cfg.prefix_cache else []
        # a log-likelihood request computes every prompt row: it reads nothing from the cache
        cached = [] if r.wants_prompt_logprobs else self.pool.lookup(r.block_hashes)
        if cached and len(cached) * bs >= target:
            cached = cached[:-1]  # the last token must be computed: its row gives the next token
        # on demand: the prefill's blocks now, the rest as tokens come; else all it may ever need
        reserve = target if self.cfg.kv_on_demand else len(r.input_ids) + r.max_new_tokens
        need = blocks_needed(reserve, bs) - len(cached)
        # cached blocks no one holds sit in the free list: taking them uses up free blocks too
        if need + sum(1 for b in cached if self.pool.refs[b] == 0) > self.pool.num_free:
            return False
        self.pool.take(cached)
        r.blocks = cached + self.pool.allocate(need)
        r.num_computed = len(cached) * bs
        r.prefill_target = target
        if r.t_admitted is None:
            r.t_admitted = time.perf_counter()
            r.cached_tokens = r.num_computed
        r.status = RequestStatus.RUNNING
        self.counters.prompt_tokens += target
        self.counters.cached_tokens += r.num_computed
        return True

    def _chunk(self, r: Request, budget: int, sp: ScheduledPass) -> int:
        """Schedule the next prefill chunk of r within `budget` tokens; returns what is left."""
        bs = self.cfg.block_size
        start = r.num_computed
        end = min(r.prefill_target, start + budget)
        if end < r.prefill_target:
            end = start + (end - start) // bs * bs  # stop on a block boundary
        if end <= start:
            return budget
        sp.chunks.append(Chunk(r, start, end))
        # Blocks this chunk completes become findable now: a later request in this same pass
        # reads their K/V after this pass writes them (every layer writes before it attends).
        for k in range(start // bs, min(end // bs, len(r.block_hashes))):
            if self.pool.register(r.blocks[k], r.block_hashes[k]):
                sp.registered.append(r.blocks[k])
        return budget - (end - start)

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self.pool.release(r.blocks)
        r.blocks = []
        r.num_computed = r.prefill_target = 0
        r.vision_embeds = {}
        r.preemptions += 1
        r.status = RequestStatus.WAITING
        self.counters.preemptions += 1
        self.waiting.appendleft(r)

    # ---- after a pass -----------------------------------------------------------------------
    def completed(self, sp: ScheduledPass) -> None:
        """The pass ran: its tokens' K/V are in the cache."""
        for r in sp.decodes:
            r.num_computed += 1
        for c in sp.chunks:
            c.request.num_computed = c.end
            if c.last:
                c.request.vision_embeds = {}  # the prefill is done: no row needs them again

    def fail(self, reqs: List[Request], error: str, retryable: bool = False, sp: ScheduledPass = None) -> None:
        """A pass failed: its requests end with `error` (the run goes on); `retryable`: the failure
        may not be theirs (a whole decode batch), so a later run should compute them again. Blocks
        the pass was to compute are no longer findable."""
        for b in sp.registered if sp else ():
            self.pool.unregister(b)
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
            if not r.prefilling and r.reached_stop():
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
        r.vision_embeds = {}
        if r.blocks:
            self.pool.release(r.blocks)
            r.blocks = []
