"""Paged KV cache and its blocks.

The cache: per layer, K and V tensors of [num_blocks * block_size, kv_heads_local, head_dim],
handed out in fixed-size blocks. A sequence owns a list of blocks; token i of it lives in slot
blocks[i // block_size] * block_size + i % block_size.

The block pool (`BlockPool`) counts references, so a full block of a shared prompt prefix can be
read by several sequences at once (prefix cache). A full block computed by a prefill is known by
a hash of its tokens, of everything before it and of the media whose placeholders it holds
(`block_hashes`); when its last reader lets go it stays findable by that hash until its memory
is handed out again, least recently freed first (LRU).
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch


def blocks_needed(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(frozen=True)
class MediaSpan:
    """Where one medium's placeholder tokens lie in a prompt: [start, end), and its content key."""

    kind: str  # "image" | "video"
    index: int  # the medium's index among those of its kind (order of the grid rows)
    start: int
    end: int
    key: str


def block_hashes(tokens: Sequence[int], spans: Sequence[MediaSpan], block_size: int, known: List[bytes]) -> List[bytes]:
    """Hashes of the full blocks of `tokens`, extending `known` (the hashes of a shorter prefix of
    the same tokens). Block k's hash covers block k-1's hash, its own token ids and the content key
    of every medium whose placeholders it holds: two different images behind identical
    placeholder ids never share a block; the same clip at another fps has other pixels, so
    another key."""
    out = list(known)
    for k in range(len(out), len(tokens) // block_size):
        lo, hi = k * block_size, (k + 1) * block_size
        h = hashlib.blake2b(out[-1] if out else b"", digest_size=16)
        h.update(torch.tensor(tokens[lo:hi], dtype=torch.int64).numpy().tobytes())
        for s in spans:
            if s.start < hi and s.end > lo:
                h.update(f"|{s.kind}:{s.key}".encode())
        out.append(h.digest())
    return out


class BlockPool:
    def __init__(self, num_blocks: int, prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self.refs = [0] * num_blocks
        self.hash_of: List[Optional[bytes]] = [None] * num_blocks
        self.by_hash: Dict[bytes, int] = {}
        # Blocks no sequence holds, least recently freed first: handed out in this order, so a
        # cached block is evicted only after every block freed before it.
        self.free: "collections.OrderedDict[int, None]" = collections.OrderedDict((b, None) for b in range(num_blocks))
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (cached ones no sequence holds included)."""
        return len(self.free)

    def lookup(self, hashes: Sequence[bytes]) -> List[int]:
        """The cached blocks of the longest run of leading `hashes` (not yet taken)."""
        found = []
        if self.prefix_cache:
            for h in hashes:
                b = self.by_hash.get(h)
                if b is None:
                    break
                found.append(b)
        return found

    def take(self, blocks: Sequence[int]) -> None:
        """Add a reader to cached blocks found by `lookup`."""
        for b in blocks:
            if self.refs[b] == 0:
                del self.free[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> List[int]:
        """n fresh blocks, evicting the least recently freed cached ones first."""
        if n > len(self.free):
            raise RuntimeError(f"KV cache: {n} blocks requested, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            self._forget(b)
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop a reader from each block. A sequence's blocks go back last first, so its prefix —
        the part others are likeliest to share — stays cached longest."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None

    def register(self, block: int, h: bytes) -> bool:
        """Make a full block findable by its hash; False where it already is, or another block
        holds that hash (the first keeps it), or the prefix cache is off."""
        if not self.prefix_cache or h in self.by_hash or self.hash_of[block] is not None:
            return False
        self.by_hash[h] = block
        self.hash_of[block] = h
        return True

    def unregister(self, block: int) -> None:
        """A block whose computation failed: no longer findable."""
        if self.hash_of[block] is not None:
            del self.by_hash[self.hash_of[block]]
            self.hash_of[block] = None

    def _forget(self, b: int) -> None:
        if self.hash_of[b] is not None:
            self.evictions += 1
            self.unregister(b)

    @property
    def cached_blocks(self) -> int:
        return len(self.by_hash)


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
