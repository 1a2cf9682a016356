"""Inference backends behind one contract (base.py), each declaring what it can do (traits.py):

    engine.py   our tensor-parallel inference core
    hf.py       transformers' Qwen2VLForConditionalGeneration, the reference
    openai.py   any OpenAI-compatible server

Nothing is imported here eagerly: the config loader reads traits.py without loading a backend.
"""

from __future__ import annotations

from typing import Any, Dict

from .traits import BACKENDS, traits  # noqa: F401  (the names a config may give)


def make_backend(settings, tp_ctx=None):
    """The backend `settings.model.backend` names, loaded (settings: base.BackendSettings; tp_ctx:
    this replica's tensor-parallel group under torchrun, for a backend that runs tensor parallel)."""
    name = settings.model.backend
    if name == "hf":
        from .hf import HFBackend

        return HFBackend(settings)
    if name == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend(settings)
    if name == "engine":
        from .engine import EngineBackend

        return EngineBackend(settings, tp_ctx=tp_ctx)
    raise ValueError(f"unknown backend {name!r}")


def model_identity(model_cfg) -> Dict[str, Any]:
    """What identifies the evaluated model, for the resume keys: the local checkpoint's files, or
    what the server says it serves (GET /v1/models, asked once)."""
    if traits(model_cfg.backend).local_weights:
        from ..engine.loader import checkpoint_identity

        return checkpoint_identity(model_cfg.model_path)
    from .openai import served_model_identity

    return served_model_identity(model_cfg)
