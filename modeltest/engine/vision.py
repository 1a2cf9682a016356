"""Qwen2-VL's vision tower, tensor parallel.

Why tensor parallel rather than data parallel: its 16 heads and 5120-wide MLP divide every
supported world size (1, 2, 4, 8), so its weights shard exactly like the language model's and
each rank holds 1/world of them; images of very different sizes cannot unbalance the ranks, and
no variable-size gather is needed. When the heads do not divide (tiny test shapes), the tower is
replicated and every rank computes it whole.

Attention is variable-length: each image, and each temporal slice of a video, attends only to
its own patches (no padding between them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import ColumnLinear, LayerNorm, RowLinear, Shard
from .loader import CheckpointReader, set_param
from .parallel import TPContext
from .rope import apply_vision_rope, vision_rope_cos_sin, vision_rotary_freqs

# Row chunk for the vision rope on CPU: its fp32 temporaries then stay in the cores' L2 (a
# [256, 2, 16, 80] fp32 chunk is 2.6 MB; a whole batch's are tens of MB, streamed from DRAM at
# every step). At mid textvqa shape, 8 blocks: 71 -> 43 ms (docs/perf/cpu_kernels.py). On
# accelerators one whole-tensor kernel is best.
CPU_ROW_CHUNK = 256


def _row_chunks(n: int, device: torch.device):
    step = CPU_ROW_CHUNK if device.type == "cpu" else max(n, 1)
    return ((i, min(i + step, n)) for i in range(0, n, step))


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), overwriting x (same roundings as the out-of-place form; on CPU each
    fresh [patches, 5120] buffer costs page faults, so in-place is several times faster).
    (Chunking it through an L2-sized temporary, as rope_qk_ does, measured 8.0 -> 7.4 ms: not kept.)"""
    y = x * 1.702
    torch.sigmoid_(y)
    return x.mul_(y)


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q and k of a fused qkv [N, 3, H, hd] in place (fp32 as the reference; cos, sin
    [N, 1, hd]), a row chunk at a time, q and k together."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, 1, hd]
    for i, j in _row_chunks(qkv.shape[0], qkv.device):
        qk = qkv[i:j, :2]  # [n, 2, H, hd]
        qk.copy_(apply_vision_rope(qk, cos[i:j], sin[i:j]))
    return qkv


