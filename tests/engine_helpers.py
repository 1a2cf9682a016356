"""Inputs for engine tests: text, one image, two images, a video — built with the real processor."""
from __future__ import annotations

from pathlib import Path
from typing import Dict


def case_messages(demo_root: Path) -> Dict[str, list]:
    img = demo_root / "textvqa" / "images"
    vid = demo_root / "videobench" / "Eval_video"
    return {
        "text": [{"type": "text", "text": "Hello, who are you? Tell me about Qwen2-VL."}],
        "image": [{"type": "image", "image": str(img / "demo_000.jpg")}, {"type": "text", "text": "what does the sign say?"}],
        "two_images": [{"type": "image", "image": str(img / "demo_001.jpg")},
                       {"type": "image", "image": str(img / "demo_002.jpg")}, {"type": "text", "text": "compare them"}],
        "video": [{"type": "video", "video": str(vid / "MSVD" / "msvd_red.mp4"), "fps": 0.5},
                  {"type": "text", "text": "what happens?"}],
    }


def processor_inputs(processor, content) -> dict:
    from qwen_vl_utils import process_vision_info
    msgs = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(msgs)
    return processor(text=[text], images=images, videos=videos, return_tensors="pt")


def make_request(name, inputs, max_new_tokens: int, ignore_eos: bool = True):
    from modeltest.engine.engine import Request
    return Request(id=name, input_ids=inputs["input_ids"][0].tolist(), max_new_tokens=max_new_tokens,
                   pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                   pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=inputs.get("video_grid_thw"),
                   ignore_eos=ignore_eos)


def all_inputs(processor, demo_root: Path) -> Dict[str, dict]:
    return {name: processor_inputs(processor, content) for name, content in case_messages(demo_root).items()}


def run_cases(engine, inputs: Dict[str, dict], max_new_tokens: int = 6) -> dict:
    """Per case: prompt logits (last 4 positions) and greedy tokens alone; then all cases in one batch."""
    out = {"logits": {}, "alone": {}, "batch": {}}
    for name, inp in inputs.items():
        out["logits"][name] = engine.prompt_logits(make_request(name, inp, max_new_tokens))[-4:].clone()
        out["alone"][name] = engine.generate([make_request(name, inp, max_new_tokens)])[0].output_ids
    reqs = [make_request(name, inp, max_new_tokens - i % 3) for i, (name, inp) in enumerate(inputs.items())]
    for r in engine.generate(reqs):
        out["batch"][r.id] = r.output_ids
    return out
