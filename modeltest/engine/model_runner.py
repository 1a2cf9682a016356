"""Loads the model and its KV cache, builds each pass's tensors and runs it.

The runner knows nothing about admission: the scheduler hands it the requests of a pass, it
appends one token to each (prefill: the first token; decode: the next one) and records timings.
Decode passes replay CUDA graphs where they are on.
"""

from __future__ import annotations

import collections
import os
import time
from typing import List

import torch
import torch.distributed

from ..device import synchronize
from ..errors import UserError
from .config import Qwen2VLConfig
from .kv_cache import allocate_cache, blocks_needed, bytes_per_token, slots_for
from .loader import CheckpointReader
from .model import AttnMetadata, Qwen2VLModel
from .parallel import TPContext
from .request import Request, SamplingParams
from .rope import rope_index

STEP_TIMES_KEPT = 1 << 16


def tune_cpu_allocator() -> None:
    """Keep freed memory in the heap instead of returning it to the OS (glibc only).

    Activations of a vision tower are tens of MB each; glibc serves such blocks with mmap and
    gives them back on free, so every new buffer page-faults in afresh. Raising the mmap and trim
    thresholds makes later buffers reuse warm memory (3x faster element-wise ops measured here).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one request's token `step`: a function of its seed and the step
    alone, so what else is in the batch (or which rank draws) never changes it."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) % (2**63))


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """One token from logits [vocab] (fp32): temperature, then top-k, then top-p (nucleus),
    drawn by the Gumbel-max trick (argmax of logits + Gumbel noise samples the softmax exactly)."""
    x = logits / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        order = torch.argsort(x, descending=True)
        probs = torch.softmax(x[order], dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass (keeps >= 1).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        x = x.clone()
        x[order[drop]] = float("-inf")
    u = torch.rand(x.shape[-1], generator=seeded_generator(params.seed, step)).clamp_(1e-20, 1.0)
    gumbel = (-torch.log(-torch.log(u))).to(x.device)
    return int(torch.argmax(x + gumbel))


class Sampler:
    """Next tokens of a pass. Greedy rows: the argmax, without gathering the vocabulary across
    ranks. Sampling rows (temperature > 0): drawn from the full logits with the request's seed
    (`sample_token`), the same on every rank. Tests replace it with one that records logits."""

    capturable = True  # an all-greedy decode pass may replay a CUDA graph (same argmax inside)

    def __call__(self, model: Qwen2VLModel, reqs: List[Request], h: torch.Tensor) -> List[int]:
        out = model.greedy(h).tolist()
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            logits = model.full_logits(h[sampled]).float()  # [S, vocab]
            for row, i in zip(logits, sampled):
                out[i] = sample_token(row, reqs[i].params, step=len(reqs[i].output_ids))
        return out


class ModelRunner:
    def __init__(self, cfg, tp: TPContext):
        """cfg: an EngineConfig (engine/engine.py)."""
        self.cfg, self.tp = cfg, tp
        if tp.device.type == "cpu":
            tune_cpu_allocator()
        self.model_cfg = Qwen2VLConfig.from_path(cfg.model_path)
        self.model = Qwen2VLModel(self.model_cfg, tp, cfg.dtype)
        pack = cfg.onednn_weights if cfg.onednn_weights is not None else tp.device.type == "cpu"
        self.model.load(CheckpointReader(cfg.model_path), pack_for_cpu=pack)
        self.model.eval()
        self.decode_weight_bytes = self.model.decode_weight_bytes()  # fixed once loaded
        mc = self.model_cfg
        per_token = bytes_per_token(mc.num_hidden_layers, self.model.layout.num_kv, mc.head_dim, cfg.dtype)
        self.num_blocks = self._cache_blocks(per_token)
        # One extra block, never handed out: padding rows of a CUDA-graph batch write there.
        self.kv_cache = allocate_cache(
            mc.num_hidden_layers,
            self.num_blocks + 1,
            cfg.block_size,
            self.model.layout.num_kv,
            mc.head_dim,
            cfg.dtype,
            tp.device,
        )
        self.sampler = Sampler()
        self.graphs = None
        use_graphs = (
            cfg.cuda_graphs if cfg.cuda_graphs is not None else (tp.device.type == "cuda" and tp.world_size == 1)
        )
        if use_graphs:
            from .cuda_graphs import DecodeGraphs

            width = blocks_needed(cfg.max_input_length + cfg.max_output_length, cfg.block_size)
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_cache,
                cfg.max_batch_size,
                width,
                cfg.block_size,
                scratch_block=self.num_blocks,
                device=tp.device,
                compile_step=cfg.compile_decode,
            )
        # Wall time of recent passes (seconds), for performance figures, and how many there were;
        # read through engine.stats(). Bounded: a server runs for days.
        self.step_times = {k: collections.deque(maxlen=STEP_TIMES_KEPT) for k in ("prefill", "decode", "vision")}
        self.step_counts = {k: 0 for k in self.step_times}

    def _timed(self, kind: str, seconds: float) -> None:
        self.step_times[kind].append(seconds)
        self.step_counts[kind] += 1

    # ---- sizing -------------------------------------------------------------------------------
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
        if self.tp.world_size > 1:
            # Every rank must hold the same number of blocks (scheduling is replicated): the
            # smallest budget wins, whatever each device had free when it looked.
            t = torch.tensor([budget], dtype=torch.int64, device=dev if dev.type != "cpu" else "cpu")
            budget = int(self.tp.all_reduce(t, op=torch.distributed.ReduceOp.MIN).item())
        if budget < 1:
            raise UserError(
                f"KV cache: not one {c.block_size}-token block fits in {c.kv_cache_fraction:.0%} of free "
                "memory; use more devices (tensor parallel) or lower max_batch_size"
            )
        return min(wanted, budget)

    # ---- passes -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, reqs: List[Request]) -> None:
        """One packed forward pass over the prompts of `reqs` (vision tower included); appends
        each request's first token."""
        start = time.perf_counter()
        dev, bs = self.tp.device, self.cfg.block_size
        ids, positions, slots, lens = [], [], [], [0]
        for r in reqs:
            self._positions(r)
            ids += r.input_ids
            positions.append(r.positions)
            slots += slots_for(r.blocks, 0, len(r.input_ids), bs)
            lens.append(lens[-1] + len(r.input_ids))
        input_ids = torch.tensor(ids, device=dev)  # [T]
        x = self._embed_with_vision(input_ids, reqs)  # [T, hidden]
        meta = AttnMetadata(
            prefill=True, slot_mapping=torch.tensor(slots, device=dev), cu_seqlens=torch.tensor(lens, device=dev)
        )
        last = torch.tensor(lens[1:], device=dev) - 1  # [B] last row of each prompt
        h = self.model(x, torch.cat(positions, dim=1).to(dev), meta, self.kv_cache, keep=last)
        next_ids = self.sampler(self.model, reqs, h)
        synchronize(dev)
        now = time.perf_counter()
        self._timed("prefill", now - start)
        for r, t in zip(reqs, next_ids):
            r.output_ids.append(int(t))
            r.prefill_time = now - start
            r.t_first_token = now

    @torch.inference_mode()
    def decode(self, reqs: List[Request]) -> None:
        """One token for every request of `reqs`."""
        start = time.perf_counter()
        dev, bs = self.tp.device, self.cfg.block_size
        last_ids, pos, new_slots, lengths = [], [], [], []
        for r in reqs:
            i = r.num_tokens - 1  # index of the token being fed
            last_ids.append(r.output_ids[-1])
            pos.append(i + r.delta)
            new_slots.append(r.blocks[i // bs] * bs + i % bs)
            lengths.append(r.num_tokens)
        if self.graphs is not None and self.sampler.capturable and all(r.params.greedy for r in reqs):
            next_ids = self.graphs.run(last_ids, pos, new_slots, [r.blocks for r in reqs], lengths)
        else:
            width = blocks_needed(max(lengths), bs)
            table = torch.tensor(
                [r.blocks[:width] + [0] * (width - len(r.blocks[:width])) for r in reqs], device=dev
            )  # [B, width]
            offs = torch.arange(width * bs, device=dev)
            mask = offs.unsqueeze(0) < torch.tensor(lengths, device=dev).unsqueeze(1)  # [B, width * bs]
            meta = AttnMetadata(
                prefill=False, slot_mapping=torch.tensor(new_slots, device=dev), block_table=table, context_mask=mask
            )
            input_ids = torch.tensor(last_ids, device=dev)  # [B]
            positions = torch.tensor(pos, device=dev).unsqueeze(0).expand(3, -1)  # [3, B]
            h = self.model(self.model.embed_inputs(input_ids, None, None), positions, meta, self.kv_cache)
            next_ids = self.sampler(self.model, reqs, h)
            synchronize(dev)
        elapsed = time.perf_counter() - start
        self._timed("decode", elapsed)
        for r, t in zip(reqs, next_ids):
            r.output_ids.append(int(t))
            r.decode_time += elapsed

    @torch.inference_mode()
    def prompt_logits(self, req: Request) -> torch.Tensor:
        """Full-vocabulary logits [prompt_len, vocab] of one prompt whose blocks are allocated
        (checks against a reference model)."""
        dev = self.tp.device
        self._positions(req)
        ids = torch.tensor(req.input_ids, device=dev)
        meta = AttnMetadata(
            prefill=True,
            slot_mapping=torch.tensor(slots_for(req.blocks, 0, len(req.input_ids), self.cfg.block_size), device=dev),
            cu_seqlens=torch.tensor([0, len(req.input_ids)], device=dev),
        )
        h = self.model(self._embed_with_vision(ids, [req]), req.positions.to(dev), meta, self.kv_cache)
        return self.model.full_logits(h).float()

    # ---- inputs -------------------------------------------------------------------------------
    def _positions(self, r: Request) -> None:
        """3-axis prompt positions and the decode delta of a request (computed once)."""
        if r.positions is None:
            mc = self.model_cfg
            img = r.image_grid_thw.tolist() if r.image_grid_thw is not None else []
            vid = r.video_grid_thw.tolist() if r.video_grid_thw is not None else []
            r.positions, r.delta = rope_index(
                r.input_ids, img, vid, mc.image_token_id, mc.video_token_id, mc.vision.spatial_merge_size
            )

    def _vision(self, reqs: List[Request]):
        """Vision embeddings for every image and video of `reqs`: (embeds [N, hidden], grid
        [n_media, 3], kind per media item), images of every request first, then videos."""
        pixels, grids, kinds = [], [], []
        for kind in ("image", "video"):
            for r in reqs:
                pv, grid = (
                    (r.pixel_values, r.image_grid_thw) if kind == "image" else (r.pixel_values_videos, r.video_grid_thw)
                )
                if pv is not None:
                    pixels.append(pv)
                    grids.append(grid)
                    kinds += [kind] * len(grid)
        if not pixels:
            return None
        start = time.perf_counter()
        dev = self.tp.device
        grid = torch.cat(grids).to(dev)
        embeds = self.model.visual(torch.cat(pixels).to(dev), grid)
        synchronize(dev)
        self._timed("vision", time.perf_counter() - start)
        return embeds, grid, kinds

    def _embed_with_vision(self, input_ids: torch.Tensor, reqs: List[Request]) -> torch.Tensor:
        """Token embeddings [T, hidden] with each placeholder row replaced by its vision embedding."""
        mc = self.model_cfg
        x = self.model.embed_inputs(input_ids, None, None)
        vision = self._vision(reqs)
        if vision is None:
            return x
        embeds, grid, kinds = vision
        merge2 = mc.vision.spatial_merge_size**2
        counts = (grid.prod(dim=1) // merge2).tolist()
        per_kind = {"image": [], "video": []}
        for chunk, kind in zip(embeds.split(counts), kinds):
            per_kind[kind].append(chunk)
        for kind, token in (("image", mc.image_token_id), ("video", mc.video_token_id)):
            if per_kind[kind]:
                mask = input_ids == token
                e = torch.cat(per_kind[kind])
                if int(mask.sum()) != e.shape[0]:
                    raise ValueError(f"{int(mask.sum())} {kind} placeholder tokens but {e.shape[0]} {kind} embeddings")
                x[mask] = e.to(x.dtype)
        return x
