"""Loads the model and its KV cache, builds each pass's tensors and runs it.

The runner knows nothing about admission: the scheduler hands it the requests of a pass, it
appends one token to each (prefill: the first token; decode: the next one) and records timings.
Decode passes replay CUDA graphs where they are on.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed

from ..device import synchronize
from ..errors import UserError
from .config import Qwen2VLConfig, checkpoint_stop_ids
from .grammar import GrammarMasks
from .kv_cache import allocate_cache, blocks_needed, bytes_per_token, slots_for
from .loader import CheckpointReader, ShapeMismatch
from .logits import adjust_logits
from .model import AttnMetadata, ChunkMeta, Qwen2VLModel
from .parallel import TPContext
from .request import Request, SamplingParams
from .rope import rope_index
from .scheduler import Chunk, ScheduledPass
from .vision_cache import VisionCache

STEP_TIMES_KEPT = 1 << 16
PROMPT_LOGIT_ROWS = 256  # prompt rows turned into full-vocabulary logits at once (log-likelihood requests)


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
    ranks. Other rows (sampling, logit adjustments, a grammar, logprobs): from the full logits —
    adjusted, then masked to what the request's grammar allows, then drawn with the request's seed
    (`sample_token`) or taken greedily — the same on every rank. Tests replace it with one that
    records logits."""

    capturable = True  # an all-greedy decode pass may replay a CUDA graph (same argmax inside)

    def __init__(self, grammars: GrammarMasks):
        self.grammars = grammars

    def __call__(self, model: Qwen2VLModel, reqs: List[Request], h: torch.Tensor) -> List[int]:
        full = [i for i, r in enumerate(reqs) if not plain_greedy(r.params)]
        if not full:
            return model.greedy(h).tolist()
        # Some row needs the whole vocabulary: the LM head runs once, over every row, and plain
        # greedy rows take their argmax from the same logits (the first maximum, as greedy picks).
        everything = model.full_logits(h).float()  # [B, vocab]
        out = everything.argmax(dim=-1).tolist()
        for i in full:
            row = everything[i]  # [vocab]
            r = reqs[i]
            chosen_from = adjust_logits(row, r) if r.params.adjusts_logits else row
            if r.params.grammar is not None:
                if r.matcher is None:
                    r.matcher = self.grammars.matcher(r.params.grammar)
                allowed = self.grammars.allowed(r.matcher).to(row.device)  # [vocab]
                chosen_from = torch.where(allowed, chosen_from, float("-inf"))
            if not r.params.greedy:
                out[i] = sample_token(chosen_from, r.params, step=len(r.output_ids))
            elif chosen_from is not row:
                out[i] = int(torch.argmax(chosen_from))
            if r.matcher is not None:
                r.matcher.consume_token(out[i])
        scored = [i for i in full if reqs[i].params.logprobs is not None]
        if scored:  # one log-softmax and one top-k over the rows that want logprobs
            tops = [reqs[i].params.logprobs for i in scored]
            chosen = [out[i] for i in scored]
            rows = everything if len(scored) == len(reqs) else everything[scored]
            for i, entry in zip(scored, token_logprobs(rows, chosen, tops)):
                reqs[i].output_logprobs.append(entry)
        return out


def plain_greedy(p: SamplingParams) -> bool:
    """Whether the argmax of the raw logits is all a token needs (a CUDA graph can run it)."""
    return p.greedy and p.logprobs is None and not p.adjusts_logits and p.grammar is None


def token_logprobs(logits: torch.Tensor, chosen: List[int], tops: List[int]):
    """Per row of fp32 logits [S, vocab]: (the logprob of its chosen token, its tops[s] most
    likely (id, logprob), most likely first) — the model's log-softmax, x - logsumexp(x): one
    reduction and one top-k over the logits, no [S, vocab] log-softmax written out."""
    lse = torch.logsumexp(logits, dim=-1)  # [S]
    picked = (logits.gather(1, torch.tensor(chosen, device=logits.device).unsqueeze(1)).squeeze(1) - lse).tolist()
    k = max(tops)
    if not k:
        return [(p, []) for p in picked]
    best = torch.topk(logits, k, dim=-1)
    values = (best.values - lse.unsqueeze(1)).tolist()
    return [(p, list(zip(i[:t], v[:t]))) for p, i, v, t in zip(picked, best.indices.tolist(), values, tops)]


