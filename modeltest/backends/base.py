"""The inference backend interface the harness feeds.

A backend turns samples into model inputs (`prepare`, CPU work that may run in a background
thread and may raise SampleError) and runs greedy generation on a batch of prepared inputs
(`generate`). The `hf` backend implements it with transformers; the project's own inference
core implements the same interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..config.schema import ModelConfig
from ..tasks.base import Sample

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Prepared:
    """One sample's model input before batching."""
    sample: Sample
    text: str                          # the prompt after the chat template, placeholders unexpanded
    images: Optional[list] = None      # PIL images from qwen-vl-utils
    videos: Optional[list] = None      # float tensors [T, C, H, W] from qwen-vl-utils
    preprocess_time: float = 0.0
    input_length: int = 0              # prompt tokens with the vision placeholders expanded


@dataclass
class GenerationOutput:
    text: str                          # decoded new tokens, up to (not including) the stop token
    token_ids: List[int] = field(default_factory=list)
    input_length: int = 0              # prompt tokens, vision placeholders expanded
    e2e_time: float = 0.0              # seconds for the batch this sample ran in
    prefill_time: Optional[float] = None
    decode_time: Optional[float] = None
    error: Optional[str] = None        # this request failed alone (e.g. too long); others ran


class Backend:
    name = ""
    rank = 0           # tensor-parallel rank of this process (engine backend under torchrun)
    world_size = 1

    def __init__(self, model_cfg: ModelConfig, device: str, data_type: str):
        self.model_cfg = model_cfg
        self.device = device
        self.data_type = data_type
        self.dtype = TORCH_DTYPES[data_type]

    def prepare(self, sample: Sample) -> Prepared:
        raise NotImplementedError

    def generate(self, batch: List[Prepared], max_new_tokens: int, ignore_eos: bool = False) -> List[GenerationOutput]:
        """Greedy generation; `ignore_eos` forces exactly max_new_tokens tokens (benchmarks)."""
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """Facts about the loaded model for the saved configuration."""
        return {"backend": self.name, "device": self.device, "data_type": self.data_type}
