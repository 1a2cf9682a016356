"""The engine: requests in, tokens out, with continuous batching over a paged KV cache.

Three parts, one job each (the shape of nano-vllm's engine):
    scheduler.py      admission, KV-cache blocks, request lifecycle
    model_runner.py   the model, its cache and each pass's tensors (CUDA graphs included)
    engine.py         this loop: add_request / step / abort / stats

Every rank runs this same loop on the same requests; scheduling depends only on the requests
(never on time), so all ranks take the same decisions and meet at the same collectives. Each
`step()` either prefills newly admitted requests (packed into one forward pass, vision tower
included) or decodes one token for every running request.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..errors import first_line
from .config import checkpoint_stop_ids
from .model_runner import ModelRunner
from .parallel import TPContext
from .request import (  # noqa: F401 (re-exported)
    DEFAULT_MAX_INPUT_LENGTH,
    DEFAULT_MAX_OUTPUT_LENGTH,
    STOP_TOKEN_IDS,
    Request,
    RequestStatus,
    SamplingParams,
)
from .scheduler import Scheduler, SchedulerConfig


@dataclass
class EngineConfig:
    model_path: str
    dtype: torch.dtype = torch.bfloat16
    max_batch_size: int = 8
    max_input_length: int = DEFAULT_MAX_INPUT_LENGTH
    max_output_length: int = DEFAULT_MAX_OUTPUT_LENGTH
    block_size: int = 128
    # KV cache size in tokens; None: enough for max_batch_size full-length requests, within
    # `kv_cache_fraction` of free device memory (or of host memory on CPU).
    kv_cache_tokens: Optional[int] = None
    kv_cache_fraction: float = 0.5
    # Most prompt tokens packed into one prefill pass (at least one request always goes).
    max_prefill_tokens: int = 16384
    # Replay decode steps as CUDA graphs (CUDA, one process). None: on where supported.
    cuda_graphs: Optional[bool] = None
    # torch.compile the decode step before capturing it (experimental; MODELTEST_COMPILE=1).
    compile_decode: bool = field(default_factory=lambda: os.environ.get("MODELTEST_COMPILE") == "1")
    # Pack linear weights into oneDNN's blocked layout (CPU; engine/layers.py says why).
    # None: on for CPU where this PyTorch build supports it for the dtype.
    onednn_weights: Optional[bool] = None


@dataclass
class EngineStats:
    """What tools and servers read about an engine (never its attributes)."""

    device: str
    world_size: int
    block_size: int
    num_blocks: int
    free_blocks: int
    capacity_tokens: int
    max_batch_size: int
    waiting: int
    running: int
    shard_bytes: int  # this rank's weights, as held (packed or plain)
    decode_weight_bytes: int  # weights one decode step reads
    prefill_passes: int  # passes so far
    decode_passes: int
    vision_passes: int  # prefills that ran the vision tower
    # Seconds of the most recent passes (up to model_runner.STEP_TIMES_KEPT; empty when stats()
    # is asked without timings): the last `n` of a run are times[-n:], n from the pass counts.
    prefill_times: List[float] = field(default_factory=list)
    decode_times: List[float] = field(default_factory=list)
    vision_times: List[float] = field(default_factory=list)  # the vision tower within the prefills


class LLMEngine:
    def __init__(self, cfg: EngineConfig, tp: TPContext):
        self.cfg, self.tp = cfg, tp
        self.stop_token_ids = checkpoint_stop_ids(cfg.model_path)
        self.runner = ModelRunner(cfg, tp)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=cfg.max_batch_size,
                max_input_length=cfg.max_input_length,
                max_output_length=cfg.max_output_length,
                block_size=cfg.block_size,
                num_blocks=self.runner.num_blocks,
                max_prefill_tokens=cfg.max_prefill_tokens,
            )
        )

    def add_request(self, req: Request) -> None:
        """Queue a request; one the engine cannot take ends FAILED at the next step, with why. A
        request that names no stop tokens gets the checkpoint's."""
        if req.params.stop_token_ids is None:
            req.params = dataclasses.replace(req.params, stop_token_ids=self.stop_token_ids)
        self.scheduler.add(req)

    def abort(self, request_id) -> bool:
        """Stop a request and free its KV blocks; it comes back from the next step() as ABORTED."""
        return self.scheduler.abort(request_id) is not None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> List[Request]:
        """Run one prefill or decode pass; return the requests that ended since the last step
        (finished, failed or aborted: see each one's `status`)."""
        scheduled = self.scheduler.schedule()
        if scheduled is not None:
            reqs = scheduled.requests
            if scheduled.prefill:
                try:
                    self.runner.prefill(reqs)
                except Exception as e:
                    # A failing prefill (e.g. a malformed image tensor) fails its requests, not the run.
                    self.scheduler.fail(reqs, f"prefill failed: {first_line(e)}")
                    return self.scheduler.retire() + reqs
                self.scheduler.prefilled(reqs)
            else:
                try:
                    self.runner.decode(reqs)
                except Exception as e:
                    # A failing decode pass fails the requests in it — not the run, and not as their
                    # own fault: which one caused it is unknown, so they are worth computing again.
                    self.scheduler.fail(reqs, f"decode failed: {first_line(e)}", retryable=True)
                    return self.scheduler.retire() + reqs
        return self.scheduler.retire()

    def generate(self, requests: List[Request]) -> List[Request]:
        """Run requests to completion; returns them in the given order."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            self.step()
        return requests

    def limit_batch_size(self, n: int) -> None:
        """Decode at most n sequences together from now on (n <= cfg.max_batch_size, for which
        the cache and any CUDA graphs were sized)."""
        if not 1 <= n <= self.cfg.max_batch_size:
            raise ValueError(f"batch size {n} outside 1..{self.cfg.max_batch_size}")
        self.scheduler.max_batch_size = n

    def stats(self, timings: bool = True) -> EngineStats:
        s, r = self.scheduler, self.runner
        times = {k: list(v) for k, v in r.step_times.items()} if timings else {}
        return EngineStats(
            device=str(self.tp.device),
            world_size=self.tp.world_size,
            block_size=self.cfg.block_size,
            num_blocks=s.cfg.num_blocks,
            free_blocks=s.allocator.num_free,
            capacity_tokens=s.capacity_tokens,
            max_batch_size=s.max_batch_size,
            waiting=len(s.waiting),
            running=len(s.running),
            shard_bytes=r.model.shard_bytes,
            decode_weight_bytes=r.decode_weight_bytes,
            prefill_passes=r.step_counts["prefill"],
            decode_passes=r.step_counts["decode"],
            vision_passes=r.step_counts["vision"],
            prefill_times=times.get("prefill", []),
            decode_times=times.get("decode", []),
            vision_times=times.get("vision", []),
        )