def varlen_attention(q, k, v, cu_seqlens, causal: bool = False):
    """q, k, v: [N, H, d] packed sequences delimited by cu_seqlens -> [N, H, d].

    Consecutive sequences of equal length (the frame pairs of a video, same-size images) go to
    the kernel as one batch: fewer, larger calls (3x faster measured on CPU for 432-patch frames).
    """
    out = None
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    i = 0
    while i < len(lengths):
        j = i
        while j + 1 < len(lengths) and lengths[j + 1] == lengths[i]:
            j += 1
        n, length, start = j - i + 1, lengths[i], bounds[i]
        end = start + n * length
        h, d = q.shape[1], q.shape[2]

        def batch(x):  # [n*L, H, d] -> [n, H, L, d]
            return x[start:end].view(n, length, h, d).transpose(1, 2)

        o = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), is_causal=causal)
        o = o.transpose(1, 2).reshape(n * length, h, d)
        if start == 0 and end == q.shape[0]:
            return o  # one group holds every sequence: no copy into `out`
        if out is None:
            out = torch.empty_like(q)
        out[start:end] = o
        i = j + 1
    return out


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPContext, dtype, device):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.heads = cfg.num_heads // tp.world_size
        d, local = cfg.embed_dim, cfg.embed_dim // tp.world_size
        s = tp.rank * local
        m = cfg.mlp_dim // tp.world_size
        heads = Shard.span(s, s + local)
        mlp = Shard.span(tp.rank * m, (tp.rank + 1) * m)
        self.norm1 = LayerNorm(d, 1e-6, dtype, device)
        self.norm2 = LayerNorm(d, 1e-6, dtype, device)
        # qkv is stored fused [3d, d]: this rank's heads from each of q, k and v.
        qkv = Shard(tuple((j * d + s, j * d + s + local) for j in range(3)))
        self.qkv = ColumnLinear(d, [("qkv", qkv)], True, dtype, device)
        self.proj = RowLinear(heads, d, True, tp, dtype, device)
        self.fc1 = ColumnLinear(d, [("fc1", mlp)], True, dtype, device)
        self.fc2 = RowLinear(mlp, d, True, tp, dtype, device)

    def forward(self, x, cu_seqlens, cos, sin):
        n = x.shape[0]
        qkv = rope_qk_(self.qkv(self.norm1(x)).view(n, 3, self.heads, -1), cos, sin)
        q, k, v = qkv.unbind(1)  # each [N, h, d]
        attn = varlen_attention(q, k, v, cu_seqlens).reshape(n, -1)
        x = x.add_(self.proj(attn))
        return x.add_(self.fc2(quick_gelu_(self.fc1(self.norm2(x)))))

    def load(self, r: CheckpointReader, p: str):
        self.qkv.load(r, f"{p}.attn")
        self.proj.load(r, f"{p}.attn.proj")
        self.fc1.load(r, f"{p}.mlp")
        self.fc2.load(r, f"{p}.mlp.fc2")
        self.norm1.load(r, f"{p}.norm1")
        self.norm2.load(r, f"{p}.norm2")


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPContext, dtype, device):
        super().__init__()
        divides = cfg.num_heads % tp.world_size == 0 and cfg.mlp_dim % tp.world_size == 0
        self.tp = tp if divides else TPContext(rank=0, world_size=1, device=tp.device)  # replicated
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, dtype, device)
        self.blocks = nn.ModuleList(VisionBlock(cfg, self.tp, dtype, device) for _ in range(cfg.depth))
        self.merger = Merger(cfg, LayerNorm, dtype, device)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        # pixels: [N_patches, C*T*P*P] -> merged embeddings [N_patches / merge^2, hidden]
        x = self.patch_embed(pixels)
        freqs = vision_rotary_freqs(grid_thw, self.cfg.head_dim, self.cfg.spatial_merge_size, x.device)
        cos, sin = vision_rope_cos_sin(freqs)  # once for all blocks
        frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = F.pad(frame_sizes.cumsum(0), (1, 0))
        for blk in self.blocks:
            x = blk(x, cu_seqlens, cos, sin)
        return self.merger(x)

    def load(self, r: CheckpointReader, p: str = "visual"):
        self.patch_embed.load(r, p)
        for i, blk in enumerate(self.blocks):
            blk.load(r, f"{p}.blocks.{i}")
        self.merger.load(r, p)


class PatchEmbed(ColumnLinear):
    """The Conv3d patch embedding (stride == kernel): a matmul over flattened patches,
    [N, C*T*P*P] -> [N, embed]; every rank holds it whole. Both families' towers start with it."""

    def __init__(self, cfg: VisionConfig, dtype, device):
        patch_in = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        super().__init__(patch_in, [("proj", Shard.span(0, cfg.embed_dim))], False, dtype, device)
        self.embed_dim = cfg.embed_dim

    def load(self, r: CheckpointReader, p: str) -> None:
        # The Conv3d kernel [embed, C, T, P, P] flattened to the linear's [embed, C*T*P*P].
        set_param(self.weight, r.read(f"{p}.patch_embed.proj.weight").reshape(self.embed_dim, -1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return super().forward(pixels.to(self.weight.dtype))


class Merger(nn.Module):
    """norm, then Linear -> GELU -> Linear over each merged cell's merge² patch rows:
    [N, embed] -> [N / merge², hidden]. Small: every rank holds it whole. The norm is the family's
    (LayerNorm for Qwen2-VL, RMSNorm for Qwen2.5-VL)."""

    def __init__(self, cfg: VisionConfig, norm, dtype, device):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = norm(cfg.embed_dim, 1e-6, dtype, device)
        self.mlp0 = ColumnLinear(self.width, [("0", Shard.span(0, self.width))], True, dtype, device)
        self.mlp2 = ColumnLinear(self.width, [("2", Shard.span(0, cfg.hidden_size))], True, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp2(F.gelu(self.mlp0(self.ln_q(x).view(-1, self.width))))

    def load(self, r: CheckpointReader, p: str) -> None:
        self.ln_q.load(r, f"{p}.merger.ln_q")
        self.mlp0.load(r, f"{p}.merger.mlp")
        self.mlp2.load(r, f"{p}.merger.mlp")
