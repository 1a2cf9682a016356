"""Model shapes for the benchmark, and building a random-weight checkpoint of one (cached on disk)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict

from ..demo.tiny_model import QWEN2VL_VOCAB, TinyShape, build_tiny_qwen2vl

# name -> (language model + vision shape, vocab). 2b and 7b are the published configs (FORMATS.md §8).
PRESETS: Dict[str, dict] = {
    "tiny": dict(shape=TinyShape(), vocab=QWEN2VL_VOCAB),
    "mid": dict(shape=TinyShape(hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
                                num_key_value_heads=2, mrope_section=[8, 12, 12], vision_depth=8,
                                vision_embed_dim=640, vision_num_heads=10, tie_word_embeddings=True,
                                torch_dtype="bfloat16"), vocab=QWEN2VL_VOCAB),
    "2b": dict(shape=TinyShape(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, mrope_section=[16, 24, 24], vision_depth=32,
                               vision_embed_dim=1280, vision_num_heads=16, tie_word_embeddings=True,
                               torch_dtype="bfloat16"), vocab=151936),
    "7b": dict(shape=TinyShape(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, mrope_section=[16, 24, 24], vision_depth=32,
                               vision_embed_dim=1280, vision_num_heads=16, tie_word_embeddings=False,
                               torch_dtype="bfloat16"), vocab=152064),
}


def cache_root() -> Path:
    return Path(os.environ.get("MODELTEST_BENCH_CACHE", Path.home() / ".cache" / "modeltest" / "bench"))


# Written last into a finished checkpoint folder: a folder without it is incomplete.
COMPLETE_MARKER = ".modeltest-complete"


def preset_checkpoint(name: str, seed: int = 0) -> Path:
    """A random-weight checkpoint of the preset (built once, then reused).

    It is built in a temporary folder beside its place and renamed into place when complete, so
    an interrupted build never leaves a folder that looks finished; a folder without the
    completion marker (an older modeltest's interrupted build) is rebuilt."""
    if name not in PRESETS:
        from ..errors import UserError
        raise UserError(f"--preset {name}: unknown; choose one of {', '.join(PRESETS)}")
    out = cache_root() / f"{name}-seed{seed}"
    if (out / COMPLETE_MARKER).is_file():
        return out
    p = PRESETS[name]
    if out.exists():
        print(f"[bench] {out} is incomplete (an interrupted build?); rebuilding it", flush=True)
    print(f"[bench] building a random-weight '{name}' checkpoint in {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        build_tiny_qwen2vl(tmp, p["shape"], seed=seed, vocab_size=p["vocab"])
        (tmp / COMPLETE_MARKER).write_text(f"{name} seed {seed}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
