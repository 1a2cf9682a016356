"""Qwen2-VL and Qwen2.5-VL architecture facts read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

from ..errors import UserError
from .families import FAMILIES, ModelFamily, require_transformers_for

# Keys a config.json leaves out take transformers' defaults (its config classes' own: the 72B's
# language model, the published vision towers). transformers' save_pretrained writes only the
# values that differ from them, so a fine-tuned or re-saved checkpoint can lack keys the published
# config.json has, and transformers reads it with these values: so must we
# (tests/test_qwen2_5_vl.py::test_a_config_json_without_keys_reads_as_transformers_reads_it).
QWEN2_5_VL_VISION_DEFAULTS = dict(
    hidden_size=3584,  # the tower's width (transformers' default, not the published 1280)
    out_hidden_size=3584,
    intermediate_size=3420,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
    tokens_per_second=4,
)


# The activations the engine implements (vision.py's quick GELU, vision_qwen2_5.py's and model.py's
# SiLU); a config.json naming another is refused, not run with the wrong one.
VISION_ACTIVATION = {"qwen2_vl": "quick_gelu", "qwen2_5_vl": "silu"}
LM_ACTIVATION = "silu"


def check_activation(d: dict, key: str, implemented: str) -> None:
    got = d.get(key.rsplit(".", 1)[-1], implemented)
    if got != implemented:
        raise UserError(
            f"config.json: {key} is '{got}'; the engine implements '{implemented}' here: use backend=hf for this model"
        )


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
    # Qwen2.5-VL's tower (model_type qwen2_5_vl): RMSNorm, a gated SiLU MLP of intermediate_size,
    # attention within windows of window_size pixels except in fullatt_block_indexes; video
    # frames numbered by time, tokens_per_second positions per second.
    model_type: str = "qwen2_vl"
    intermediate_size: int = 0
    window_size: int = 0
    fullatt_block_indexes: Tuple[int, ...] = ()
    tokens_per_second: float = 0.0

    @property
    def windowed(self) -> bool:
        """Qwen2.5-VL's tower (windows, RMSNorm, gated MLP) rather than Qwen2-VL's."""
        return self.model_type == "qwen2_5_vl"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size if self.windowed else int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def from_dict(cls, v: dict, model_type: str) -> "VisionConfig":
        """vision_config of either family. Qwen2-VL calls the tower's width embed_dim and the
        merger's output hidden_size; Qwen2.5-VL calls them hidden_size and out_hidden_size."""
        v = dict(v)
        check_activation(v, "vision_config.hidden_act", VISION_ACTIVATION[model_type])
        if model_type == "qwen2_5_vl":
            v = {**QWEN2_5_VL_VISION_DEFAULTS, **v}
            v["embed_dim"], v["hidden_size"] = v["hidden_size"], v["out_hidden_size"]
        else:
            for key in ("intermediate_size", "window_size", "fullatt_block_indexes", "tokens_per_second"):
                v.pop(key, None)  # not Qwen2-VL's (its tower has neither windows nor a gated MLP)
        if "in_chans" in v:
            v["in_channels"] = v["in_chans"]
        fields = {k: v[k] for k in cls.__dataclass_fields__ if k in v and k != "model_type"}
        if "fullatt_block_indexes" in fields:
            fields["fullatt_block_indexes"] = tuple(int(i) for i in fields["fullatt_block_indexes"])
        return cls(**fields, model_type=model_type)


@dataclass
class Qwen2VLConfig:
    # defaults: transformers' (see QWEN2_5_VL_VISION_DEFAULTS), the same for both families
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    model_type: str = "qwen2_vl"
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def family(self) -> ModelFamily:
        return FAMILIES[self.model_type]

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2VLConfig":
        # Newer transformers nest the language model's keys under text_config.
        text = dict(d.get("text_config") or {})
        merged = {**d, **text}
        rope = merged.get("rope_scaling") or merged.get("rope_parameters") or {}
        model_type = d.get("model_type", "qwen2_vl")
        check_activation(merged, "hidden_act", LM_ACTIVATION)
        vision = VisionConfig.from_dict(d.get("vision_config") or {}, model_type)
        skip = ("vision", "mrope_section", "model_type")
        kw = {k: merged[k] for k in cls.__dataclass_fields__ if k in merged and k not in skip}
        cfg = cls(**kw, model_type=model_type, vision=vision)
        if "mrope_section" in rope:
            cfg.mrope_section = list(rope["mrope_section"])
        if "rope_theta" in rope and "rope_theta" not in merged:
            cfg.rope_theta = rope["rope_theta"]
        if sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise UserError(
                f"config.json: mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}"
            )
        return cfg

    def check_tensor_parallel(self, tp: int, where: str) -> None:
        """Refuse, in one line, a tensor-parallel size these weights cannot be split into (before
        any process starts): the language model's heads (query heads are padded where KV heads
        must be replicated) and its MLP rows. The vision tower never refuses: its MLP splits
        unevenly where needed, and heads that do not divide leave it replicated."""
        from .parallel import head_layout

        head_layout(self.num_attention_heads, self.num_key_value_heads, tp, 0)
        if self.intermediate_size % tp:
            raise UserError(f"tp={tp} does not divide the MLP width {self.intermediate_size} of {where}")

    @classmethod
    def from_path(cls, model_path: str | Path) -> "Qwen2VLConfig":
        return cls.from_dict(read_checkpoint_config(model_path))


SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
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


def read_checkpoint_config(model_path: str | Path, expect: str | None = None) -> dict:
    """A checkpoint's config.json, checked to be a model this project runs (with `expect`, of that
    model_type: the model config the user chose) and that the installed transformers has: one
    line naming what was found otherwise (a text-only Qwen2, another family), before any weight
    is read."""
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
            f"{path}: {found}; modeltest runs Qwen2-VL and Qwen2.5-VL checkpoints (model_type {supported}), "
            "e.g. Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct"
        )
    family = FAMILIES[model_type]
    if expect is not None and expect in FAMILIES and expect != model_type:
        raise UserError(
            f"{path}: a {family.name} checkpoint (model_type '{model_type}'), but the model config is "
            f"'{expect}' ({FAMILIES[expect].name}); run it with the model config '{model_type}' "
            f"(e.g. bash scripts/mm_run.sh TASK {model_type} model.model_path=...)"
        )
    if not isinstance(d.get("vision_config"), dict):
        raise UserError(
            f"{path}: model_type '{model_type}' but no vision_config; this is not a complete "
            f"{family.name} checkpoint (a text-only model cannot read images or videos)"
        )
    require_transformers_for(family)
    return d