@dataclass
class DecodeRows:
    """The decode rows of a pass, one per request: the token it feeds, that token's position and
    cache slot, the sequence's length; the block table and mask its attention reads."""

    ids: List[int] = field(default_factory=list)
    pos: List[int] = field(default_factory=list)
    slots: List[int] = field(default_factory=list)
    lengths: List[int] = field(default_factory=list)
    table: Optional[torch.Tensor] = None  # [B, width] cache blocks
    mask: Optional[torch.Tensor] = None  # [B, width * block_size] True where a slot is real

    @property
    def positions(self) -> torch.Tensor:
        return torch.tensor(self.pos, dtype=torch.long).unsqueeze(0).expand(3, -1)  # [3, B]


class ModelRunner:
    def __init__(self, cfg, tp: TPContext):
        """cfg: an EngineConfig (engine/engine.py)."""
        self.cfg, self.tp = cfg, tp
        if tp.device.type == "cpu":
            tune_cpu_allocator()
        self.model_cfg = Qwen2VLConfig.from_path(cfg.model_path)
        self.model = Qwen2VLModel(self.model_cfg, tp, cfg.dtype)
        pack = cfg.onednn_weights if cfg.onednn_weights is not None else tp.device.type == "cpu"
        reader = CheckpointReader(cfg.model_path)
        try:
            self.model.load(reader, pack_for_cpu=pack)
        except ShapeMismatch as e:
            raise UserError(
                f"{cfg.model_path}: tensor '{reader.last_read}': {e}: config.json does not describe these "
                "weights (a key it leaves out reads as transformers' default); correct config.json"
            ) from None
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
        self.sampler = Sampler(
            GrammarMasks(cfg.model_path, self.model_cfg.vocab_size, checkpoint_stop_ids(cfg.model_path))
        )
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
        self.vision_cache = VisionCache(cfg.vision_cache_mb << 20 if cfg.vision_cache else 0)
        self._vision_s = 0.0  # seconds of vision tower in the current pass

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
    def run(self, sp: ScheduledPass) -> None:
        """One forward pass: a token for each decoding request, the K/V of each prefill chunk (and
        a first token for each chunk that ends its prefill). A pass of decodes alone replays a CUDA
        graph where those are on."""
        if not sp.chunks:
            return self.decode(sp.decodes)
        start = time.perf_counter()
        self._vision_s = 0.0
        dev, bs = self.tp.device, self.cfg.block_size
        dec = self._decode_rows(sp.decodes)
        ids, positions, slots = list(dec.ids), [dec.positions], list(dec.slots)
        # keep: the rows whose hidden states are needed — each sampled row (sample_at indexes
        # them in keep) and the prompt rows of log-likelihood requests (scored)
        chunks, keep, row = [], list(range(len(sp.decodes))), len(sp.decodes)
        sample_at = list(range(len(sp.decodes)))
        scored: List[Tuple[Request, int, int, int]] = []  # (request, index in keep, first row's position, rows)
        for c in sp.chunks:
            r = c.request
            ids += r.all_ids[c.start : c.end]
            positions.append(self._positions(r, c.start, c.end))
            slots += slots_for(r.blocks, c.start, c.end, bs)
            blocks = torch.tensor(r.blocks[: blocks_needed(c.end, bs)], device=dev)
            chunks.append(ChunkMeta(row=row, start=c.start, end=c.end, blocks=blocks))
            if r.wants_prompt_logprobs:
                # the row at position p scores prompt token p + 1: those not scored yet (after a
                # preemption the prompt is prefilled again), up to the prompt's last token
                lo, hi = max(c.start, len(r.prompt_logprobs)), min(c.end, len(r.input_ids) - 1)
                if hi > lo:
                    scored.append((r, len(keep), lo, hi - lo))
                    keep += range(row + lo - c.start, row + hi - c.start)
            row += c.end - c.start
            if c.last:
                sample_at.append(len(keep))
                keep.append(row - 1)
        input_ids = torch.tensor(ids, device=dev)  # [T]
        x = self.model.embed_inputs(input_ids, None, None)  # [T, hidden]
        for c, m in zip(sp.chunks, chunks):
            self._fill_vision(x, m.row, c)
        meta = AttnMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            block_size=bs,
            num_decodes=len(sp.decodes),
            block_table=dec.table,
            context_mask=dec.mask,
            chunks=chunks,
        )
        h = self.model(
            x,
            torch.cat(positions, dim=1).to(dev),
            meta,
            self.kv_cache,
            keep=torch.tensor(keep, dtype=torch.long, device=dev),
        )
        sampled = sp.sampled
        for r, at, first, rows in scored:
            self._score_prompt(r, h[at : at + rows], first)
        if scored:
            h = h[sample_at]
        next_ids = self.sampler(self.model, sampled, h) if sampled else []
        synchronize(dev)
        now = time.perf_counter()
        self._timed("prefill", now - start)
        if self._vision_s:
            self._timed("vision", self._vision_s)
        for r in sp.decodes:
            r.decode_time += now - start
        for r, t in zip(sampled, next_ids):
            r.output_ids.append(int(t))
            if r.t_first_token is None:
                r.t_first_token = now
                r.prefill_time = now - r.t_admitted

    def _score_prompt(self, r: Request, h: torch.Tensor, first: int) -> None:
        """Logprobs of r's prompt tokens first + 1 .. first + len(h) from the hidden states h
        [rows, hidden] of positions first .. first + len(h) - 1, as token_logprobs gives them for
        generated tokens. In slices, so a long prompt never holds [prompt_len, vocab] fp32 logits
        at once."""
        top = r.params.prompt_logprobs
        for s in range(0, len(h), PROMPT_LOGIT_ROWS):
            logits = self.model.full_logits(h[s : s + PROMPT_LOGIT_ROWS]).float()  # [k, vocab]
            q = first + 1 + s
            r.prompt_logprobs += token_logprobs(logits, r.input_ids[q : q + len(logits)], [top] * len(logits))

    def _decode_rows(self, reqs: List[Request]) -> "DecodeRows":
        """Inputs of decode rows: each request feeds its last token (index num_tokens - 1)."""
        dev, bs = self.tp.device, self.cfg.block_size
        d = DecodeRows()
        for r in reqs:
            i = r.num_tokens - 1
            d.ids.append(r.output_ids[-1])
            d.pos.append(i + r.delta)
            d.slots.append(r.blocks[i // bs] * bs + i % bs)
            d.lengths.append(r.num_tokens)
        if reqs:
            width = blocks_needed(max(d.lengths), bs)
            d.table = torch.tensor(
                [r.blocks[:width] + [0] * (width - len(r.blocks[:width])) for r in reqs], device=dev
            )  # [B, width]
            offs = torch.arange(width * bs, device=dev)
            d.mask = offs.unsqueeze(0) < torch.tensor(d.lengths, device=dev).unsqueeze(1)  # [B, width * bs]
        return d

    @torch.inference_mode()
    def decode(self, reqs: List[Request]) -> None:
        """One token for every request of `reqs`."""
        start = time.perf_counter()
        dev = self.tp.device
        d = self._decode_rows(reqs)
        plain = all(plain_greedy(r.params) for r in reqs)
        if self.graphs is not None and self.sampler.capturable and plain:
            tables = [r.blocks for r in reqs]
            next_ids = self.graphs.run(d.ids, d.pos, d.slots, tables, d.lengths)
        else:
            meta = AttnMetadata(
                slot_mapping=torch.tensor(d.slots, device=dev),
                block_size=self.cfg.block_size,
                num_decodes=len(reqs),
                block_table=d.table,
                context_mask=d.mask,
            )
            input_ids = torch.tensor(d.ids, device=dev)  # [B]
            h = self.model(self.model.embed_inputs(input_ids, None, None), d.positions.to(dev), meta, self.kv_cache)
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
        dev, bs, n = self.tp.device, self.cfg.block_size, len(req.input_ids)
        self._vision_s = 0.0
        req.prefill_target = n
        chunk = Chunk(req, 0, n)
        meta = AttnMetadata(
            slot_mapping=torch.tensor(slots_for(req.blocks, 0, n, bs), device=dev),
            block_size=bs,
            chunks=[ChunkMeta(row=0, start=0, end=n, blocks=torch.tensor(req.blocks, device=dev))],
        )
        x = self.model.embed_inputs(torch.tensor(req.input_ids, device=dev), None, None)
        self._fill_vision(x, 0, chunk)
        h = self.model(x, self._positions(req, 0, n).to(dev), meta, self.kv_cache)
        return self.model.full_logits(h).float()

    # ---- inputs -------------------------------------------------------------------------------
    def _positions(self, r: Request, start: int, end: int) -> torch.Tensor:
        """[3, end - start] M-RoPE positions of tokens [start, end) of r's prompt and outputs
        (the prompt's computed once; generated tokens are text: index + delta on every axis)."""
        if r.positions is None:
            mc = self.model_cfg
            img = r.image_grid_thw.tolist() if r.image_grid_thw is not None else []
            vid = r.video_grid_thw.tolist() if r.video_grid_thw is not None else []
            r.positions, r.delta = rope_index(
                r.input_ids,
                img,
                vid,
                mc.image_token_id,
                mc.video_token_id,
                mc.vision.spatial_merge_size,
                second_per_grid_ts=r.second_per_grid_ts or (),
                tokens_per_second=mc.vision.tokens_per_second,
            )
        n = len(r.input_ids)
        pos = r.positions[:, start:end]
        if end > n:
            extra = torch.arange(max(start, n), end, dtype=pos.dtype) + r.delta
            pos = torch.cat([pos, extra.unsqueeze(0).expand(3, -1)], dim=1)
        return pos

    def _fill_vision(self, x: torch.Tensor, row: int, c: Chunk) -> None:
        """Put the vision embeddings of the media whose placeholders chunk c holds into its rows of
        x [T, hidden] (c's token i is row row + i - c.start). A medium's tower runs when the first
        chunk holding its placeholders does, at most once per request (and not at all when the
        vision cache has it)."""
        r = c.request
        for i, span in enumerate(r.spans):
            lo, hi = max(span.start, c.start), min(span.end, c.end)
            if lo >= hi:
                continue
            e = self._media_embeds(r, i)
            x[row + lo - c.start : row + hi - c.start] = e[lo - span.start : hi - span.start].to(x.dtype)

    def _media_embeds(self, r: Request, i: int) -> torch.Tensor:
        """[placeholders, hidden] vision embeddings of r's i-th medium (prompt order)."""
        if i in r.vision_embeds:
            return r.vision_embeds[i]
        span = r.spans[i]
        e = self.vision_cache.get(span.key)
        if e is None:
            pixels, grid = (
                (r.pixel_values, r.image_grid_thw)
                if span.kind == "image"
                else (r.pixel_values_videos, r.video_grid_thw)
            )
            rows = grid.prod(dim=1).tolist()
            first = sum(rows[: span.index])
            start = time.perf_counter()
            dev = self.tp.device
            # One medium per call: its embeddings are then the same whatever else is asked for.
            e = self.model.visual(
                pixels[first : first + rows[span.index]].to(dev), grid[span.index : span.index + 1].to(dev)
            )
            synchronize(dev)
            self._vision_s += time.perf_counter() - start
            self.vision_cache.put(span.key, e)
        r.vision_embeds[i] = e
        return e
