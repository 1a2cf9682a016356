"""Qwen2-VL architecture facts read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

from ..errors import UserError


@dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 3584  # output width of the merger = the LM's hidden size
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
            raise UserError(
                f"config.json: mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}"
            )
        return cfg

    @classmethod
    def from_path(cls, model_path: str | Path) -> "Qwen2VLConfig":
        return cls.from_dict(read_checkpoint_config(model_path))


SUPPORTED_MODEL_TYPES = ("qwen2_vl",)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # a chat turn's end, the document's end


def checkpoint_stop_ids(model_path: str | Path) -> Tuple[int, ...]:
    """The tokens that end an answer, from the checkpoint itself: generation_config.json's
    eos_token_id(s) and the tokenizer's <|im_end|> and <|endoftext|> (tokenizer_config.json's
    added tokens); Qwen2's two where a checkpoint names neither. One source for the engine, the
    hf backend, the server and the benchmark."""
    root = Path(model_path)
    ids: List[int] = []

    def read(name: str) -> dict:
        try:
            d = json.loads((root / name).read_text())
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    eos = read("generation_config.json").get("eos_token_id")
    ids += [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    added = read("tokenizer_config.json").get("added_tokens_decoder") or {}
    by_content = {v.get("content"): int(k) for k, v in added.items() if isinstance(v, dict) and str(k).isdigit()}
    ids += [by_content[t] for t in STOP_TOKENS if t in by_content]
    if not ids:
        from .request import STOP_TOKEN_IDS

        ids = list(STOP_TOKEN_IDS)
    return tuple(dict.fromkeys(ids))


def read_checkpoint_config(model_path: str | Path) -> dict:
    """A checkpoint's config.json, checked to be a model this project runs: one line naming what
    was found otherwise (a text-only Qwen2, another family), before any weight is read."""
    path = Path(model_path) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the model config ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a model config (a JSON object is expected)")
    model_type = d.get("model_type")
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = f"model_type '{model_type}'" if model_type else "no model_type"
        raise UserError(
            f"{path}: {found}; modeltest runs Qwen2-VL checkpoints (model_type {supported}), e.g. Qwen2-VL-7B-Instruct"
        )
    if not isinstance(d.get("vision_config"), dict):
        raise UserError(
            f"{path}: model_type '{model_type}' but no vision_config; this is not a complete "
            "Qwen2-VL checkpoint (a text-only model cannot read images or videos)"
        )
    return d
