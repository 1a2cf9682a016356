"""torch.distributed set-up under torchrun, and how attention heads are laid out across ranks.

One process per device. HCCL on NPU, NCCL on CUDA, gloo on CPU. Without torchrun (no
WORLD_SIZE in the environment) everything runs as a single rank with no process group.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from ..device import distributed_backend
from ..errors import UserError


@dataclass
class TPContext:
    """This process's place in its tensor-parallel group (one model replica)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: Optional[object] = None  # the replica's process group (None: the default group)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., world * n] in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """[...] on each rank -> [world, ...]."""
        if self.world_size == 1:
            return x.unsqueeze(0)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.stack(parts)


@dataclass
class ParallelContext:
    """Where this process sits: world = dp replicas x tp ranks; replica r holds global ranks
    [r * tp, (r + 1) * tp)."""

    rank: int = 0
    world_size: int = 1
    dp: int = 1
    tp_ctx: TPContext = field(default_factory=TPContext)

    @property
    def tp(self) -> int:
        return self.tp_ctx.world_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_replica_leader(self) -> bool:
        return self.tp_ctx.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _device_for(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "npu":
        import torch_npu  # noqa: F401
    getattr(torch, device_type).set_device(local_rank)
    return torch.device(device_type, local_rank)


def init_parallel(device_type: str, dp: Optional[int] = None) -> ParallelContext:
    """Join the torchrun process group (if any), split it into dp replicas of tp ranks each and
    pick this rank's device. dp defaults to 1 (every process in one tensor-parallel group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp = dp or 1
    if world % dp:
        raise UserError(f"dp={dp} does not divide the {world} started processes; start dp x tp processes")
    tp = world // dp
    device = _device_for(device_type, local_rank)
    group = None
    if world > 1:
        if not dist.is_initialized():
            kwargs = {"device_id": device} if device_type == "cuda" else {}
            dist.init_process_group(backend=distributed_backend(device_type), rank=rank, world_size=world, **kwargs)
            # Tear the group down before the interpreter does: left to static destructors, gloo's
            # threads can outlive it and abort the process at exit ("terminate called without an
            # active exception"), which turns a finished run into a failed one.
            atexit.register(_destroy_process_group)
        if dp > 1 and tp > 1:
            # Every process must create every group, in the same order.
            for r in range(dp):
                g = dist.new_group(list(range(r * tp, (r + 1) * tp)))
                if r == rank // tp:
                    group = g
    tp_ctx = TPContext(rank=rank % tp, world_size=tp, device=device, group=group)
    return ParallelContext(rank=rank, world_size=world, dp=dp, tp_ctx=tp_ctx)


def _destroy_process_group() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 — exiting anyway; a failed teardown must not hide the run's result
        pass


def init_distributed(device_type: str) -> TPContext:
    """Tensor parallelism over every started process (no data parallelism)."""
    return init_parallel(device_type, dp=1).tp_ctx


@dataclass
class HeadLayout:
    """Which query and KV heads a rank holds.

    KV heads are split when there are at least as many as ranks; otherwise each KV head is
    replicated on world/kv ranks and its group of query heads is split among them, padded with
    zero heads when the group does not divide (e.g. Qwen2-VL-7B: 28 query / 4 KV heads at world 8
    -> groups of 7 padded to 8, 4 per rank). Padded heads have zero q and o weights, so they add
    nothing to the output.
    """

    kv_heads: List[int]  # global KV head indices on this rank
    q_heads: List[Optional[int]]  # global query head index per local head (None = padding)

    @property
    def num_q(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv(self) -> int:
        return len(self.kv_heads)


def head_layout(num_q: int, num_kv: int, world: int, rank: int) -> HeadLayout:
    if num_q % num_kv:
        raise UserError(f"config.json: {num_q} attention heads are not a multiple of {num_kv} KV heads")
    group = num_q // num_kv
    if num_kv % world == 0:
        per = num_kv // world
        kv = list(range(rank * per, (rank + 1) * per))
        return HeadLayout(kv_heads=kv, q_heads=[h * group + j for h in kv for j in range(group)])
    if world % num_kv == 0:
        share = world // num_kv  # ranks per KV head
        kv_head, part = rank // share, rank % share
        per = -(-group // share)  # query heads per rank, padded
        q = []
        for j in range(part * per, (part + 1) * per):
            q.append(kv_head * group + j if j < group else None)
        return HeadLayout(kv_heads=[kv_head], q_heads=q)
    raise UserError(
        f"tensor parallel size {world} cannot split {num_kv} KV heads ({num_q} query heads): "
        f"one of them must divide the other; use a world size that divides or is a multiple of {num_kv}"
    )


def split_range(n: int, world: int, rank: int) -> range:
    """This rank's contiguous part of n items (n must divide by world)."""
    if n % world:
        raise UserError(f"tensor parallel size {world} does not divide dimension {n}")
    per = n // world
    return range(rank * per, (rank + 1) * per)
