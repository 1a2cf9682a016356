"""The engine: requests in, tokens out, with continuous batching over a paged KV cache.

Three parts, one job each (the shape of nano-vllm's engine):
    scheduler.py      admission, KV-cache blocks, request lifecycle
    model_runner.py   the model, its cache and each pass's tensors (CUDA graphs included)
    engine.py         this loop: add_request / step / abort / stats

Every rank runs this same loop on the same requests; scheduling depends only on the requests
(never on time), so all ranks take the same decisions and meet at the same collectives. Each
`step()` runs one pass: a token for every decoding request and prefill chunks of at most
`max_num_batched_tokens` tokens in all (scheduler.py), prompt blocks found in the prefix cache
skipped and each medium's vision embeddings taken from the vision cache where it has them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..errors import UserError, first_line
from .config import checkpoint_stop_ids
from .grammar import grammar_problem
from .kv_cache import blocks_needed
from .media_spans import content_keys, media_spans
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
from .scheduler import Scheduler, SchedulerConfig, batched_tokens_problem

# Chunk size where none is set: on a CPU a 1024-token chunk already keeps the matrix units busy
# and holds running streams up for a fraction of a second; accelerators want bigger passes.
DEFAULT_BATCHED_TOKENS_CPU = 1024
DEFAULT_BATCHED_TOKENS_ACCELERATOR = 4096


def batched_tokens(cfg: "EngineConfig", device_type: str) -> int:
    """New tokens per pass: the setting, else the device's default raised, if need be, so that a
    chunk fits beside a full batch of decodes (a set value that cannot is refused instead)."""
    if cfg.max_num_batched_tokens is not None:
        return cfg.max_num_batched_tokens
    default = DEFAULT_BATCHED_TOKENS_CPU if device_type == "cpu" else DEFAULT_BATCHED_TOKENS_ACCELERATOR
    return max(default, cfg.max_batch_size + cfg.block_size)


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
    # Most new tokens in one pass (decodes + prefill chunks): a long prompt is prefilled in
    # chunks of this size while the running requests keep decoding. None: the device's default.
    max_num_batched_tokens: Optional[int] = None
    # Reuse the K/V of prompt blocks already computed (same tokens, same media content before).
    prefix_cache: bool = True
    # Keep the vision tower's output per medium, up to vision_cache_mb, for the next question.
    vision_cache: bool = True
    vision_cache_mb: int = 1024
    # Take KV blocks as tokens come (preempting the newest sequence when they run out); False:
    # reserve prompt + max_new_tokens at admission (no preemption, fewer sequences at once).
    kv_on_demand: bool = True
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
    # Reuse (cumulative): prompt tokens to prefill at admissions, and those found in the prefix
    # cache; media whose vision embeddings came from the vision cache, and those computed.
    max_num_batched_tokens: int = 0
    prefix_cache: bool = False
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_blocks: int = 0  # full blocks findable now
    vision_cache_hits: int = 0
    vision_cache_misses: int = 0
    preemptions: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class LLMEngine:
    def __init__(self, cfg: EngineConfig, tp: TPContext):
        self.cfg, self.tp = cfg, tp
        self.stop_token_ids = checkpoint_stop_ids(cfg.model_path)
        self.runner = ModelRunner(cfg, tp)
        problem = batched_tokens_problem(cfg.max_num_batched_tokens, cfg.max_batch_size, cfg.block_size)
        if problem:
            raise UserError(problem)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=cfg.max_batch_size,
                max_input_length=cfg.max_input_length,
                max_output_length=cfg.max_output_length,
                block_size=cfg.block_size,
                num_blocks=self.runner.num_blocks,
                max_num_batched_tokens=batched_tokens(cfg, tp.device.type),
                prefix_cache=cfg.prefix_cache,
                kv_on_demand=cfg.kv_on_demand,
            )
        )

    def add_request(self, req: Request) -> None:
        """Queue a request; one the engine cannot take ends FAILED at the next step, with why. A
        request that names no stop tokens gets the checkpoint's."""
        if req.params.stop_token_ids is None:
            req.params = dataclasses.replace(req.params, stop_token_ids=self.stop_token_ids)
        vocab = self.runner.model_cfg.vocab_size
        if req.input_ids and not 0 <= min(req.input_ids) <= max(req.input_ids) < vocab:
            self.scheduler.refuse(req, f"prompt token ids must be in 0..{vocab - 1} (this model's vocabulary)")
            return
        bias = req.params.logit_bias or {}
        if any(not 0 <= t < vocab for t in bias) or any(not -100 <= v <= 100 for v in bias.values()):
            self.scheduler.refuse(req, f"logit_bias: token ids must be in 0..{vocab - 1} and biases in -100..100")
            return
        if req.params.grammar is not None:
            problem = (
                "a grammar with ignore_eos (a complete answer ends on a stop token)"
                if req.params.ignore_eos
                else grammar_problem(req.params.grammar)
            )
            if problem:
                self.scheduler.refuse(req, f"grammar: {problem}")
                return
        try:
            self._locate_media(req)
        except ValueError as e:
            self.scheduler.refuse(req, f"prompt and media disagree: {e}")
            return
        self.scheduler.add(req)

    def _locate_media(self, req: Request) -> None:
        """Content keys (hashing the pixels where the caller gave none) and placeholder spans."""
        if req.media_keys is None:
            req.media_keys = content_keys("image", req.pixel_values, req.image_grid_thw) + content_keys(
                "video", req.pixel_values_videos, req.video_grid_thw
            )
        n_img = 0 if req.image_grid_thw is None else len(req.image_grid_thw)
        mc = self.runner.model_cfg
        videos = req.media_keys[n_img:]
        if mc.vision.tokens_per_second and req.second_per_grid_ts:
            # Frames placed by time (Qwen2.5-VL): the same pixels at another time step get other
            # positions, hence other K/V, so the step is part of the key the prefix cache hashes.
            # (The vision cache then keys by it too: harmless, one clip's pixels come at one fps.)
            videos = [f"{k}@{s!r}" for k, s in zip(videos, req.second_per_grid_ts)] + videos[
                len(req.second_per_grid_ts) :
            ]
        req.spans = media_spans(
            req.input_ids,
            grids={"image": req.image_grid_thw, "video": req.video_grid_thw},
            keys={"image": req.media_keys[:n_img], "video": videos},
            token_ids={"image": mc.image_token_id, "video": mc.video_token_id},
            merge=mc.vision.spatial_merge_size,
        )

    def abort(self, request_id) -> bool:
        """Stop a request and free its KV blocks; it comes back from the next step() as ABORTED."""
        return self.scheduler.abort(request_id) is not None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> List[Request]:
        """Run one prefill or decode pass; return the requests that ended since the last step
        (finished, failed or aborted: see each one's `status`)."""
        sp = self.scheduler.schedule()
        if sp is not None:
            try:
                self.runner.run(sp)
            except Exception as e:
                # A failing pass fails the requests in it, not the run. A prefill's failure (e.g. a
                # malformed image tensor) is taken as its requests' own; the decodes beside it may
                # have failed for any request of the pass, so they are worth computing again.
                msg = first_line(e)
                prefilling = [c.request for c in sp.chunks]
                self.scheduler.fail(prefilling, f"prefill failed: {msg}", sp=sp)
                self.scheduler.fail(sp.decodes, f"decode failed: {msg}", retryable=True)
                return self.scheduler.retire() + sp.requests
            self.scheduler.completed(sp)
        return self.scheduler.retire()

    def generate(self, requests: List[Request]) -> List[Request]:
        """Run requests to completion; returns them in the given order."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            self.step()
        return requests

    def clear_caches(self) -> None:
        """Forget every cached prompt block and vision embedding (benchmarks time runs from cold)."""
        pool = self.scheduler.pool
        for b in range(pool.num_blocks):
            pool.unregister(b)
        self.runner.vision_cache.clear()

    def prompt_logits(self, req: Request) -> "torch.Tensor":
        """Full-vocabulary logits [prompt_len, vocab] of one prompt, outside the step loop and its
        caches (checks against a reference model)."""
        self._locate_media(req)
        pool = self.scheduler.pool
        req.blocks = pool.allocate(blocks_needed(len(req.input_ids), self.cfg.block_size))
        try:
            return self.runner.prompt_logits(req)
        finally:
            pool.release(req.blocks)
            req.blocks = []

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
            free_blocks=s.pool.num_free,
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
            max_num_batched_tokens=s.cfg.max_num_batched_tokens,
            prefix_cache=s.cfg.prefix_cache,
            prompt_tokens=s.counters.prompt_tokens,
            cached_prompt_tokens=s.counters.cached_tokens,
            cached_blocks=s.pool.cached_blocks,
            vision_cache_hits=r.vision_cache.hits,
            vision_cache_misses=r.vision_cache.misses,
            preemptions=s.counters.preemptions,
        )
