"""Golden model inputs: the exact text and tokens each task hands the model, on the demo data.

A change to a prompt, the chat template, the tokenizer, image resizing, video frame sampling or
the pixel normalisation changes what the model sees and therefore the score. It must show up here as a visible diff of
tests/golden/model_inputs.json, not silently. To accept an intended change, regenerate with
MODELTEST_UPDATE_GOLDEN=1 pytest tests/test_prompt_golden.py and review the diff.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from modeltest.config.schema import ModelConfig
from modeltest.inputs import decoded_media, prompt_text, sample_messages
from modeltest.media.processor import load_processor
from modeltest.tasks.textvqa import TextVQATask, TextVQATaskConfig
from modeltest.tasks.videobench import VideoBenchTask, VideoBenchTaskConfig

GOLDEN = Path(__file__).parent / "golden" / "model_inputs.json"
PAD_IDS = {151655, 151656}  # <|image_pad|>, <|video_pad|>: repeated once per merged patch


def model_input(processor, sample) -> dict:
    messages = sample_messages(sample)
    images, videos = decoded_media(messages)
    text = prompt_text(processor, messages, use_chat_template=True)
    inputs = processor(text=[text], images=images, videos=videos, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    grids = {k: inputs[k].tolist() for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
    # What the pixels are, not only how many: resizing, frame sampling and normalisation all move
    # these (compared within 1e-3, so another CPU's last float bits do not).
    pixels = {
        k: [round(float(f(inputs[k].double())), 4) for f in (torch.mean, torch.std, torch.min, torch.max)]
        for k in ("pixel_values", "pixel_values_videos")
        if k in inputs
    }
    return {
        "id": sample.id,
        "text": text,
        "input_length": len(ids),
        "ids_without_vision_pads": [i for i in ids if i not in PAD_IDS],
        **grids,
        "pixel_stats": pixels,
    }


def current(demo) -> dict:
    processor = load_processor(str(demo.model))
    model = ModelConfig()
    textvqa = TextVQATask(TextVQATaskConfig(local_dataset_path=str(demo.textvqa_jsonl)), model)
    videobench = VideoBenchTask(VideoBenchTaskConfig(local_dataset_path=str(demo.videobench_qa)), model)
    out = {}
    for name, task in (("textvqa", textvqa), ("videobench", videobench)):
        samples = [s for s in task.load_samples() if s.load_error is None][:2]
        out[name] = [model_input(processor, s) for s in samples]
    return out


def test_model_inputs_match_the_golden_file(demo):
    got = current(demo)
    if os.environ.get("MODELTEST_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        pytest.skip(f"rewrote {GOLDEN}; review its diff")
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for task in want:
        for g, w in zip(got[task], want[task]):
            assert g["text"] == w["text"], f"{task} sample {w['id']}: the prompt text changed"
            g, w, g_pix, w_pix = dict(g), dict(w), g.pop("pixel_stats"), w.pop("pixel_stats")
            assert g == w, f"{task} sample {w['id']}: the tokens or vision grids changed"
            assert g_pix.keys() == w_pix.keys()
            for k in w_pix:  # mean, std, min, max of the pixel values the model gets
                assert g_pix[k] == pytest.approx(w_pix[k], abs=1e-3), f"{task} sample {w['id']}: {k} changed"
        assert len(got[task]) == len(want[task])
