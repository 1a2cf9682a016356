"""The preprocessing options qwen-vl-utils reads from an image or a video part — names, types and
checks in one place. The task configs (task.fps=...), `modeltest serve`'s --image-options /
--video-options and a request's mm_processor_kwargs are all checked here, the same way."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

NUMBER = (int, float)
IMAGE_OPTIONS: Dict[str, Any] = {"min_pixels": int, "max_pixels": int, "resized_height": int, "resized_width": int}
VIDEO_OPTIONS: Dict[str, Any] = {
    "fps": NUMBER,
    "min_frames": int,
    "max_frames": int,
    "nframes": int,
    "min_pixels": int,
    "max_pixels": int,
    "total_pixels": int,
    "resized_height": int,
    "resized_width": int,
    "video_start": NUMBER,
    "video_end": NUMBER,
}
OPTIONS = {"image": IMAGE_OPTIONS, "video": VIDEO_OPTIONS}
MAY_BE_ZERO = ("video_start",)  # seconds into the clip; every other option is positive
BOUNDS = (("min_pixels", "max_pixels"), ("min_frames", "max_frames"), ("video_start", "video_end"))


def option_problem(options: Mapping[str, Any], kind: str, allowed: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Why `options` cannot be handed to qwen-vl-utils for a `kind` ("image" / "video") part, as
    "KEY: why" (the caller says where the options came from), or None. `allowed`: a subset of the
    known options (a request's mm_processor_kwargs take fewer)."""
    known = allowed if allowed is not None else OPTIONS[kind]
    for key, value in options.items():
        if key not in known:
            return f"{key}: unknown {kind} option (known: {', '.join(known)})"
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, known[key]):
            return f"{key}: must be a number, got {value!r}"
        if value < 0 or (value == 0 and key not in MAY_BE_ZERO):
            return f"{key}: must be {'at least 0' if key in MAY_BE_ZERO else 'positive'}, got {value!r}"
    for low, high in BOUNDS:
        if options.get(low) is not None and options.get(high) is not None and options[low] > options[high]:
            return f"{low}: {options[low]} is above {high} {options[high]}"
    return None
