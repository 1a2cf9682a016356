"""Qwen2.5-VL's vision tower, tensor parallel: Qwen2-VL's patch embedding and 2-D rotary, with
RMSNorm, a gated SiLU MLP, and attention within windows of `window_size` pixels except in the
blocks listed in `fullatt_block_indexes` (those attend within whole frames, as Qwen2-VL's do).

The patch rows are put in window order once, before the first block (vision_windows.py), so every
window is a contiguous run of rows for varlen attention; a full-attention block's frames are
contiguous in that order too (windows never cross frames). The merger runs on the permuted rows —
each merged cell's 4 patches stay together — and its output goes back to the processor's order.

Tensor parallel as Qwen2-VL's tower: heads split when they divide the world size (else the tower is
replicated); the MLP's intermediate rows are split as evenly as they go (3420 rows do not divide
by 8), which a row-parallel sum does not mind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import ColumnLinear, RMSNorm, RowLinear, Shard
from .loader import CheckpointReader
from .parallel import TPContext
from .rope import vision_rope_cos_sin, vision_rotary_freqs
from .vision import Merger, PatchEmbed, rope_qk_, varlen_attention
from .vision_windows import vision_windows


def even_rows(n: int, world: int, rank: int) -> Shard:
    """This rank's part of n rows split as evenly as they go (sizes differ by at most one)."""
    return Shard.span(rank * n // world, (rank + 1) * n // world)


class WindowedVisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPContext, dtype, device):
        super().__init__()
        self.heads = cfg.num_heads // tp.world_size
        d, local = cfg.embed_dim, cfg.embed_dim // tp.world_size
        s = tp.rank * local
        mlp = even_rows(cfg.mlp_dim, tp.world_size, tp.rank)
        self.norm1 = RMSNorm(d, 1e-6, dtype, device)
        self.norm2 = RMSNorm(d, 1e-6, dtype, device)
        qkv = Shard(tuple((j * d + s, j * d + s + local) for j in range(3)))  # fused [3d, d]: q, k, v
        self.qkv = ColumnLinear(d, [("qkv", qkv)], True, dtype, device)
        self.proj = RowLinear(Shard.span(s, s + local), d, True, tp, dtype, device)
        self.gate_up = ColumnLinear(d, [("gate_proj", mlp), ("up_proj", mlp)], True, dtype, device)
        self.down = RowLinear(mlp, d, True, tp, dtype, device)

    def forward(self, x, cu_seqlens, cos, sin):
        # x: [N, d] patch rows in window order; cu_seqlens: [S + 1] the attention groups' bounds
        n = x.shape[0]
        qkv = rope_qk_(self.qkv(self.norm1(x)).view(n, 3, self.heads, -1), cos, sin)
        q, k, v = qkv.unbind(1)  # each [N, h, hd]
        x = x + self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def load(self, r: CheckpointReader, p: str):
        self.qkv.load(r, f"{p}.attn")
        self.proj.load(r, f"{p}.attn.proj")
        self.gate_up.load(r, f"{p}.mlp")
        self.down.load(r, f"{p}.mlp.down_proj")
        self.norm1.load(r, f"{p}.norm1")
        self.norm2.load(r, f"{p}.norm2")


class WindowedVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPContext, dtype, device):
        super().__init__()
        divides = cfg.num_heads % tp.world_size == 0
        self.tp = tp if divides else TPContext(rank=0, world_size=1, device=tp.device)  # replicated
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, dtype, device)
        self.blocks = nn.ModuleList(WindowedVisionBlock(cfg, self.tp, dtype, device) for _ in range(cfg.depth))
        self.merger = Merger(cfg, RMSNorm, dtype, device)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        # pixels: [N_patches, C*T*P*P] (processor order) -> merged embeddings [N_patches / merge², hidden]
        cfg = self.cfg
        unit = cfg.spatial_merge_size**2
        order, cu_windows = vision_windows(grid_thw.tolist(), cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        order, cu_windows = order.to(pixels.device), cu_windows.to(pixels.device)

        def windowed(t: torch.Tensor) -> torch.Tensor:  # [N, ...] rows -> the same rows in window order
            return t.reshape(-1, unit, *t.shape[1:])[order].reshape(t.shape)

        x = windowed(self.patch_embed(pixels))  # [N, embed]
        freqs = vision_rotary_freqs(grid_thw, cfg.head_dim, cfg.spatial_merge_size, x.device)
        cos, sin = (windowed(c) for c in vision_rope_cos_sin(freqs))  # [N, 1, hd] each, once for all blocks
        frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_frames = F.pad(frame_sizes.cumsum(0), (1, 0))
        full = set(cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_frames if i in full else cu_windows, cos, sin)
        return self.merger(x)[torch.argsort(order)]  # [cells, hidden], back in the placeholders' order

    def load(self, r: CheckpointReader, p: str = "visual"):
        self.patch_embed.load(r, p)
        for i, blk in enumerate(self.blocks):
            blk.load(r, f"{p}.blocks.{i}")
        self.merger.load(r, p)
