"""bf16: the engine against transformers on the test prompts (text, one image, two images, a video),
for the demo model and the odd-heads model — prefill logits' largest difference, and where greedy
tokens first diverge in 8. The figures tests/test_engine.py::test_bf16_engine_matches_transformers_in_bf16
bounds come from this.

    python docs/perf/bf16_parity.py
"""

import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from engine_helpers import all_inputs, make_request, prompt_logits  # noqa: E402 (tests/ on the path first)
from transformers import AutoProcessor, GenerationConfig, Qwen2VLForConditionalGeneration  # noqa: E402

from modeltest.backends.hf import dtype_kwarg  # noqa: E402
from modeltest.demo.build import build_demo  # noqa: E402
from modeltest.demo.tiny_model import ODD_HEADS, build_tiny_qwen2vl  # noqa: E402
from modeltest.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from modeltest.engine.parallel import TPContext  # noqa: E402

tmp = Path(tempfile.mkdtemp(prefix="bf16-parity-"))
demo = build_demo(tmp / "demo").root
odd = tmp / "odd"
build_tiny_qwen2vl(odd, ODD_HEADS, seed=1)
for model in (demo / "Qwen2-VL-tiny-random", odd):
    proc = AutoProcessor.from_pretrained(model)
    inputs = all_inputs(proc, demo)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(model, **dtype_kwarg(torch.bfloat16)).eval()
    eng = LLMEngine(
        EngineConfig(
            model_path=str(model),
            dtype=torch.bfloat16,
            max_batch_size=4,
            max_input_length=2048,
            max_output_length=16,
            block_size=16,
        ),
        TPContext(),
    )
    for name, inp in inputs.items():
        with torch.no_grad():
            pos = {}
            if hasattr(hf, "get_rope_index"):
                p, _ = hf.get_rope_index(
                    inp["input_ids"], inp.get("image_grid_thw"), inp.get("video_grid_thw"), inp["attention_mask"]
                )
                pos = {"position_ids": p}
            ref = hf(**inp, **pos).logits[0].float()
            gen = hf.generate(
                **inp,
                generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=151643
                ),
            )
        ours = prompt_logits(eng, make_request(name, inp, 8))
        d = (ours - ref).abs()
        hft = gen[0, inp["input_ids"].shape[1] :].tolist()
        et = eng.generate([make_request(name, inp, 8)])[0].output_ids
        first = next((i for i, (a, b) in enumerate(zip(et, hft)) if a != b), None)
        print(
            model.name,
            name,
            "maxdiff %.4f meandiff %.5f scale %.3f" % (d.max(), d.mean(), ref.abs().max()),
            "first_diff",
            first,
        )
