"""Inference backends behind one interface (see base.py)."""
from .base import Backend, GenerationOutput, Prepared  # noqa: F401


def make_backend(model_cfg, device: str, data_type: str) -> Backend:
    if model_cfg.backend == "hf":
        from .hf import HFBackend
        return HFBackend(model_cfg, device, data_type)
    raise ValueError(f"unknown backend {model_cfg.backend!r}")
