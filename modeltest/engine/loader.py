"""Read this rank's slices of a safetensors checkpoint (one file or an index of shards).

Each layer asks for the rows/columns it holds (layers.py: `Shard`) through `read`, safetensors'
lazy slicing, so host memory stays near one rank's shard. Tensor names are normalised so both layouts load: `visual.*`,
`model.*`, `lm_head.*` and newer transformers' `model.visual.*`, `model.language_model.*`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from ..errors import UserError, first_line

Block = Optional[Tuple[int, int]]  # [start, end) of rows/cols, or None for a zero block


def canonical_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


class ShapeMismatch(ValueError):
    """A checkpoint tensor whose shape is not the one the model built from config.json expects
    (ModelRunner turns it into a one-line error naming the tensor)."""


def set_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Make `value` the parameter's storage (moved to its device and dtype) instead of copying
    into a second buffer: while loading, host memory holds one tensor at a time beyond the model."""
    if tuple(value.shape) != tuple(param.shape):
        raise ShapeMismatch(
            f"checkpoint tensor of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}"
        )
    param.data = value.to(device=param.device, dtype=param.dtype).contiguous()


def open_safetensors(path: Path):
    """safe_open, with a one-line error naming the file when it is missing, truncated or corrupt."""
    try:
        return safe_open(path, framework="pt")
    except FileNotFoundError:
        raise UserError(
            f"{path}: weight file not found (named by model.safetensors.index.json); download the checkpoint again"
        ) from None
    except Exception as e:  # safetensors' SafetensorError, OSError: a short header or data
        raise UserError(
            f"{path}: not a readable safetensors file ({first_line(e, 150)}); it is probably "
            "truncated or corrupt: download it again"
        ) from None


def _index(root: Path) -> Optional[Dict[str, str]]:
    """tensor name -> file name from model.safetensors.index.json, or None without an index."""
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index}: not a safetensors index ({first_line(e, 150)}); download it again") from None


def weight_files(root: Path) -> List[Path]:
    """The checkpoint's safetensors files: those the index names, else every *.safetensors."""
    weight_map = _index(root)
    if weight_map is not None:
        return sorted({root / f for f in weight_map.values()})
    return sorted(root.glob("*.safetensors"))


def checkpoint_identity(model_path: str | Path) -> Dict[str, object]:
    """What identifies a checkpoint without reading its weights: config.json's content and the
    weight files' names and sizes (the resume keys' model part)."""
    import hashlib

    root = Path(model_path)
    digest = hashlib.sha256((root / "config.json").read_bytes()).hexdigest()[:16]
    weights = sorted((p.name, p.stat().st_size) for p in root.glob("*.safetensors"))
    weights += sorted((p.name, p.stat().st_size) for p in root.glob("*.bin"))
    return {"config": digest, "weights": weights}


def check_weight_files(model_path: str | Path) -> None:
    """Open every weight file's header: a truncated or corrupt file is a one-line error naming
    it, before any loading starts (for any backend)."""
    for f in weight_files(Path(model_path)):
        with open_safetensors(f):
            pass


class CheckpointReader:
    def __init__(self, model_path: str | Path):
        root = Path(model_path)
        weight_map = _index(root)
        if weight_map is not None:
            check_weight_files(root)
            files = {name: root / f for name, f in weight_map.items()}
        else:
            singles = sorted(root.glob("*.safetensors"))
            if not singles:
                raise UserError(
                    f"model.model_path: no *.safetensors in '{root}'; the engine backend reads safetensors weights"
                )
            files = {}
            for f in singles:  # opening a file reads (and checks) its header
                with open_safetensors(f) as h:
                    for name in h.keys():
                        files[name] = f
        self.files = {canonical_name(n): (f, n) for n, f in files.items()}
        self.last_read: Optional[str] = None  # the tensor read last, for errors about its shape

    def has(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str):
        # A handle per read: the file is memory-mapped, and dropping the handle right after the
        # read unmaps its pages, so they do not pile up in this process's resident memory.
        if name not in self.files:
            raise UserError(f"checkpoint: tensor '{name}' not found; is model_path a Qwen2-VL checkpoint?")
        path, original = self.files[name]
        self.last_read = original
        try:
            return open_safetensors(path).get_slice(original)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"{path}: cannot read tensor '{original}' ({first_line(e, 150)}); the file is "
                "probably truncated or corrupt: download it again"
            ) from None

    def shape(self, name: str) -> List[int]:
        return list(self._slice(name).get_shape())

    def read(self, name: str, blocks: Optional[Sequence[Block]] = None, dim: int = 0, pad: int = 0) -> torch.Tensor:
        """The whole tensor, or the concatenation along `dim` (0: rows, 1: columns) of its
        [start, end) blocks, where a None block is `pad` zero rows/columns. The one slicing path:
        only the requested bytes are read from the memory-mapped file."""
        sl = self._slice(name)
        if blocks is None:
            return sl[:]
        shape = list(sl.get_shape())
        parts = []
        for b in blocks:
            if b is None:
                zeros = list(shape)
                zeros[dim] = pad
                parts.append(torch.zeros(zeros, dtype=_dtype(sl)))
            else:
                parts.append(sl[b[0] : b[1]] if dim == 0 else sl[:, b[0] : b[1]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dtype(sl) -> torch.dtype:
    return _ST_DTYPES.get(sl.get_dtype(), torch.float32)
