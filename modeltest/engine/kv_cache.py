"""Paged KV cache: per layer, K and V tensors of [num_blocks * block_size, kv_heads_local, head_dim],
handed out in fixed-size blocks. A sequence owns a list of blocks; token i of it lives in slot
blocks[i // block_size] * block_size + i % block_size."""

from __future__ import annotations

from typing import List

import torch


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: List[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> List[int]:
        if n > len(self.free):
            raise RuntimeError(f"KV cache: {n} blocks requested, {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def release(self, blocks: List[int]) -> None:
        self.free.extend(reversed(blocks))


def blocks_needed(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def allocate_cache(
    num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device
) -> List[torch.Tensor]:
    """[k0, v0, k1, v1, ...], each [num_blocks * block_size, kv_heads, head_dim], allocated once."""
    shape = (num_blocks * block_size, kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def slots_for(blocks: List[int], start: int, end: int, block_size: int) -> List[int]:
    return [blocks[i // block_size] * block_size + i % block_size for i in range(start, end)]
