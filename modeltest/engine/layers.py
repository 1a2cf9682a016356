"""Tensor-parallel building blocks. Each holds only this rank's shard of its weights.

Column-parallel layers split the output features (no communication); row-parallel layers split
the input features and all-reduce their output; the vocabulary-parallel embedding all-reduces
masked lookups; the LM head returns this rank's slice of the logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import TPContext


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class ColumnLinear(nn.Module):
    """y = x W^T + b over this rank's output rows. x: [T, in] -> [T, out_local]."""

    def __init__(self, in_features: int, out_local: int, bias: bool, dtype, device):
        super().__init__()
        self.weight = _param((out_local, in_features), dtype, device)
        self.bias = _param((out_local,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b. x: [T, in_local] -> [T, out]."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPContext, dtype, device):
        super().__init__()
        self.tp = tp
        self.weight = _param((out_features, in_local), dtype, device)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabEmbedding(nn.Module):
    """Rows [start, start + local) of the embedding table; padded rows (past the vocab) are zero."""

    def __init__(self, vocab: int, dim: int, tp: TPContext, dtype, device):
        super().__init__()
        self.tp = tp
        self.local = -(-vocab // tp.world_size)
        self.start = tp.rank * self.local
        self.weight = _param((self.local, dim), dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.start
        mask = (local_ids >= 0) & (local_ids < self.local)
        out = F.embedding(local_ids.clamp(0, self.local - 1), self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class LMHead(nn.Module):
    """Logits for this rank's vocabulary slice, [T, local]; padding entries are -inf."""

    def __init__(self, vocab: int, dim: int, tp: TPContext, dtype, device, tied: Optional[VocabEmbedding] = None):
        super().__init__()
        self.vocab = vocab
        self.local = -(-vocab // tp.world_size)
        self.start = tp.rank * self.local
        self.valid = max(0, min(self.local, vocab - self.start))
        self.tied = tied
        self.weight = tied.weight if tied is not None else _param((self.local, dim), dtype, device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.weight)
        if self.valid < self.local:
            logits[..., self.valid:] = float("-inf")
        return logits


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype, device)
        self.bias = _param((dim,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
