"""What the preprocessed-media cache saves on a real-size clip (docs/PERFORMANCE.md).

Writes a 60 s 640x360 H.264 clip at 30 fps (PyAV, ordinary GOPs), then times qwen-vl-utils'
video path with VideoBench's options (fps 0.5) three ways: the reference (decord decode +
resize), a cold cache (the same, plus storing the entry), a warm cache from disk in a new
process-level cache object (what a second model's run or a resumed run sees). Checks the warm
result is bit-identical to the reference.

    python docs/perf/media_cache_bench.py [--seconds 60] [--size 640x360]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_clip(path: Path, seconds: int, width: int, height: int, fps: int = 30) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": "60", "preset": "veryfast"}
        base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        for i in range(seconds * fps):
            frame = np.roll(base, i * 3, axis=1)  # moving content: real P-frames
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    import os

    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
    import torch
    from qwen_vl_utils.vision_process import fetch_video

    from modeltest.media.cache import MediaCache
    from modeltest.serve.config import default_video_options

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--size", default="640x360")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        t = time.perf_counter()
        write_clip(clip, args.seconds, w, h)
        print(
            f"clip: {args.seconds} s {w}x{h} 30 fps, {clip.stat().st_size / 2**20:.1f} MB "
            f"(written in {time.perf_counter() - t:.1f} s)"
        )
        ele = {"type": "video", "video": str(clip), **default_video_options()}
        t = time.perf_counter()
        ref = fetch_video(dict(ele))
        ref_s = time.perf_counter() - t
        cache_dir = Path(tmp) / "cache"
        t = time.perf_counter()
        MediaCache(cache_dir, 1 << 34).video(dict(ele))
        cold_s = time.perf_counter() - t
        warm = MediaCache(cache_dir, 1 << 34)
        t = time.perf_counter()
        got = warm.video(dict(ele))
        warm_s = time.perf_counter() - t
        assert warm.hits == 1 and torch.equal(got, ref)
        entry = sum(p.stat().st_size for p in cache_dir.glob("*/*.bin")) / 2**20
        print(
            f"frames {tuple(ref.shape)}; reference {ref_s:.3f} s, cold cache {cold_s:.3f} s, "
            f"warm cache {warm_s:.3f} s ({ref_s / warm_s:.0f}x faster), entry {entry:.1f} MB, bit-identical"
        )


if __name__ == "__main__":
    main()
