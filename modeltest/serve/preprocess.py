"""A chat request -> the processor's tensors, by the harness's path: media as local files,
qwen-vl-utils (decord for video) with the task configs' pixel and fps options, the chat template,
then transformers' Qwen2-VL processor. The same single-turn request therefore hands the engine
bit-identical pixels and tokens to an evaluation run.

Runs in worker threads (never on the event loop): each call borrows its own processor copy
(media.ProcessorCopies), since a fast tokenizer shared between threads can fail ("Already
borrowed").
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from .. import fast_processor
from ..errors import SampleError
from ..media import ProcessorCopies, load_processor, require_qwen_vl_utils, vision_from_messages
from .config import ServeConfig
from .media_urls import MediaResolver
from .protocol import ChatRequest, MediaPart, RequestError

IMAGE_KWARGS = ("min_pixels", "max_pixels")           # mm_processor_kwargs that apply to images


@dataclass
class ModelInput:
    inputs: Dict[str, Any]        # input_ids [1, T], pixel_values / image_grid_thw, ..._videos
    prompt_tokens: int            # T: vision placeholders expanded


class Preprocessor:
    def __init__(self, cfg: ServeConfig):
        require_qwen_vl_utils()
        self.cfg = cfg
        self.processor = load_processor(cfg.model_path, fast=cfg.fast_processor)
        self.tokenizer = self.processor.tokenizer
        self.resolver = MediaResolver(cfg.allowed_local_media_path, cfg.allow_remote_media,
                                      cfg.remote_media_timeout_s, int(cfg.max_remote_media_mb * 2 ** 20))
        self._processors = ProcessorCopies(self.processor)

    def check_counts(self, req: ChatRequest) -> None:
        media = req.media
        for kind, limit, flag in (("image", self.cfg.max_images_per_request, "--max-images-per-request"),
                                  ("video", self.cfg.max_videos_per_request, "--max-videos-per-request")):
            n = sum(1 for m in media if m.kind == kind)
            if n > limit:
                raise RequestError(400, f"{n} {kind}s in one request; this server takes at most {limit} "
                                        f"({flag})", "messages")

    def options(self, part: MediaPart, req: ChatRequest) -> Dict[str, Any]:
        opts = dict(self.cfg.image_options if part.kind == "image" else self.cfg.video_options)
        for k, v in req.mm_processor_kwargs.items():
            if part.kind == "video" or k in IMAGE_KWARGS:
                opts[k] = v
        return opts

    def __call__(self, req: ChatRequest) -> ModelInput:
        self.check_counts(req)
        with self._processors.borrow() as proc:
            return self._inputs(req, proc)

    def _inputs(self, req: ChatRequest, proc) -> ModelInput:
        with tempfile.TemporaryDirectory(prefix="modeltest-serve-") as work:
            messages: List[Dict[str, Any]] = []
            for m in req.messages:
                content = []
                for part in m.parts:
                    if isinstance(part, str):
                        content.append({"type": "text", "text": part})
                    else:
                        path = self.resolver.resolve(part, Path(work))
                        content.append({"type": part.kind, part.kind: path, **self.options(part, req)})
                messages.append({"role": m.role, "content": content})
            text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            try:
                images, videos = vision_from_messages(messages, uint8=fast_processor.installed(proc)) \
                    if req.media else (None, None)
            except SampleError as e:
                raise RequestError(400, f"media: {e}", "messages") from None
            inputs = proc(text=[text], images=images, videos=videos, return_tensors="pt")
        n = int(inputs["input_ids"].shape[1])
        if n > self.cfg.max_input_length:
            raise RequestError(400, f"the prompt is {n} tokens (vision tokens included), over this server's "
                                    f"max_input_length {self.cfg.max_input_length}; send smaller or fewer media "
                                    "(mm_processor_kwargs max_pixels / fps) or a shorter text", "messages",
                               code="context_length_exceeded")
        return ModelInput(inputs=dict(inputs), prompt_tokens=n)
