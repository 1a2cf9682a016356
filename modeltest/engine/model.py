"""Qwen2-VL and Qwen2.5-VL: the Qwen2 language model (GQA, M-RoPE, RMSNorm, SwiGLU) over a paged KV cache,
fed with text embeddings where vision placeholders are replaced by the vision tower's output
(Qwen2-VL's tower, vision.py, or Qwen2.5-VL's windowed one, vision_qwen2_5.py: the one difference
between the families' weights).

All activations are packed: T tokens of several sequences in one [T, hidden] tensor, with
`AttnMetadata` saying where each sequence starts (prefill) or which cache slots it reads (decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen2VLConfig
from .layers import ColumnLinear, LMHead, RMSNorm, RowLinear, Shard, VocabEmbedding, _Linear
from .loader import CheckpointReader
from .parallel import HeadLayout, TPContext, head_layout, split_range
from .rope import MRoPE, apply_rope
from .vision import VisionTower
from .vision_qwen2_5 import WindowedVisionTower


@dataclass
class ChunkMeta:
    """A prefill chunk in a pass: rows [row, row + end - start) are its tokens [start, end)."""

    row: int
    start: int
    end: int
    blocks: torch.Tensor  # [nb] the sequence's cache blocks covering [0, end)


@dataclass
class AttnMetadata:
    """A pass: decode rows first (one token per sequence), then prefill chunks."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    block_size: int
    num_decodes: int = 0
    block_table: Optional[torch.Tensor] = None  # [num_decodes, nb] cache blocks each decode reads
    context_mask: Optional[torch.Tensor] = None  # [num_decodes, nb * block_size] True where a slot is real
    chunks: List[ChunkMeta] = field(default_factory=list)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, group: int
) -> torch.Tensor:
    """One new query per sequence against its cached keys, grouped-query without copying KV heads.

    q: [B, nq, hd]; keys/values: [B, L, nkv, hd]; mask: [B, L] (True = real) -> [B, nq, hd].
    Plain batched matmuls: SDPA's fused CPU kernel is slow for a single query row with a mask.
    """
    b, nq, hd = q.shape
    nkv = keys.shape[2]
    qg = q.view(b, nkv, group, hd)  # [B, nkv, g, hd]
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float()  # [B, nkv, g, L]
    scores.mul_(hd**-0.5).masked_fill_(~mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, values.transpose(1, 2)).reshape(b, nq, hd)  # [B, nkv, g, hd]


def block_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int) -> torch.Tensor:
    """Causal attention of one block's queries: q [H, r, hd] at positions first .. first + r - 1
    over keys/values [H, L, hd] of positions 0 .. L - 1 (L = first + r) -> [H, r, hd]."""
    r, length = q.shape[1], keys.shape[1]
    pos = torch.arange(first, first + r, device=q.device)
    allowed = torch.arange(length, device=q.device).unsqueeze(0) <= pos.unsqueeze(1)  # [r, L]
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=allowed)[0]


