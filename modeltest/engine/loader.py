"""Read this rank's slices of a safetensors checkpoint (one file or an index of shards).

Each rank reads only the rows/columns it holds through safetensors' lazy slicing, so host memory
stays near one rank's shard. Tensor names are normalised so both layouts load: `visual.*`,
`model.*`, `lm_head.*` and newer transformers' `model.visual.*`, `model.language_model.*`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from ..errors import UserError

Block = Optional[Tuple[int, int]]   # [start, end) of rows/cols, or None for a zero block


def canonical_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def set_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Make `value` the parameter's storage (moved to its device and dtype) instead of copying
    into a second buffer: while loading, host memory holds one tensor at a time beyond the model."""
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}")
    param.data = value.to(device=param.device, dtype=param.dtype).contiguous()


class CheckpointReader:
    def __init__(self, model_path: str | Path):
        root = Path(model_path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: root / f for name, f in weight_map.items()}
        else:
            singles = sorted(root.glob("*.safetensors"))
            if not singles:
                raise UserError(f"model.model_path: no *.safetensors in '{root}'; the engine backend reads safetensors weights")
            files = {}
            for f in singles:
                with safe_open(f, framework="pt") as h:
                    for name in h.keys():
                        files[name] = f
        self.files = {canonical_name(n): (f, n) for n, f in files.items()}

    def has(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str):
        # A handle per read: the file is memory-mapped, and dropping the handle right after the
        # read unmaps its pages, so they do not pile up in this process's resident memory.
        if name not in self.files:
            raise UserError(f"checkpoint: tensor '{name}' not found; is model_path a Qwen2-VL checkpoint?")
        path, original = self.files[name]
        return safe_open(path, framework="pt").get_slice(original)

    def shape(self, name: str) -> List[int]:
        return list(self._slice(name).get_shape())

    def full(self, name: str) -> torch.Tensor:
        return self._slice(name)[:]

    def rows(self, name: str, blocks: Sequence[Block], block_size: int = 0) -> torch.Tensor:
        """Concatenate row blocks of a 1-D or 2-D tensor; a None block is `block_size` zero rows."""
        sl = self._slice(name)
        shape = sl.get_shape()
        parts = []
        for b in blocks:
            if b is None:
                parts.append(torch.zeros([block_size, *shape[1:]], dtype=_dtype(sl)))
            else:
                parts.append(sl[b[0]:b[1]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def cols(self, name: str, blocks: Sequence[Block], block_size: int = 0) -> torch.Tensor:
        sl = self._slice(name)
        shape = sl.get_shape()
        parts = []
        for b in blocks:
            if b is None:
                parts.append(torch.zeros([shape[0], block_size], dtype=_dtype(sl)))
            else:
                parts.append(sl[:, b[0]:b[1]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dtype(sl) -> torch.dtype:
    return _ST_DTYPES.get(sl.get_dtype(), torch.float32)
