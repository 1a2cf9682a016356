"""Image and video loading through qwen-vl-utils (decord for video), with per-sample errors.

Everything here raises `SampleError` with a message naming the file, so one bad image or video
is recorded against its sample and the run goes on.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import SampleError, first_line
from .tasks.base import Sample

# qwen-vl-utils picks its video reader once, from this variable, at import. Its torchvision
# reader does not work with torchvision >= 0.29 (io.read_video was removed), so prefer decord.
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")


def build_messages(sample: Sample) -> List[Dict[str, Any]]:
    """One user turn: images, then videos, then the text (the reference's order)."""
    content: List[Dict[str, Any]] = []
    for path in sample.images:
        content.append({"type": "image", "image": path, **sample.image_options})
    for path in sample.videos:
        content.append({"type": "video", "video": path, **sample.video_options})
    content.append({"type": "text", "text": sample.prompt})
    return [{"role": "user", "content": content}]


VISION_PLACEHOLDER = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                      "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def prompt_text(processor, sample: Sample, use_chat_template: bool) -> str:
    """The text handed to the processor: the chat template with the generation prompt, or (with
    use_chat_template off) the vision placeholders followed by the raw prompt."""
    if use_chat_template:
        return processor.apply_chat_template(build_messages(sample), tokenize=False, add_generation_prompt=True)
    return (VISION_PLACEHOLDER["image"] * len(sample.images)
            + VISION_PLACEHOLDER["video"] * len(sample.videos) + sample.prompt)


def load_processor(model_path: str, fast: bool = False):
    """transformers' Qwen2-VL processor (tokenizer, chat template, image processor) from the
    weights folder; fast=True gives it fast_processor's bit-identical image processor."""
    from transformers import AutoProcessor

    from . import fast_processor
    from .errors import UserError
    try:
        processor = AutoProcessor.from_pretrained(model_path)
        return fast_processor.install(processor) if fast else processor
    except Exception as e:
        raise UserError(f"model.model_path: cannot load the processor/tokenizer from '{model_path}' "
                        f"({first_line(e, 200, with_type=False)}); the folder needs the tokenizer and "
                        "preprocessor_config.json of a Qwen2-VL checkpoint") from None


class ProcessorCopies:
    """Copies of a processor, each lent to one thread at a time: prepare() runs in background
    threads, and a fast tokenizer shared between threads can fail ("Already borrowed").

    A copy costs about a second (the tokenizer), so copies are kept and lent again — across the
    thread pools of successive runs too — rather than made per thread. They are made from a
    master that is never lent (copying a tokenizer while another thread encodes with it can fail
    the same way)."""

    def __init__(self, processor):
        self.processor = processor
        self._free: List[Any] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self):
        with self._lock:
            proc = self._free.pop() if self._free else copy.deepcopy(self.processor)
        try:
            yield proc
        finally:
            with self._lock:
                self._free.append(proc)


def _check_file(path: str, kind: str) -> None:
    p = Path(path)
    if not p.exists():
        raise SampleError(f"{kind} not found: {path}")
    if not p.is_file():
        raise SampleError(f"{kind} is not a file: {path}")
    if p.stat().st_size == 0:
        raise SampleError(f"{kind} is empty (0 bytes): {path}")


def _probe_video(path: str) -> Optional[str]:
    """Why decord cannot read a video, or None if it can."""
    try:
        import decord
        if len(decord.VideoReader(path)) == 0:
            return f"video has no frames: {path}"
    except Exception as e:  # decord's errors are long C++ traces: keep the first line
        return f"corrupt or unreadable video: {path} ({first_line(e, 200, with_type=False)})"
    return None


def require_qwen_vl_utils():
    """Import qwen-vl-utils, or say in one line what is missing (usually a matching torchvision)."""
    try:
        from qwen_vl_utils import process_vision_info
    except Exception as e:
        from .errors import UserError
        raise UserError(f"cannot import qwen-vl-utils ({first_line(e, 150)}); "
                        "install qwen-vl-utils and the torchvision that matches your torch") from None
    return process_vision_info


Vision = Tuple[Optional[list], Optional[list]]     # (images, videos) as qwen-vl-utils returns them


