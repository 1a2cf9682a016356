"""Model shapes for the benchmark, and building a random-weight checkpoint of one (cached on disk)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

from ..demo.tiny_model import QWEN2VL_VOCAB, TinyShape, build_tiny_qwen2vl

# name -> (language model + vision shape, vocab[, model_type]). 2b and 7b are the published configs
# (Qwen2-VL-2B/7B-Instruct's config.json); qwen2.5-3b and qwen2.5-7b Qwen2.5-VL-3B/7B-Instruct's;
# qwen2.5-mid is `mid` with Qwen2.5-VL's tower (windows, full attention every 4th block, a gated
# MLP 8/3 of its width as published), for CPUs.
QWEN2_5_VL_TOWER = dict(
    vision_depth=32,
    vision_embed_dim=1280,
    vision_num_heads=16,
    vision_intermediate_size=3420,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
QWEN2_VL_TOWER = dict(vision_depth=32, vision_embed_dim=1280, vision_num_heads=16)
# The 7B language model is the same in both families.
LM_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    mrope_section=[16, 24, 24],
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
MID = TinyShape(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=2,
    mrope_section=[8, 12, 12],
    vision_depth=8,
    vision_embed_dim=640,
    vision_num_heads=10,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)
PRESETS: Dict[str, dict] = {
    "tiny": dict(shape=TinyShape(), vocab=QWEN2VL_VOCAB),
    "mid": dict(shape=MID, vocab=QWEN2VL_VOCAB),
    "2b": dict(
        shape=TinyShape(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            mrope_section=[16, 24, 24],
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            **QWEN2_VL_TOWER,
        ),
        vocab=151936,
    ),
    "7b": dict(shape=TinyShape(**LM_7B, **QWEN2_VL_TOWER), vocab=152064),
    "qwen2.5-mid": dict(
        shape=replace(
            MID, vision_intermediate_size=1710, window_size=112, fullatt_block_indexes=[3, 7], tokens_per_second=2
        ),
        vocab=QWEN2VL_VOCAB,
        model_type="qwen2_5_vl",
    ),
    "qwen2.5-3b": dict(
        shape=TinyShape(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            mrope_section=[16, 24, 24],
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            **QWEN2_5_VL_TOWER,
        ),
        vocab=151936,
        model_type="qwen2_5_vl",
    ),
    "qwen2.5-7b": dict(shape=TinyShape(**LM_7B, **QWEN2_5_VL_TOWER), vocab=152064, model_type="qwen2_5_vl"),
}


def cache_root() -> Path:
    return Path(os.environ.get("MODELTEST_BENCH_CACHE", Path.home() / ".cache" / "modeltest" / "bench"))


# Written last into a finished checkpoint folder: a folder without it is incomplete.
COMPLETE_MARKER = ".modeltest-complete"


def checkpoint_damage(folder: Path) -> Optional[str]:
    """Why a cached checkpoint cannot be used as it is (None: complete and intact): no completion
    marker (an interrupted build), or a file the marker lists missing or of another size (deleted
    or truncated since)."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "incomplete (an interrupted build?)"
    try:
        files = json.loads(marker.read_text()).get("files")
    except ValueError:
        files = None
    if not isinstance(files, dict):
        return "built by an older modeltest without a file list"
    for fname, size in files.items():
        f = folder / fname
        if not f.is_file():
            return f"{fname} is missing"
        if f.stat().st_size != size:
            return f"{fname} is {f.stat().st_size} bytes, {size} when built"
    return None


def preset_checkpoint(name: str, seed: int = 0) -> Path:
    """A random-weight checkpoint of the preset (built once, then reused).

    It is built in a temporary folder beside its place and renamed into place when complete, so
    an interrupted build never leaves a folder that looks finished; a folder that is incomplete or
    damaged since (checkpoint_damage) is rebuilt."""
    if name not in PRESETS:
        from ..errors import UserError

        raise UserError(f"--preset {name}: unknown; choose one of {', '.join(PRESETS)}")
    out = cache_root() / f"{name}-seed{seed}"
    damage = checkpoint_damage(out)
    if damage is None:
        return out
    p = PRESETS[name]
    if out.exists():
        print(f"[bench] {out}: {damage}; rebuilding it", flush=True)
    print(f"[bench] building a random-weight '{name}' checkpoint in {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        build_tiny_qwen2vl(
            tmp, p["shape"], seed=seed, vocab_size=p["vocab"], model_type=p.get("model_type", "qwen2_vl")
        )
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"preset": name, "seed": seed, "files": files}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
