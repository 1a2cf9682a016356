"""The engine's prompt logits against the installed transformers' Qwen2-VL for a video with more
temporal patches than merged rows and columns (16 frames of 56 x 56: grid 8 x 4 x 4, merged
8 x 2 x 2). transformers 4.x places the text after the video as the engine does; 5.24 does not.

    .venv/bin/python docs/perf/long_video_positions.py      (transformers 4.46: ~1e-5)
    .venv-t5/bin/python docs/perf/long_video_positions.py   (transformers 5.24: ~1.2)

Needs the demo model (`bash scripts/demo.sh` builds demo_data/).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from modeltest.backends.hf import dtype_kwarg
from modeltest.engine.engine import EngineConfig, LLMEngine
from modeltest.engine.parallel import TPContext
from modeltest.engine.request import Request, SamplingParams

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "demo_data" / "Qwen2-VL-tiny-random")


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from test_engine import hf_prefill_positions  # 4.x needs the 3-axis positions given

    proc = AutoProcessor.from_pretrained(MODEL)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (16, 3, 56, 56), dtype=np.uint8))
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inp = dict(proc(text=[text], videos=[frames], return_tensors="pt"))
    hf = Qwen2VLForConditionalGeneration.from_pretrained(MODEL, **dtype_kwarg(torch.float32)).eval()
    with torch.no_grad():
        ref = hf(**inp, **hf_prefill_positions(hf, inp)).logits[0].float()
    engine = LLMEngine(
        EngineConfig(model_path=MODEL, dtype=torch.float32, max_input_length=2048, max_output_length=8), TPContext()
    )
    req = Request(
        "x",
        inp["input_ids"][0].tolist(),
        SamplingParams(max_new_tokens=1),
        pixel_values_videos=inp["pixel_values_videos"],
        video_grid_thw=inp["video_grid_thw"],
    )
    import transformers

    diff = (engine.prompt_logits(req) - ref).abs().max().item()
    print(
        f"transformers {transformers.__version__}, grid {inp['video_grid_thw'].tolist()}: max |logit diff| {diff:.3g}"
    )


if __name__ == "__main__":
    main()
