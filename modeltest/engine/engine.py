"""The engine: requests in, greedy tokens out, with continuous batching over a paged KV cache.

Every rank runs this same loop on the same requests; scheduling depends only on the requests
(never on time), so all ranks take the same decisions and meet at the same collectives.

Each `step()` either prefills newly admitted requests (packed into one forward pass, vision
tower included) or decodes one token for every running request. A request is admitted when a
batch slot is free and the blocks for its prompt plus its `max_new_tokens` are free, so a running
request never waits for memory; it leaves as soon as it stops, and its blocks go back.
"""
from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import Deque, List, Optional

import torch

from ..errors import UserError
from .config import Qwen2VLConfig
from .kv_cache import BlockAllocator, allocate_cache, blocks_needed, bytes_per_token, slots_for
from .loader import CheckpointReader
from .model import AttnMetadata, Qwen2VLModel
from .parallel import TPContext
from .rope import rope_index

STOP_TOKEN_IDS = (151645, 151643)   # <|im_end|>, <|endoftext|>


@dataclass
class EngineConfig:
    model_path: str
    dtype: torch.dtype = torch.bfloat16
    max_batch_size: int = 8
    max_input_length: int = 4096
    max_output_length: int = 256
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
class Request:
    id: object
    input_ids: List[int]
    max_new_tokens: int
    pixel_values: Optional[torch.Tensor] = None          # [N_img_patches, C*T*P*P]
    image_grid_thw: Optional[torch.Tensor] = None        # [n_images, 3]
    pixel_values_videos: Optional[torch.Tensor] = None
    video_grid_thw: Optional[torch.Tensor] = None
    ignore_eos: bool = False
    # filled in by the engine
    output_ids: List[int] = field(default_factory=list)
    error: Optional[str] = None
    positions: Optional[torch.Tensor] = None             # [3, prompt_len]
    delta: int = 0
    blocks: List[int] = field(default_factory=list)
    t_arrival: float = 0.0
    t_first_token: Optional[float] = None
    t_finish: Optional[float] = None
    prefill_time: float = 0.0
    decode_time: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def e2e_time(self) -> float:
        return (self.t_finish or time.perf_counter()) - self.t_arrival


