"""Rotary embeddings: M-RoPE for the language model, 2-D rotary for the vision tower, and the
3-axis position ids of a multimodal prompt."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MRoPE:
    """cos/sin for 3-axis positions. Channel sections [t, h, w] (e.g. [16, 24, 24]) take their
    angle from the temporal, height and width position respectively."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int], device):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        self.sections = list(mrope_section) * 2

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        # positions: [3, T] -> cos, sin: [T, head_dim]
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [3, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [3, T, hd]
        cos, sin = emb.cos(), emb.sin()
        cos = torch.cat([c[i % 3] for i, c in enumerate(cos.split(self.sections, dim=-1))], dim=-1)
        sin = torch.cat([s[i % 3] for i, s in enumerate(sin.split(self.sections, dim=-1))], dim=-1)
        # Cast before use, as the reference implementation does: bf16 runs round the same way.
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, hd]; cos/sin: [T, hd]
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def vision_rotary_freqs(grid_thw: torch.Tensor, head_dim: int, merge: int, device) -> torch.Tensor:
    """Angles [N_patches, head_dim/2] for (h, w) patch positions, in the processor's patch order
    (2x2 merge windows contiguous), repeated for every temporal slice."""
    dim = head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1)
        hpos = hpos.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
        wpos = wpos.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
        pos.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    pos = torch.cat(pos).to(device)  # [N, 2]
    max_grid = int(grid_thw[:, 1:].max())
    table = torch.outer(torch.arange(max_grid, device=device, dtype=torch.float32), inv_freq)
    return table[pos].flatten(1)  # [N, head_dim/2]


def vision_rope_cos_sin(freqs: torch.Tensor):
    """freqs [N, hd/2] -> cos, sin [N, 1, hd] in fp32 (computed once per vision forward)."""
    return freqs.cos().repeat(1, 2).unsqueeze(1), freqs.sin().repeat(1, 2).unsqueeze(1)


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, H, hd]; computed in fp32 as the reference does.
    xf = x.float()
    out = rotate_half(xf).mul_(sin)
    return out.add_(xf.mul_(cos)).to(x.dtype)


def temporal_index(t: int, second_per_grid: Optional[float], tokens_per_second: float) -> torch.Tensor:
    """[t] temporal positions of a medium's t frame groups (before the offset).

    Qwen2-VL (tokens_per_second 0): 0, 1, 2, ... Qwen2.5-VL numbers a video's groups by time:
    floor(i * second_per_grid * tokens_per_second), second_per_grid = temporal patch size / the
    sampled fps (2 / 0.5 = 4 s at fps 0.5, so 0, 8, 16, ... at 2 tokens per second); an image's
    single group is 0. Computed in float32 in this order, as the original implementation
    (transformers 4.49-4.57) and vLLM compute it, so the truncation agrees with theirs."""
    if not tokens_per_second or second_per_grid is None:
        return torch.arange(t)
    seconds = torch.tensor(second_per_grid, dtype=torch.float32)
    return (torch.arange(t) * seconds * tokens_per_second).long()


def rope_index(
    input_ids: List[int],
    image_grids: List[Tuple[int, int, int]],
    video_grids: List[Tuple[int, int, int]],
    image_token: int,
    video_token: int,
    merge: int,
    second_per_grid_ts: Sequence[float] = (),
    tokens_per_second: float = 0.0,
) -> Tuple[torch.Tensor, int]:
    """3-axis positions [3, T] of one prompt and its decode delta.

    Text advances all three axes together; a vision segment of (t, h, w) merged patches gets
    (t_index, h_index, w_index) offset by the position after the preceding text (t_index:
    `temporal_index`, with the video's second_per_grid_ts entry — 1.0 where none is given, as
    transformers assumes); text after it resumes at the segment's max + 1. Decoding token i is at
    position i + delta on every axis.

    (transformers 5 resumes the text at offset + max(h, w) instead, whatever the temporal
    extent: the same place unless a video's time positions outrun its grid side. The original
    implementations — transformers 4.x, vLLM — take the max; so does this.)
    """
    parts: List[torch.Tensor] = []
    images, videos = iter(image_grids), iter(video_grids)
    seconds = iter(second_per_grid_ts)
    next_pos = 0
    i, n = 0, len(input_ids)
    while i < n:
        tok = input_ids[i]
        if tok == image_token or tok == video_token:
            t, h, w = next(images) if tok == image_token else next(videos)
            second = (next(seconds, 1.0) if tok == video_token else None) if tokens_per_second else None
            h, w = h // merge, w // merge
            ti = temporal_index(t, second, tokens_per_second).view(-1, 1).expand(-1, h * w).flatten()
            hi = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
            wi = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
            parts.append(torch.stack([ti, hi, wi]) + next_pos)
            next_pos = int(parts[-1].max()) + 1
            i += t * h * w
        else:
            j = i
            while j < n and input_ids[j] not in (image_token, video_token):
                j += 1
            parts.append(torch.arange(next_pos, next_pos + j - i).view(1, -1).expand(3, -1))
            next_pos += j - i
            i = j
    positions = torch.cat(parts, dim=1)
    return positions, next_pos - n
