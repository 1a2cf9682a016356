"""Inference backends behind one contract (see base.py)."""
from ..config.schema import BACKENDS  # noqa: F401  (the names a config may give)
from .base import Backend, BackendSettings, Completed, GenerationOutput, Prepared  # noqa: F401


def make_backend(settings: BackendSettings, tp_ctx=None) -> Backend:
    """The backend `settings.model.backend` names, loaded (tp_ctx: this replica's tensor-parallel
    group under torchrun; the hf backend runs in one process)."""
    if settings.model.backend == "hf":
        from .hf import HFBackend
        return HFBackend(settings)
    if settings.model.backend == "openai":
        from .openai import OpenAIBackend
        return OpenAIBackend(settings)
    if settings.model.backend == "engine":
        from .engine import EngineBackend
        return EngineBackend(settings, tp_ctx=tp_ctx)
    raise ValueError(f"unknown backend {settings.model.backend!r}")
