"""Conversation -> model input -> engine Request: the one path by which a chat message reaches the
model, whoever sends it (the harness's samples, `modeltest serve`'s requests, run_pa, the tests).

A conversation is a list of chat messages in qwen-vl-utils' form: each message's `content` is a
list of parts, `{"type": "text", "text": ...}`, `{"type": "image", "image": PATH, **options}` or
`{"type": "video", "video": PATH, **options}` (local files; options are qwen-vl-utils' pixel and
fps settings). From it:

    decoded_media()  the images and videos, as qwen-vl-utils returns them (through a MediaSource:
                     the media cache, worker processes)
    prompt_text()    the chat template with the generation prompt (or raw placeholders + text)
    model_input()    both, through transformers' processor: prompt ids, pixels, grids
    engine_request() a ModelInput as an engine Request

so a sample evaluated in-process and the same conversation sent to the server hand the engine the
same pixels and tokens by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .core import Sample
from .engine.media_spans import content_keys
from .engine.request import Request, SamplingParams
from .media import InProcessMedia, MediaSource, fast_processor
from .media.decode import Vision, check_local_files, media_parts, video_sample_fps

Messages = List[Dict[str, Any]]

VISION_PLACEHOLDER = {
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
    "video": "<|vision_start|><|video_pad|><|vision_end|>",
}


def sample_messages(sample: Sample) -> Messages:
    """A sample as one user turn: images, then videos, then the text (the reference's order)."""
    content: List[Dict[str, Any]] = []
    for path in sample.images:
        content.append({"type": "image", "image": path, **sample.image_options})
    for path in sample.videos:
        content.append({"type": "video", "video": path, **sample.video_options})
    content.append({"type": "text", "text": sample.prompt})
    return [{"role": "user", "content": content}]


def prompt_text(
    processor, messages: Messages, use_chat_template: bool = True, chat_template: Optional[str] = None, tools=None
) -> str:
    """The text handed to the processor: the chat template with the generation prompt, or (with
    use_chat_template off) each part in order — a vision placeholder per medium, the text as it
    is — with no roles or template. `chat_template` replaces the checkpoint's (a server's tool
    template or --chat-template); `tools` are rendered by templates that render tools."""
    if use_chat_template:
        extra = {} if chat_template is None else {"chat_template": chat_template}
        if tools:
            extra["tools"] = tools
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    out = []
    for m in messages:
        content = m.get("content")
        for part in content if isinstance(content, list) else [{"type": "text", "text": content or ""}]:
            out.append(VISION_PLACEHOLDER[part["type"]] if part["type"] in VISION_PLACEHOLDER else part["text"])
    return "".join(out)


def decoded_media(messages: Messages, media: Optional[MediaSource] = None, uint8: bool = False) -> Vision:
    """(resized PIL images, video frames [T, C, H, W]) of the conversation's media as qwen-vl-utils
    returns them (float; uint8 where exact with uint8=True), from `media` (default: decoded here,
    uncached); (None, None) without media. Raises SampleError naming a file it cannot read."""
    if not media_parts(messages):
        return None, None
    check_local_files(messages)
    return (media or InProcessMedia()).vision(messages, uint8)


def prefetch_media(messages: Messages, media: Optional[MediaSource], uint8: bool = False) -> None:
    """Have `media` start decoding the conversation's media (decoded_media then collects); a file
    that cannot be read is left for decoded_media to report."""
    if media is None or not media_parts(messages):
        return
    try:
        check_local_files(messages)
    except Exception:
        return
    media.prefetch(messages, uint8)


@dataclass
class ModelInput:
    """What the model is given for one conversation."""

    text: str  # the prompt text, vision placeholders not yet expanded
    inputs: Dict[str, Any]  # input_ids [1, T]; pixel_values [N, C*t*p*p], image_grid_thw [n, 3];
    #                                    pixel_values_videos, video_grid_thw likewise;
    #                                    second_per_grid_ts [n_videos] (Qwen2.5-VL)
    _keys: Optional[List[str]] = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        """T: prompt tokens with the vision placeholders expanded."""
        return int(self.inputs["input_ids"].shape[1])

    def media_keys(self) -> List[str]:
        """One content key per medium (images first, then videos, in prompt order): a hash of its
        grid and of the exact pixel values the model gets. Two questions on one clip share a key;
        two different images never do, whatever their placeholder ids; the same clip at another
        fps or size has another grid and pixels, so another key. Computed on first use."""
        if self._keys is None:
            inp = self.inputs
            self._keys = content_keys("image", inp.get("pixel_values"), inp.get("image_grid_thw")) + content_keys(
                "video", inp.get("pixel_values_videos"), inp.get("video_grid_thw")
            )
        return self._keys


def model_input(
    processor,
    messages: Messages,
    media: Optional[MediaSource] = None,
    use_chat_template: bool = True,
    chat_template: Optional[str] = None,
    tools=None,
) -> ModelInput:
    """qwen-vl-utils (through `media`), the chat template, transformers' processor. With the fast
    image processor installed, exact video frames travel as uint8 (a quarter the bytes)."""
    images, videos = decoded_media(messages, media, uint8=fast_processor.installed(processor))
    text = prompt_text(processor, messages, use_chat_template, chat_template, tools)
    inputs = dict(processor(text=[text], images=images, videos=videos, return_tensors="pt"))
    seconds = video_seconds_per_grid(processor, messages)
    if seconds is not None:
        inputs["second_per_grid_ts"] = seconds
    return ModelInput(text=text, inputs=inputs)


def places_video_by_time(processor) -> bool:
    """Whether the processor's model numbers video frames by time (Qwen2.5-VL's processor lists
    second_per_grid_ts among its model inputs; Qwen2-VL's does not)."""
    return "second_per_grid_ts" in (getattr(processor, "model_input_names", None) or ())


def video_seconds_per_grid(processor, messages: Messages):
    """[n_videos] float32 seconds per temporal grid step — temporal patch size / the fps
    qwen-vl-utils sampled each video at — for a processor that places videos by time, else None.

    What transformers 4.49-4.57's processor computes from qwen-vl-utils' video_kwargs["fps"],
    computed here for every transformers: transformers 5's processor reads it from video metadata
    instead and, given frames without metadata, silently assumes 24 fps (0.083 s per step: every
    frame of a clip at nearly one time position). tests/test_qwen2_5_vl.py pins both."""
    import torch

    parts = [p for p in media_parts(messages) if p["type"] == "video"]
    if not parts or not places_video_by_time(processor):
        return None
    patch = processor.image_processor.temporal_patch_size
    return torch.tensor([patch / video_sample_fps(p) for p in parts], dtype=torch.float32)


def engine_request(rid: Any, mi: ModelInput, params: SamplingParams) -> Request:
    """The engine request for a model input."""
    inp = mi.inputs
    return Request(
        id=rid,
        input_ids=inp["input_ids"][0].tolist(),
        params=params,
        pixel_values=inp.get("pixel_values"),
        image_grid_thw=inp.get("image_grid_thw"),
        pixel_values_videos=inp.get("pixel_values_videos"),
        video_grid_thw=inp.get("video_grid_thw"),
        second_per_grid_ts=seconds.tolist() if (seconds := inp.get("second_per_grid_ts")) is not None else None,
        media_keys=mi.media_keys(),
    )