class MediaSource(abc.ABC):
    """Where a backend's images and videos come from: decoded here (`InProcessMedia`, through the
    media cache when there is one) or in worker processes (media_workers.WorkerMedia). Either way
    the values are qwen-vl-utils' own."""

    @abc.abstractmethod
    def vision(self, messages: List[Dict[str, Any]], uint8: bool = False) -> Vision:
        """(resized PIL images, video frames [T, C, H, W]) of the messages' media, or None for a
        kind with none: float frames as qwen-vl-utils returns them, or (uint8=True) uint8 frames
        where those hold the same values. Raises SampleError naming a file it cannot read."""

    def summary(self) -> Optional[Dict[str, Any]]:
        """The media cache's hits and misses, or None without a cache."""
        return None

    def parallelism(self) -> int:
        """How many samples it decodes at once (0: in the caller's thread)."""
        return 0

    def prefetch(self, messages: List[Dict[str, Any]], uint8: bool = False) -> None:
        """Start decoding what a later vision(messages, uint8) will ask for (worker processes);
        nothing to do where decoding happens in the caller's thread."""

    def close(self) -> None:
        """Stop background work (worker processes)."""


class InProcessMedia(MediaSource):
    def __init__(self, cache=None):
        self.cache = cache        # a media_cache.MediaCache, or None: decode every time

    def vision(self, messages: List[Dict[str, Any]], uint8: bool = False) -> Vision:
        return vision_from_messages(messages, self.cache, uint8)

    def summary(self) -> Optional[Dict[str, Any]]:
        return self.cache.summary() if self.cache is not None else None


def check_files(sample: Sample) -> None:
    for path in sample.images:
        _check_file(path, "image")
    for path in sample.videos:
        _check_file(path, "video")


def load_vision(sample: Sample, media: Optional[MediaSource] = None, uint8: bool = False) -> Vision:
    """(images, videos) of a sample as qwen-vl-utils returns them: resized PIL images and frame
    tensors (float; uint8 where exact with uint8=True), from `media` (default: decoded here)."""
    check_files(sample)
    return (media or InProcessMedia()).vision(build_messages(sample), uint8)


def _cached_vision_info(messages: List[Dict[str, Any]], cache, uint8: bool) -> Vision:
    """process_vision_info's loop (each element in message order, images and videos apart), with
    every element fetched through the cache."""
    from qwen_vl_utils.vision_process import extract_vision_info
    images, videos = [], []
    for ele in extract_vision_info(messages):
        if "image" in ele or "image_url" in ele:
            images.append(cache.image(ele))
        elif "video" in ele:
            videos.append(cache.video(ele, uint8=uint8))
        else:
            raise ValueError("image, image_url or video should in content.")
    return images or None, videos or None


def vision_from_messages(messages: List[Dict[str, Any]], cache=None, uint8: bool = False) -> Vision:
    """qwen-vl-utils' process_vision_info on chat messages whose media are local files (through
    `cache` when given); a file it cannot read raises SampleError naming it."""
    from .media_cache import exact_uint8
    process_vision_info = require_qwen_vl_utils()
    try:
        if cache is not None:
            return _cached_vision_info(messages, cache, uint8)
        images, videos = process_vision_info(messages)
        if uint8 and videos:
            videos = [_or(exact_uint8(v), v) for v in videos]
        return images, videos
    except Exception as e:
        for part in media_parts(messages):
            problem = _probe_video(part["video"]) if part.get("type") == "video" else None
            if problem:
                raise SampleError(problem) from None
        raise SampleError(f"could not preprocess {media_names(messages)}: "
                          f"{first_line(e, 200, with_type=False)}") from None


def media_parts(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The image and video elements of chat messages, in order."""
    return [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]
            if isinstance(p, dict) and p.get("type") in ("image", "video")]


def media_names(messages: List[Dict[str, Any]]) -> str:
    """Their files, for messages: "a.jpg, b.mp4"."""
    return ", ".join(str(p.get("image") or p.get("video")) for p in media_parts(messages))


def prefetch_vision(sample: Sample, media: Optional[MediaSource], uint8: bool = False) -> None:
    """Have `media` start decoding the sample's images and videos (load_vision then collects)."""
    if media is None or not (sample.images or sample.videos) or sample.load_error:
        return
    try:
        check_files(sample)
    except SampleError:
        return                   # load_vision reports it
    media.prefetch(build_messages(sample), uint8)


def processor_inputs(processor, sample: Sample, use_chat_template: bool, media: Optional[MediaSource] = None):
    """(prompt text, the processor's tensors) of one sample: qwen-vl-utils (from `media`), the
    chat template, the transformers processor — the engine backend's preprocessing. With the
    fast image processor installed, exact video frames travel as uint8 (a quarter the bytes)."""
    from . import fast_processor
    images, videos = load_vision(sample, media, uint8=fast_processor.installed(processor))
    text = prompt_text(processor, sample, use_chat_template)
    return text, processor(text=[text], images=images, videos=videos, return_tensors="pt")


def _or(value, default):
    return value if value is not None else default
