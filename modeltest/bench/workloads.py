"""Benchmark workloads as processor outputs (the same tensors go to both backends).

- textvqa:    N requests, one image of W x H, a short question, a few output tokens
- videobench: N requests, a K-frame video, a multiple-choice question, a few output tokens
- decode:     N text prompts, a long forced output (ignore_eos)
Every request differs a little (image content, question number), as in a real dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from PIL import Image


@dataclass
class WorkloadSpec:
    name: str
    requests: int
    new_tokens: int
    image_size: tuple = (448, 336)
    frames: int = 8
    frame_size: tuple = (336, 252)
    prompt_tokens: int = 64


def _image(rng, size) -> Image.Image:
    w, h = size
    arr = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    return Image.fromarray(arr).resize((w, h), Image.NEAREST)


def build_inputs(processor, spec: WorkloadSpec, seed: int = 0) -> List[dict]:
    """One processor output per request: input_ids, pixel_values(_videos), *_grid_thw."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(spec.requests):
        if spec.name == "textvqa":
            content = [
                {"type": "image"},
                {
                    "type": "text",
                    "text": f"what is written on sign {i}? Answer the question using a single word or phrase.",
                },
            ]
            kwargs = {"images": [_image(rng, spec.image_size)]}
        elif spec.name == "videobench":
            content = [
                {"type": "video"},
                {
                    "type": "text",
                    "text": f"Question {i}: what happens? A.run B.walk C.sit "
                    "D.jump \n Among the four options A, B, C, D above, "
                    "the one closest to the correct answer is:",
                },
            ]
            w, h = spec.frame_size
            frames = torch.from_numpy(np.stack([np.asarray(_image(rng, (w, h))) for _ in range(spec.frames)]))
            kwargs = {"videos": [frames.permute(0, 3, 1, 2).float()]}
        elif spec.name == "decode":
            words = " ".join(f"word{(i * 7 + j) % 97}" for j in range(spec.prompt_tokens // 2))
            content = [{"type": "text", "text": f"Continue this text: {words}"}]
            kwargs = {}
        else:
            from ..errors import UserError

            raise UserError(f"--workload {spec.name}: unknown; choose textvqa, videobench or decode")
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        out.append(processor(text=[text], return_tensors="pt", **kwargs))
    return out
