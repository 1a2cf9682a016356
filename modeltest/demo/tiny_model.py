"""A tiny random-weight Qwen2-VL or Qwen2.5-VL checkpoint in the Hugging Face layout, from a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

from .tokenizer import LAST_QWEN2_5_VL_TOKEN_ID, QWEN2VL_CHAT_TEMPLATE, write_qwen2vl_tokenizer

QWEN2VL_VOCAB = 151936


@dataclass
class TinyShape:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: List[int] = field(default_factory=lambda: [2, 3, 3])  # sums to head_dim / 2
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_num_heads: int = 2
    tie_word_embeddings: bool = True
    torch_dtype: str = "float32"
    # Qwen2.5-VL's tower only: gated MLP width, attention windows (in pixels: 112 = 4 merged cells,
    # as the published models), the blocks that attend whole frames, time positions per second.
    vision_intermediate_size: int = 48
    window_size: int = 112
    fullatt_block_indexes: List[int] = field(default_factory=lambda: [1])
    tokens_per_second: int = 2


# A second test shape: 6 query heads over 2 KV heads (at world size 4 each KV head is replicated
# on 2 ranks and its group of 3 query heads is padded to 4), vision heads that split 4 ways,
# untied LM head.
ODD_HEADS = TinyShape(
    hidden_size=96,
    intermediate_size=192,
    num_attention_heads=6,
    num_key_value_heads=2,
    mrope_section=[2, 3, 3],
    vision_embed_dim=64,
    vision_num_heads=4,
    tie_word_embeddings=False,
)


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


@torch.no_grad()
def _initialise(model, seed: int) -> None:
    """Our own initialisation, so the weights depend on the seed only: transformers' init draws
    in a different order from version to version (4.46 and 5.x give different models for one
    seed). Matrices ~ N(0, 1/fan_in) (LeCun: activations keep their scale through the layers, so
    a tiny random model still gives different answers to different prompts), norm scales 1,
    biases 0."""
    from ..engine.loader import canonical_name  # the same order whatever the version's names

    g = torch.Generator().manual_seed(seed)
    for name, p in sorted((canonical_name(n), p) for n, p in model.named_parameters()):
        if p.ndim == 1:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * fan_in**-0.5)


def build_tiny_qwen2vl(
    out_dir: Path,
    shape: TinyShape = TinyShape(),
    seed: int = 0,
    vocab_size: int = QWEN2VL_VOCAB,
    model_type: str = "qwen2_vl",
) -> Path:
    """Write config.json, model.safetensors, tokenizer and processor files into `out_dir`: a
    Qwen2-VL, or (model_type="qwen2_5_vl", transformers >= 4.49) a Qwen2.5-VL."""
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from ..engine.families import FAMILIES, reference_model_class

    family = FAMILIES[model_type]
    model_class = reference_model_class(family)  # refuses a transformers without the family
    out_dir = Path(out_dir)
    head_dim = shape.hidden_size // shape.num_attention_heads
    assert sum(shape.mrope_section) * 2 == head_dim, "mrope_section must sum to head_dim / 2"
    common_vision = {
        "depth": shape.vision_depth,
        "num_heads": shape.vision_num_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if model_type == "qwen2_5_vl":
        config_class, processor_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLProcessor
        vision = {
            **common_vision,
            "hidden_size": shape.vision_embed_dim,
            "out_hidden_size": shape.hidden_size,
            "intermediate_size": shape.vision_intermediate_size,
            "hidden_act": "silu",
            "window_size": shape.window_size,
            "fullatt_block_indexes": list(shape.fullatt_block_indexes),
            "tokens_per_second": shape.tokens_per_second,
        }
        last_token = LAST_QWEN2_5_VL_TOKEN_ID
    else:
        config_class, processor_class = transformers.Qwen2VLConfig, transformers.Qwen2VLProcessor
        vision = {
            **common_vision,
            "embed_dim": shape.vision_embed_dim,
            "hidden_size": shape.hidden_size,
            "mlp_ratio": 4,
        }
        last_token = None
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": list(shape.mrope_section)},
        tie_word_embeddings=shape.tie_word_embeddings,
        rms_norm_eps=1e-6,
        vision_config=vision,
        bos_token_id=151643,
        eos_token_id=151645,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        vision_token_id=151654,
        image_token_id=151655,
        video_token_id=151656,
        torch_dtype=shape.torch_dtype,
    )
    dtype = getattr(torch, shape.torch_dtype)
    # Allocate directly in the target dtype (a 7B model in fp32 would need 30 GB of host memory)
    # and skip transformers' own initialisation: _initialise overwrites every parameter.
    from ..backends.hf import dtype_kwarg

    with _no_init_weights():
        model = model_class._from_config(config, **dtype_kwarg(dtype)).eval()
    model.tie_weights()  # transformers 5 leaves tying to the skipped initialisation
    _initialise(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model

    write_qwen2vl_tokenizer(out_dir, **({} if last_token is None else {"last_token_id": last_token}))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    extra = {}
    try:  # transformers >= 4.52 has a separate video processor (required from 5.0)
        from transformers import Qwen2VLVideoProcessor

        extra["video_processor"] = Qwen2VLVideoProcessor(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    except ImportError:
        pass
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE, **extra
    )
    processor.save_pretrained(out_dir)
    return out_dir
