"""Tensor-parallel building blocks. Each holds only this rank's shard of its weights, knows
which slice of the checkpoint that is (`Shard`) and loads it itself (`load`).

Column-parallel layers split the output features (no communication); row-parallel layers split
the input features and all-reduce their output; the vocabulary-parallel embedding all-reduces
masked lookups; the LM head returns this rank's slice of the logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .loader import Block, CheckpointReader, set_param
from .parallel import TPContext


@dataclass(frozen=True)
class Shard:
    """The part of one checkpoint dimension a rank holds: [start, end) blocks in order; a None
    block is `pad` zero entries (padded query heads, vocabulary padding)."""

    blocks: Tuple[Block, ...]
    pad: int = 0

    @classmethod
    def span(cls, start: int, end: int) -> "Shard":
        return cls(((start, end),))

    @property
    def size(self) -> int:
        return sum(b[1] - b[0] if b is not None else self.pad for b in self.blocks)


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
    """y = x W^T + b over this rank's output rows. x: [T, in] -> [T, out_local].

    `parts`: (checkpoint name suffix, rows held) per source tensor, concatenated in order — one
    for a plain layer, several for a fused one (q/k/v, gate/up)."""

    def __init__(self, in_features: int, parts: Sequence[Tuple[str, Shard]], bias: bool, dtype, device):
        super().__init__()
        self.parts = tuple(parts)
        out_local = sum(shard.size for _, shard in self.parts)
        self.weight = _param((out_local, in_features), dtype, device)
        self.bias = _param((out_local,), dtype, device) if bias else None

    def load(self, r: CheckpointReader, prefix: str) -> None:
        for what in ("weight", "bias") if self.bias is not None else ("weight",):
            rows = [r.read(f"{prefix}.{name}.{what}", shard.blocks, dim=0, pad=shard.pad) for name, shard in self.parts]
            set_param(getattr(self, what), rows[0] if len(rows) == 1 else torch.cat(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class RowLinear(_Linear):
    """y = all_reduce(x_local W_local^T) + b. x: [T, in_local] -> [T, out]; `shard`: the input
    columns this rank holds."""

    def __init__(self, shard: Shard, out_features: int, bias: bool, tp: TPContext, dtype, device):
        super().__init__()
        self.tp, self.shard = tp, shard
        self.weight = _param((out_features, shard.size), dtype, device)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def load(self, r: CheckpointReader, name: str) -> None:
        set_param(self.weight, r.read(f"{name}.weight", self.shard.blocks, dim=1, pad=self.shard.pad))
        if self.bias is not None:
            set_param(self.bias, r.read(f"{name}.bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self._matmul(x, None))
        return y + self.bias if self.bias is not None else y


def vocab_shard(vocab: int, tp: TPContext) -> Tuple[int, int, Shard]:
    """(rows per rank, this rank's first row, its Shard): the vocabulary split evenly, the last
    rank's rows past the vocabulary padded with zeros."""
    local = -(-vocab // tp.world_size)
    start = tp.rank * local
    held = max(0, min(local, vocab - start))
    blocks = ((start, start + held),) if held else ()
    return local, start, Shard(blocks + ((None,) if held < local else ()), pad=local - held)


class VocabEmbedding(nn.Module):
    """Rows [start, start + local) of the embedding table; padded rows (past the vocab) are zero."""

    def __init__(self, vocab: int, dim: int, tp: TPContext, dtype, device):
        super().__init__()
        self.tp = tp
        self.local, self.start, self.shard = vocab_shard(vocab, tp)
        self.weight = _param((self.local, dim), dtype, device)

    def load(self, r: CheckpointReader, name: str) -> None:
        set_param(self.weight, r.read(name, self.shard.blocks, dim=0, pad=self.shard.pad))

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
        self.local, self.start, self.shard = vocab_shard(vocab, tp)
        self.valid = max(0, min(self.local, vocab - self.start))
        self.tied = tied
        self.weight = tied.weight if tied is not None else _param((self.local, dim), dtype, device)

    def load(self, r: CheckpointReader, name: str = "lm_head.weight") -> None:
        """Its own rows (an untied head; a tied one shares the embedding's)."""
        set_param(self.weight, r.read(name, self.shard.blocks, dim=0, pad=self.shard.pad))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._matmul(h, None)
        if self.valid < self.local:
            logits[..., self.valid :] = float("-inf")
        return logits


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype, device)

    def load(self, r: CheckpointReader, name: str) -> None:
        set_param(self.weight, r.read(f"{name}.weight"))

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

    def load(self, r: CheckpointReader, name: str) -> None:
        set_param(self.weight, r.read(f"{name}.weight"))
        set_param(self.bias, r.read(f"{name}.bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
