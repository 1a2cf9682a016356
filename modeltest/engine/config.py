"""Qwen2-VL architecture facts read from a checkpoint's config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from ..errors import UserError


@dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 3584          # output width of the merger = the LM's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass
class Qwen2VLConfig:
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2VLConfig":
        # Newer transformers nest the language model's keys under text_config.
        text = dict(d.get("text_config") or {})
        merged = {**d, **text}
        rope = merged.get("rope_scaling") or merged.get("rope_parameters") or {}
        v = dict(d.get("vision_config") or {})
        vision = VisionConfig(**{k: v[k] for k in VisionConfig.__dataclass_fields__ if k in v})
        if "in_chans" in v:
            vision.in_channels = v["in_chans"]
        kw = {k: merged[k] for k in cls.__dataclass_fields__ if k in merged and k not in ("vision", "mrope_section")}
        cfg = cls(**kw, vision=vision)
        if "mrope_section" in rope:
            cfg.mrope_section = list(rope["mrope_section"])
        if "rope_theta" in rope and "rope_theta" not in merged:
            cfg.rope_theta = rope["rope_theta"]
        if sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise UserError(f"config.json: mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
        return cfg

    @classmethod
    def from_path(cls, model_path: str | Path) -> "Qwen2VLConfig":
        path = Path(model_path) / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read the model config ({e})") from None
