"""Decode steps replayed as CUDA graphs.

A decode step of a 2B model is ~1,000 small kernels: launched one by one from Python it is bound
by the CPU, not the GPU. Capturing the whole step once per batch-size bucket and replaying it
removes that overhead. Shapes are made static: the batch is padded to its bucket (padding rows
write their K/V into a scratch block and read one slot of it), and every sequence reads a block
table of fixed width (the longest request the engine accepts), masked past its length.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .model import AttnMetadata


class DecodeGraphs:
    def __init__(
        self,
        model,
        kv_cache: List[torch.Tensor],
        max_batch: int,
        width: int,
        block_size: int,
        scratch_block: int,
        device: torch.device,
        compile_step: bool = False,
    ):
        self.model, self.kv_cache = model, kv_cache
        # Optionally let torch.compile fuse the step's element-wise kernels (norms, rotary,
        # softmax) before capture: fewer kernels per replay.
        self._forward = torch.compile(self._eager_forward, dynamic=False) if compile_step else self._eager_forward
        self.width, self.bs, self.scratch = width, block_size, scratch_block
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch} | {max_batch})
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.pos = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=device)
        self.table = torch.full((n, width), scratch_block, dtype=torch.long, device=device)
        self.lengths = torch.ones(n, dtype=torch.long, device=device)
        self.offs = torch.arange(width * block_size, device=device)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.pool = None
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._capture(b)

    def _eager_forward(self, ids, pos, slots, table, lengths) -> torch.Tensor:
        mask = self.offs.unsqueeze(0) < lengths.unsqueeze(1)
        meta = AttnMetadata(
            slot_mapping=slots, block_size=self.bs, num_decodes=len(ids), block_table=table, context_mask=mask
        )
        h = self.model(self.model.embed_inputs(ids, None, None), pos, meta, self.kv_cache)
        return self.model.greedy(h)

    def _step(self, b: int) -> torch.Tensor:
        return self._forward(self.ids[:b], self.pos[:, :b], self.slots[:b], self.table[:b], self.lengths[:b])

    @torch.inference_mode()
    def _capture(self, b: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and the allocator outside the graph
                self._step(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[b] = self._step(b)
        self.pool = graph.pool()
        self.graphs[b] = graph

    @torch.inference_mode()
    def run(
        self, ids: List[int], pos: List[int], slots: List[int], tables: List[List[int]], lengths: List[int]
    ) -> List[int]:
        n = len(ids)
        b = next(x for x in self.buckets if x >= n)
        self.ids[:n].copy_(torch.tensor(ids), non_blocking=True)
        self.pos[:, :n].copy_(torch.tensor(pos).unsqueeze(0).expand(3, -1), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(slots), non_blocking=True)
        self.slots[n:b].fill_(self.scratch * self.bs)
        padded = [t + [self.scratch] * (self.width - len(t)) for t in tables]
        self.table[:n].copy_(torch.tensor(padded), non_blocking=True)
        self.table[n:b].fill_(self.scratch)
        self.lengths[:n].copy_(torch.tensor(lengths), non_blocking=True)
        self.lengths[n:b].fill_(1)
        self.graphs[b].replay()
        return self.outputs[b][:n].tolist()
