"""The vision tower's output per medium, kept for the next question on the same image or clip.

Keyed by the medium's content key (a hash of its grid and exact pixels: the processing options
are in both), bounded in bytes, least recently used first out. Every tensor-parallel rank sees
the same media in the same order and stores same-sized tensors, so all ranks hit and miss alike
(a miss runs the tower, whose collectives every rank must join).
"""

from __future__ import annotations

import collections
from typing import Optional

import torch


class VisionCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Optional[torch.Tensor]:
        e = self.entries.get(key)
        if e is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return e

    def put(self, key: str, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = embeds
        self.bytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
