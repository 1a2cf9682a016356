"""Device detection (NPU via torch_npu first, then CUDA, then CPU), dtype names, device sync.

torch_npu is imported behind a guard: it is only present on Ascend machines, and importing it
without CANN fails, so any failure simply means "no NPU".
"""

from __future__ import annotations

import torch

from .errors import UserError

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
# The data_type names of configs and command lines, and the torch dtypes they mean.
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available() and torch.npu.device_count() > 0


def resolve_device(requested: str = "auto") -> str:
    """Return 'npu', 'cuda' or 'cpu' for a requested device name."""
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES:
        raise UserError(f"device={requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        if npu_available():
            return "npu"
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if requested == "npu" and not npu_available():
        raise UserError(
            "device=npu but torch_npu is not importable or sees no NPU: install torch_npu "
            "with CANN, check ASCEND_RT_VISIBLE_DEVICES, or set device=cpu"
        )
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but torch sees no CUDA device: check CUDA_VISIBLE_DEVICES or set device=cpu")
    return requested


def distributed_backend(device: str) -> str:
    """The torch.distributed backend for a device type."""
    return {"npu": "hccl", "cuda": "nccl"}.get(device, "gloo")


def synchronize(device: torch.device) -> None:
    """Wait for a device's queued work (for honest timings); nothing to wait for on CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()