def tune_cpu_allocator() -> None:
    """Keep freed memory in the heap instead of returning it to the OS (glibc only).

    Activations of a vision tower are tens of MB each; glibc serves such blocks with mmap and
    gives them back on free, so every new buffer page-faults in afresh. Raising the mmap and trim
    thresholds makes later buffers reuse warm memory (3x faster element-wise ops measured here).
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


class LLMEngine:
    def __init__(self, cfg: EngineConfig, tp: TPContext):
        self.cfg, self.tp = cfg, tp
        if tp.device.type == "cpu":
            tune_cpu_allocator()
        self.model_cfg = Qwen2VLConfig.from_path(cfg.model_path)
        self.model = Qwen2VLModel(self.model_cfg, tp, cfg.dtype)
        pack = cfg.onednn_weights if cfg.onednn_weights is not None else tp.device.type == "cpu"
        self.model.load(CheckpointReader(cfg.model_path), pack_for_cpu=pack)
        self.model.eval()
        mc = self.model_cfg
        per_token = bytes_per_token(mc.num_hidden_layers, self.model.layout.num_kv, mc.head_dim, cfg.dtype)
        self.num_blocks = self._cache_blocks(per_token)
        self.allocator = BlockAllocator(self.num_blocks)
        # One extra block, never handed out: padding rows of a CUDA-graph batch write there.
        self.kv_cache = allocate_cache(mc.num_hidden_layers, self.num_blocks + 1, cfg.block_size,
                                       self.model.layout.num_kv, mc.head_dim, cfg.dtype, tp.device)
        self.graphs = None
        use_graphs = cfg.cuda_graphs if cfg.cuda_graphs is not None else (tp.device.type == "cuda"
                                                                           and tp.world_size == 1)
        if use_graphs:
            from .cuda_graphs import DecodeGraphs
            width = blocks_needed(cfg.max_input_length + cfg.max_output_length, cfg.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_cache, cfg.max_batch_size, width, cfg.block_size,
                                       scratch_block=self.num_blocks, device=tp.device,
                                       compile_step=cfg.compile_decode)
        self.waiting: Deque[Request] = collections.deque()
        self.running: List[Request] = []
        self.rejected: List[Request] = []     # failed on arrival; reported by the next step()
        # Tests set this to see full-vocabulary logits: hook(requests, logits [B, vocab]) per step.
        self.logits_hook = None
        # Wall time of every prefill and decode pass (seconds), for the performance report.
        self.step_times = {"prefill": [], "decode": []}

    # ---- memory -------------------------------------------------------------------------
    def _cache_blocks(self, per_token: int) -> int:
        c = self.cfg
        if c.kv_cache_tokens:
            return max(1, blocks_needed(c.kv_cache_tokens, c.block_size))
        # Enough blocks for max_batch_size requests of full length each, within the memory budget.
        wanted = c.max_batch_size * blocks_needed(c.max_input_length + c.max_output_length, c.block_size)
        dev = self.tp.device
        if dev.type == "cpu":
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        else:
            free, _ = getattr(torch, dev.type).mem_get_info(dev)
        budget = int(free * c.kv_cache_fraction) // (per_token * c.block_size)
        if budget < 1:
            raise UserError(f"KV cache: not one {c.block_size}-token block fits in {c.kv_cache_fraction:.0%} of free "
                            "memory; use more devices (tensor parallel) or lower max_batch_size")
        return min(wanted, budget)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.cfg.block_size

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        req.t_arrival = time.perf_counter()
        n = len(req.input_ids)
        if n > self.cfg.max_input_length:
            req.error = (f"input is {n} tokens, over max_input_length {self.cfg.max_input_length}; "
                         "lower the image/video resolution or raise max_input_length")
        elif req.max_new_tokens > self.cfg.max_output_length:
            req.error = f"max_new_tokens {req.max_new_tokens} is over max_output_length {self.cfg.max_output_length}"
        elif blocks_needed(n + req.max_new_tokens, self.cfg.block_size) > self.num_blocks:
            req.error = (f"input {n} + output {req.max_new_tokens} tokens do not fit the KV cache "
                         f"({self.capacity_tokens} tokens); give it more memory or lower the lengths")
        if req.error:
            req.t_finish = req.t_arrival
            self.rejected.append(req)
        else:
            self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.rejected)

    def step(self) -> List[Request]:
        """Run one prefill or decode pass; return the requests that finished in it."""
        finished, self.rejected = self.rejected, []
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as e:
                # A failing prefill (e.g. a malformed image tensor) fails its requests, not the run.
                for r in admitted:
                    r.error = f"prefill failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    self._finish(r)
                return finished + admitted
            self.running.extend(admitted)
        elif self.running:
            self._decode(self.running)
        done = [r for r in self.running if self._is_done(r)]
        for r in done:
            self._finish(r)
        self.running = [r for r in self.running if r.t_finish is None]
        return finished + done

    def generate(self, requests: List[Request]) -> List[Request]:
        """Run requests to completion; returns them in the given order."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            self.step()
        return requests

    def _admit(self) -> List[Request]:
        admitted, tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.cfg.max_batch_size:
            req = self.waiting[0]
            n = len(req.input_ids)
            if admitted and tokens + n > self.cfg.max_prefill_tokens:
                break
            need = blocks_needed(n + req.max_new_tokens, self.cfg.block_size)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            req.blocks = self.allocator.allocate(need)
            admitted.append(req)
            tokens += n
        return admitted

    def _is_done(self, r: Request) -> bool:
        if len(r.output_ids) >= r.max_new_tokens:
            return True
        return not r.ignore_eos and bool(r.output_ids) and r.output_ids[-1] in STOP_TOKEN_IDS

    def _finish(self, r: Request) -> None:
        r.t_finish = time.perf_counter()
        if r.blocks:
            self.allocator.release(r.blocks)
            r.blocks = []

    # ---- model passes -------------------------------------------------------------------
    def _vision(self, reqs: List[Request]):
        """Vision embeddings for every image and video of `reqs`, in prompt order per kind."""
        dev = self.tp.device
        pixels, grids, kinds = [], [], []
        for attr, gattr, kind in (("pixel_values", "image_grid_thw", "image"),
                                  ("pixel_values_videos", "video_grid_thw", "video")):
            for r in reqs:
                if getattr(r, attr) is not None:
                    pixels.append(getattr(r, attr))
                    grids.append(getattr(r, gattr))
                    kinds += [kind] * len(getattr(r, gattr))
        if not pixels:
            return None
        grid = torch.cat(grids).to(dev)
        return self.model.visual(torch.cat(pixels).to(dev), grid), grid, kinds

    @torch.inference_mode()
    def _prefill(self, reqs: List[Request]) -> None:
        start = time.perf_counter()
        dev, bs = self.tp.device, self.cfg.block_size
        ids, positions, slots, lens = [], [], [], [0]
        for r in reqs:
            self._positions(r)
            ids += r.input_ids
            positions.append(r.positions)
            slots += slots_for(r.blocks, 0, len(r.input_ids), bs)
            lens.append(lens[-1] + len(r.input_ids))
        input_ids = torch.tensor(ids, device=dev)
        x = self._embed_with_vision(input_ids, reqs)
        meta = AttnMetadata(prefill=True, slot_mapping=torch.tensor(slots, device=dev),
                            cu_seqlens=torch.tensor(lens, device=dev))
        last = torch.tensor(lens[1:], device=dev) - 1
        h = self.model(x, torch.cat(positions, dim=1).to(dev), meta, self.kv_cache, keep=last)
        next_ids = self._sample(reqs, h)
        _sync(dev)
        now = time.perf_counter()
        self.step_times["prefill"].append(now - start)
        for r, t in zip(reqs, next_ids):
            r.output_ids.append(int(t))
            r.prefill_time = now - start
            r.t_first_token = now

    def _positions(self, r: Request) -> None:
        """3-axis prompt positions and the decode delta of a request (computed once)."""
        if r.positions is None:
            mc = self.model_cfg
            img = r.image_grid_thw.tolist() if r.image_grid_thw is not None else []
            vid = r.video_grid_thw.tolist() if r.video_grid_thw is not None else []
            r.positions, r.delta = rope_index(r.input_ids, img, vid, mc.image_token_id, mc.video_token_id,
                                              mc.vision.spatial_merge_size)

    def _sample(self, reqs: List[Request], h: torch.Tensor) -> List[int]:
        if self.logits_hook is not None:
            self.logits_hook(reqs, self.model.full_logits(h).float())
        return self.model.greedy(h).tolist()

    def _embed_with_vision(self, input_ids: torch.Tensor, reqs: List[Request]) -> torch.Tensor:
        mc = self.model_cfg
        vision = self._vision(reqs)
        if vision is None:
            return self.model.embed_inputs(input_ids, None, None)
        embeds, grid, kinds = vision
        merge2 = mc.vision.spatial_merge_size ** 2
        counts = (grid.prod(dim=1) // merge2).tolist()
        per_kind = {"image": [], "video": []}
        for chunk, kind in zip(embeds.split(counts), kinds):
            per_kind[kind].append(chunk)
        x = self.model.embed_inputs(input_ids, None, None)
        for kind, token in (("image", mc.image_token_id), ("video", mc.video_token_id)):
            if per_kind[kind]:
                mask = input_ids == token
                e = torch.cat(per_kind[kind])
                if int(mask.sum()) != e.shape[0]:
                    raise ValueError(f"{int(mask.sum())} {kind} placeholder tokens but {e.shape[0]} {kind} embeddings")
                x[mask] = e.to(x.dtype)
        return x

    @torch.inference_mode()
    def _decode(self, reqs: List[Request]) -> None:
        start = time.perf_counter()
        dev, bs = self.tp.device, self.cfg.block_size
        last_ids, pos, new_slots, lengths = [], [], [], []
        for r in reqs:
            i = r.num_tokens - 1                       # index of the token being fed
            last_ids.append(r.output_ids[-1])
            pos.append(i + r.delta)
            new_slots.append(r.blocks[i // bs] * bs + i % bs)
            lengths.append(r.num_tokens)
        if self.graphs is not None and self.logits_hook is None:
            next_ids = self.graphs.run(last_ids, pos, new_slots, [r.blocks for r in reqs], lengths)
            self._record_decode(reqs, next_ids, start)
            return
        width = blocks_needed(max(lengths), bs)
        table = torch.tensor([r.blocks[:width] + [0] * (width - len(r.blocks[:width])) for r in reqs],
                             device=dev)                                           # [B, width]
        offs = torch.arange(width * bs, device=dev)
        mask = offs.unsqueeze(0) < torch.tensor(lengths, device=dev).unsqueeze(1)  # [B, width * bs]
        meta = AttnMetadata(prefill=False, slot_mapping=torch.tensor(new_slots, device=dev),
                            block_table=table, context_mask=mask)
        input_ids = torch.tensor(last_ids, device=dev)
        positions = torch.tensor(pos, device=dev).unsqueeze(0).expand(3, -1)
        h = self.model(self.model.embed_inputs(input_ids, None, None), positions, meta, self.kv_cache)
        next_ids = self._sample(reqs, h)
        _sync(dev)
        self._record_decode(reqs, next_ids, start)

    def _record_decode(self, reqs: List[Request], next_ids: List[int], start: float) -> None:
        elapsed = time.perf_counter() - start
        self.step_times["decode"].append(elapsed)
        for r, t in zip(reqs, next_ids):
            r.output_ids.append(int(t))
            r.decode_time += elapsed

    @torch.inference_mode()
    def prompt_logits(self, req: Request) -> torch.Tensor:
        """Full-vocabulary logits [prompt_len, vocab] of one prompt (for checks against a reference)."""
        req.blocks = self.allocator.allocate(blocks_needed(len(req.input_ids) + req.max_new_tokens, self.cfg.block_size))
        try:
            dev = self.tp.device
            self._positions(req)
            ids = torch.tensor(req.input_ids, device=dev)
            meta = AttnMetadata(prefill=True, slot_mapping=torch.tensor(
                slots_for(req.blocks, 0, len(req.input_ids), self.cfg.block_size), device=dev),
                cu_seqlens=torch.tensor([0, len(req.input_ids)], device=dev))
            h = self.model(self._embed_with_vision(ids, [req]), req.positions.to(dev), meta, self.kv_cache)
            return self.model.full_logits(h).float()
        finally:
            self._finish(req)
