"""Image and video decoding through qwen-vl-utils (decord for video), with per-sample errors.

Everything here raises `SampleError` with a message naming the file, so one bad image or video
is recorded against its sample and the run goes on. The input is a conversation in
qwen-vl-utils' form (messages whose media parts are local paths with their options); what comes
out is exactly what qwen-vl-utils' process_vision_info returns for it.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import SampleError, first_line

# qwen-vl-utils picks its video reader once, from this variable, at import. Its torchvision
# reader does not work with torchvision >= 0.29 (io.read_video was removed), so prefer decord.
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")


def check_local_files(messages: List[Dict[str, Any]]) -> None:
    """Each image/video part names a readable, non-empty file; else SampleError naming it."""
    for part in media_parts(messages):
        _check_file(str(part[part["type"]]), part["type"])


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

        quiet_video_libraries()
    except Exception as e:
        from ..errors import UserError

        raise UserError(
            f"cannot import qwen-vl-utils ({first_line(e, 150)}); "
            "install qwen-vl-utils and the torchvision that matches your torch"
        ) from None
    return process_vision_info


_QUIET = False


def quiet_video_libraries() -> None:
    """Keep the video libraries' chatter out of the progress bar (once per process): qwen-vl-utils
    prints which reader it uses on every video it opens, and FFmpeg (through decord) prints a
    line for every problem in a file. A file that cannot be read is reported once, as its
    sample's error (SampleError), so nothing is lost. qwen-vl-utils' reader choice is kept as it
    is; only its print goes (to the log, at debug level)."""
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    try:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
    except Exception:  # noqa: BLE001 — decord missing: qwen-vl-utils says so when used
        pass
    try:
        import qwen_vl_utils.vision_process as vp
    except Exception:  # noqa: BLE001 — require_qwen_vl_utils reports it
        return
    choose = vp.get_video_reader_backend

    def reader_without_print() -> str:
        if vp.FORCE_QWENVL_VIDEO_READER is not None:
            backend = vp.FORCE_QWENVL_VIDEO_READER
        else:
            with contextlib.redirect_stderr(io.StringIO()):  # the rare path: no reader forced
                backend = choose()
        logging.getLogger(__name__).debug("qwen-vl-utils reads videos with %s", backend)
        return backend

    vp.get_video_reader_backend = reader_without_print


Vision = Tuple[Optional[list], Optional[list]]  # (images, videos) as qwen-vl-utils returns them


def video_sample_fps(ele: Dict[str, Any]) -> float:
    """The fps qwen-vl-utils samples a video element at — what process_vision_info reports as
    video_kwargs["fps"] (return_video_kwargs=True): frames taken / the frames in range × the
    file's fps, by its own functions, from the file's index alone (no frame is decoded, so a
    media-cache hit stays cheap). Qwen2.5-VL places the frames by it. Remembered per file
    (path, size, modification time) and options. Raises SampleError naming a file decord cannot
    read."""
    path = Path(str(ele["video"]))
    try:
        st = path.stat()
    except OSError as e:
        raise SampleError(f"video not found: {path} ({e.strerror})") from None
    options = tuple(sorted((k, repr(v)) for k, v in ele.items() if k not in ("video", "type")))
    return _sample_fps(str(path), st.st_size, st.st_mtime_ns, options, ele)


_FPS_MEMO: Dict[tuple, float] = {}  # (path, size, mtime, options) -> sampled fps


def _sample_fps(path: str, size: int, mtime_ns: int, options: tuple, ele: Dict[str, Any]) -> float:
    key = (path, size, mtime_ns, options)
    if key in _FPS_MEMO:
        return _FPS_MEMO[key]
    from qwen_vl_utils.vision_process import calculate_video_frame_range, smart_nframes

    try:
        import decord

        reader = decord.VideoReader(path, num_threads=1)
        total, fps = len(reader), reader.get_avg_fps()
        del reader
    except Exception as e:  # decord's errors are long C++ traces: keep the first line
        raise SampleError(f"corrupt or unreadable video: {path} ({first_line(e, 200, with_type=False)})") from None
    _, _, total = calculate_video_frame_range(ele, total, fps)
    nframes = smart_nframes(ele, total_frames=total, video_fps=fps)
    value = nframes / max(total, 1e-6) * fps  # qwen-vl-utils' own expression
    if len(_FPS_MEMO) > 4096:
        _FPS_MEMO.clear()
    _FPS_MEMO[key] = value
    return value


class MediaSource(abc.ABC):
    """Where a backend's images and videos come from: decoded here (`InProcessMedia`, through the
    media cache when there is one) or in worker processes (media/workers.WorkerMedia). Either way
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
        self.cache = cache  # a media_cache.MediaCache, or None: decode every time

    def vision(self, messages: List[Dict[str, Any]], uint8: bool = False) -> Vision:
        return vision_from_messages(messages, self.cache, uint8)

    def summary(self) -> Optional[Dict[str, Any]]:
        return self.cache.summary() if self.cache is not None else None


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
    from .cache import exact_uint8

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
        raise SampleError(
            f"could not preprocess {media_names(messages)}: {first_line(e, 200, with_type=False)}"
        ) from None


def media_parts(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The image and video elements of chat messages, in order."""
    return [
        p
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") in ("image", "video")
    ]


def media_names(messages: List[Dict[str, Any]]) -> str:
    """Their files, for messages: "a.jpg, b.mp4"."""
    return ", ".join(str(p.get("image") or p.get("video")) for p in media_parts(messages))


def _or(value, default):
    return value if value is not None else default
