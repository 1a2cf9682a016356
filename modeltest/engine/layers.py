"""Tensor-parallel building blocks. Each holds only this rank's shard of its weights.

Column-parallel layers split the output features (no communication); row-parallel layers split
the input features and all-reduce their output; the vocabulary-parallel embedding all-reduces
masked lookups; the LM head returns this rank's slice of the logits.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import TPContext


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


@functools.lru_cache(maxsize=None)
def onednn_packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack `dtype` weights on this CPU and its GEMM agrees with F.linear.

    Why pack: ATen's CPU F.linear re-reads a plain row-major weight in a layout its small-batch
    GEMM handles poorly; the same weight reordered once into oneDNN's blocked layout (what
    torch.compile's CPU freezing does) ran a decode step's GEMMs 1.7-2x faster here, at the same
    bytes, with bit-identical bf16 results. The ops are internal to PyTorch (used by inductor), so
    they are probed once and everything falls back to F.linear if they are missing or disagree.
    """
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(64, 48, generator=g).to(dtype)
        x = torch.randn(5, 48, generator=g).to(dtype)
        b = torch.randn(64, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class _Linear(nn.Module):
    """A weight that is either plain ([out, in], for F.linear) or packed for oneDNN (CPU)."""

    packed: Optional[torch.Tensor] = None

    def pack_for_cpu(self) -> bool:
        """Reorder the weight into oneDNN's layout and drop the plain copy. Call after loading."""
        w = self.weight
        if w.device.type != "cpu" or self.packed is not None or not onednn_packing_works(w.dtype):
            return False
        # The batch-size hint (8) only picks the blocking; any number of rows works afterwards.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.data.contiguous(), 8)
        # Release the plain weight (often a page-mapped view of the checkpoint): one copy stays.
        self.weight = _param((0,), w.dtype, w.device)
        return True

    def _matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class ColumnLinear(_Linear):
    """y = x W^T + b over this rank's output rows. x: [T, in] -> [T, out_local]."""

    def __init__(self, in_features: int, out_local: int, bias: bool, dtype, device):
        super().__init__()
        self.weight = _param((out_local, in_features), dtype, device)
        self.bias = _param((out_local,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class RowLinear(_Linear):
    """y = all_reduce(x_local W_local^T) + b. x: [T, in_local] -> [T, out]."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPContext, dtype, device):
        super().__init__()
        self.tp = tp
        self.weight = _param((out_features, in_local), dtype, device)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self._matmul(x, None))
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


class LMHead(_Linear):
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
        logits = self._matmul(h, None)
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
