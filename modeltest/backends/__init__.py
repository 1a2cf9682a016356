"""Inference backends behind one interface (see base.py)."""
from .base import Backend, GenerationOutput, Prepared  # noqa: F401

BACKENDS = ("engine", "hf")


def make_backend(model_cfg, device: str, data_type: str, max_batch_size: int = 8, max_input_length: int = 4096,
                 max_output_length: int = 256, tp_ctx=None) -> Backend:
    if model_cfg.backend == "hf":
        from .hf import HFBackend
        return HFBackend(model_cfg, device, data_type)
    if model_cfg.backend == "engine":
        from .engine import EngineBackend
        return EngineBackend(model_cfg, device, data_type, max_batch_size=max_batch_size,
                             max_input_length=max_input_length, max_output_length=max_output_length, tp_ctx=tp_ctx)
    raise ValueError(f"unknown backend {model_cfg.backend!r}")