def chunk_attention(q, k_cache, v_cache, chunk: ChunkMeta, block_size: int, group: int) -> torch.Tensor:
    """A prefill chunk's attention over the cache (its own K/V already written): q [n, nq, hd].

    Computed a block of queries at a time, each over exactly the keys up to its block's end. A
    block's result then depends on its tokens and the keys before it only — not on which pass
    it is in, how the prompt was chunked, or whether the blocks before it were computed now or
    found in the prefix cache: cached K/V are bit-identical to what a fresh prefill computes.
    (A fused kernel per block: one [r, L] mask, no [r, L] scores kept; as fast as one causal
    call over the whole prompt on CPU, measured at 4,480 tokens.)"""
    nkv, hd = k_cache.shape[1], k_cache.shape[2]
    nb = -(-chunk.end // block_size)

    def gather(cache):  # [nb * bs, nkv, hd] -> [nq, nb * bs, hd] (KV heads repeated per group)
        x = cache.view(-1, block_size, nkv, hd)[chunk.blocks[:nb]].view(nb * block_size, nkv, hd).transpose(0, 1)
        return x.repeat_interleave(group, 0) if group > 1 else x

    keys, vals = gather(k_cache), gather(v_cache)
    qt = q.transpose(0, 1)  # [nq, n, hd]
    out = []
    for lo in range(chunk.start, chunk.end, block_size):
        hi = min(lo + block_size, chunk.end)
        out.append(block_attention(qt[:, lo - chunk.start : hi - chunk.start], keys[:, :hi], vals[:, :hi], lo))
    return (out[0] if len(out) == 1 else torch.cat(out, dim=1)).transpose(0, 1)  # [n, nq, hd]


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig, layout: HeadLayout, tp: TPContext, dtype, device):
        super().__init__()
        self.layout, self.hd = layout, cfg.head_dim
        self.nq, self.nkv = layout.num_q, layout.num_kv
        hd = self.hd
        # This rank's query heads (None: a zero padding head) and KV heads, as checkpoint rows.
        q = Shard(tuple((h * hd, (h + 1) * hd) if h is not None else None for h in layout.q_heads), pad=hd)
        kv = Shard(tuple((h * hd, (h + 1) * hd) for h in layout.kv_heads))
        self.qkv = ColumnLinear(cfg.hidden_size, [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], True, dtype, device)
        self.o_proj = RowLinear(q, cfg.hidden_size, False, tp, dtype, device)

    def forward(self, x, cos, sin, meta: AttnMetadata, k_cache, v_cache, keep=None):
        t = x.shape[0]
        q, k, v = self.qkv(x).split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = apply_rope(q.view(t, self.nq, self.hd), cos, sin)  # [T, nq, hd]
        k = apply_rope(k.view(t, self.nkv, self.hd), cos, sin)  # [T, nkv, hd]
        v = v.view(t, self.nkv, self.hd)
        # Every row's K/V goes in before any row attends: a chunk may read blocks another
        # chunk of this same pass writes (a prefix shared within the pass).
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        group = self.nq // self.nkv
        parts = []
        d = meta.num_decodes
        if d:
            # Gather whole blocks (contiguous copies) rather than token by token.
            b, nb = meta.block_table.shape
            bs = meta.context_mask.shape[1] // nb
            keys = k_cache.view(-1, bs, self.nkv, self.hd)[meta.block_table].view(b, nb * bs, self.nkv, self.hd)
            vals = v_cache.view(-1, bs, self.nkv, self.hd)[meta.block_table].view(b, nb * bs, self.nkv, self.hd)
            parts.append(decode_attention(q[:d], keys, vals, meta.context_mask, group))
        for c in meta.chunks:
            parts.append(
                chunk_attention(q[c.row : c.row + c.end - c.start], k_cache, v_cache, c, meta.block_size, group)
            )
        out = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(t, self.nq * self.hd)
        return self.o_proj(out if keep is None else out[keep])

    def load(self, r: CheckpointReader, p: str):
        self.qkv.load(r, p)
        self.o_proj.load(r, f"{p}.o_proj")


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig, tp: TPContext, dtype, device):
        super().__init__()
        rows = split_range(cfg.intermediate_size, tp.world_size, tp.rank)
        held = Shard.span(rows.start, rows.stop)
        self.gate_up = ColumnLinear(cfg.hidden_size, [("gate_proj", held), ("up_proj", held)], False, dtype, device)
        self.down = RowLinear(held, cfg.hidden_size, False, tp, dtype, device)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate).mul_(up))

    def load(self, r: CheckpointReader, p: str):
        self.gate_up.load(r, p)
        self.down.load(r, f"{p}.down_proj")


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layout, tp, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, layout, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, tp, dtype, device)

    def forward(self, x, cos, sin, meta, k_cache, v_cache, keep=None):
        # keep: rows whose output is needed (None: all). Every row's K/V still goes to the cache.
        a = self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache, keep)
        x = (x if keep is None else x[keep]) + a
        return x.add_(self.mlp(self.post_attention_layernorm(x)))

    def load(self, r, p):
        self.input_layernorm.load(r, f"{p}.input_layernorm")
        self.post_attention_layernorm.load(r, f"{p}.post_attention_layernorm")
        self.self_attn.load(r, f"{p}.self_attn")
        self.mlp.load(r, f"{p}.mlp")


def _pack(module: nn.Module) -> int:
    return sum(m.pack_for_cpu() for m in module.modules() if isinstance(m, _Linear))


