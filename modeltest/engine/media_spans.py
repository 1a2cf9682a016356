"""Which prompt rows belong to which medium, and what identifies a medium's content.

The prefix cache and the vision cache key a medium by its *content*: a hash of its grid and of
the exact pixel values the model gets (`content_keys`). Placeholder token ids say nothing about
content (every image's placeholders are the same id), so they alone must never decide reuse.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import torch

from .kv_cache import MediaSpan


def content_keys(kind: str, pixels: Optional[torch.Tensor], grid: Optional[torch.Tensor]) -> List[str]:
    """One key per medium of `kind`: pixels [N, C*t*p*p] holds grid [n, 3]'s media one after another."""
    if grid is None:
        return []
    keys, start = [], 0
    for thw in grid.tolist():
        rows = thw[0] * thw[1] * thw[2]
        chunk = pixels[start : start + rows].contiguous()
        start += rows
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{kind}:{thw}:{chunk.dtype}:{tuple(chunk.shape)}".encode())
        h.update(chunk.view(torch.uint8).numpy().tobytes() if chunk.numel() else b"")
        keys.append(h.hexdigest())
    return keys


def media_spans(
    input_ids: Sequence[int],
    grids: dict,
    keys: dict,
    token_ids: dict,
    merge: int,
) -> List[MediaSpan]:
    """Spans of every medium, in prompt order. grids / keys / token_ids: per kind ("image",
    "video"), the [n, 3] grid (or None), the content keys, the placeholder token id. Raises
    ValueError when the placeholders do not match the grids (the prompt and media disagree)."""
    spans = []
    for kind in ("image", "video"):
        grid = grids.get(kind)
        rows = [i for i, t in enumerate(input_ids) if t == token_ids[kind]]
        counts = [] if grid is None else [t * h * w // (merge * merge) for t, h, w in grid.tolist()]
        if sum(counts) != len(rows):
            raise ValueError(f"{len(rows)} {kind} placeholder tokens but {sum(counts)} {kind} embeddings")
        at = 0
        for index, (n, key) in enumerate(zip(counts, keys[kind])):
            first, last = rows[at], rows[at + n - 1]
            if last - first + 1 != n:
                raise ValueError(f"{kind} {index}'s placeholder tokens are not contiguous")
            spans.append(MediaSpan(kind, index, first, last + 1, key))
            at += n
    return sorted(spans, key=lambda s: s.start)