class Qwen2VLModel(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig, tp: TPContext, dtype: torch.dtype):
        super().__init__()
        device = tp.device
        self.cfg, self.tp, self.dtype = cfg, tp, dtype
        self.layout = head_layout(cfg.num_attention_heads, cfg.num_key_value_heads, tp.world_size, tp.rank)
        self.embed = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.layout, tp, dtype, device) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = LMHead(
            cfg.vocab_size, cfg.hidden_size, tp, dtype, device, tied=self.embed if cfg.tie_word_embeddings else None
        )
        tower = WindowedVisionTower if cfg.vision.windowed else VisionTower
        self.visual = tower(cfg.vision, tp, dtype, device)
        self.rope = MRoPE(cfg.head_dim, cfg.rope_theta, cfg.mrope_section, device)
        # This rank's slice of the checkpoint, from the shapes (packing changes what is held).
        self.shard_bytes = sum(p.numel() * p.element_size() for p in self.parameters())

    def decode_weight_bytes(self) -> int:
        """Bytes of the weights one decode step reads: every layer, the final norm and the LM
        head, plain or packed (the embedding table is only indexed, the vision tower idle)."""

        def held(m: nn.Module) -> int:  # m's own weights, not its children's (the tied table)
            n = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            packed = getattr(m, "packed", None)
            return n + (packed.numel() * packed.element_size() if packed is not None else 0)

        return sum(held(m) for layer in self.layers for m in layer.modules()) + held(self.norm) + held(self.lm_head)

    def load(self, r: CheckpointReader, pack_for_cpu: bool = False) -> None:
        """Load this rank's weights; with pack_for_cpu, put every linear weight into oneDNN's
        layout as it arrives (layers.py says why), so the load never holds two copies of much.

        A tied embedding table stays plain for lookups. Packing the head reads all of it, so it
        is mapped afresh right after (only looked-up rows come back into memory), and before
        any layer is loaded: the peak stays near one shard."""
        self.embed.load(r, "model.embed_tokens.weight")
        if not self.cfg.tie_word_embeddings:
            self.lm_head.load(r, "lm_head.weight")
        if pack_for_cpu and self.lm_head.pack_for_cpu() and self.cfg.tie_word_embeddings:
            self.embed.load(r, "model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            layer.load(r, f"model.layers.{i}")
            if pack_for_cpu:
                _pack(layer)
        self.norm.load(r, "model.norm")
        self.visual.load(r, "visual")
        # The tower's GEMMs have hundreds to thousands of rows: in fp32 ATen's own GEMM is at
        # least as fast there (Qwen2-VL `mid` tower, 448x448 image, AVX2: 700 ms plain, 760 ms
        # packed; Qwen2.5-VL equal), so only low-precision towers are packed (bf16: 2-3x).
        if pack_for_cpu and self.dtype != torch.float32:
            _pack(self.visual)

    def embed_inputs(
        self, input_ids: torch.Tensor, vision_embeds: Optional[torch.Tensor], vision_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        if vision_embeds is not None:
            x[vision_mask] = vision_embeds.to(x.dtype)
        return x

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttnMetadata,
        kv_cache: List[torch.Tensor],
        keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [T, hidden] embeddings; positions: [3, T] -> final-norm hidden states [T, hidden],
        or [len(keep), hidden] for the rows in `keep` only. A prefill needs just each prompt's
        last row: the last layer then runs its output projection and MLP on those rows alone
        (the cache only needs that layer's K/V, which come before them)."""
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, meta, kv_cache[2 * i], kv_cache[2 * i + 1], keep if i == last else None)
        return self.norm(x)

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] gathered from every rank (tests and debugging)."""
        return self.tp.all_gather_last_dim(self.lm_head(h))[..., : self.cfg.vocab_size]

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """[B, hidden] -> [B] argmax token ids without gathering the whole vocabulary: each rank
        sends its best (value, id); the first maximum wins, as a full argmax would pick it."""
        best, idx = self.lm_head(h).float().max(dim=-1)
        if self.tp.world_size == 1:
            return idx
        idx = idx + self.lm_head.start
        values = self.tp.all_gather_stack(best)  # [W, B]
        ids = self.tp.all_gather_stack(idx)  # [W, B]
        winner = values.argmax(dim=0)  # first rank with the maximum
        return ids.gather(0, winner.unsqueeze(0)).squeeze(0)
