"""Where transformers' Qwen2-VL image processor spends its time on one video's frames
(docs/PERFORMANCE.md, "Host preprocessing on real-size media").

Uses the 60 s 640x360 clip `modeltest bench-prep` writes (run that first), qwen-vl-utils with
VideoBench's options, torch at one thread, and cProfile over one processor call.

    python docs/perf/processor_profile.py [--clip PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")


def main() -> None:
    import torch
    from qwen_vl_utils.vision_process import fetch_video
    from transformers import AutoProcessor

    from modeltest.bench.presets import cache_root, preset_checkpoint
    from modeltest.serve.config import default_video_options

    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default=str(cache_root() / "prep-media" / "clip_60s_640x360.mp4"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(preset_checkpoint("tiny")).image_processor
    video = fetch_video({"type": "video", "video": args.clip, **default_video_options()})
    t = time.perf_counter()
    out = processor(images=None, videos=[video], return_tensors="pt")
    print(
        f"frames {tuple(video.shape)} -> pixel_values_videos {tuple(out['pixel_values_videos'].shape)} "
        f"in {time.perf_counter() - t:.3f} s"
    )
    prof = cProfile.Profile()
    prof.enable()
    processor(images=None, videos=[video], return_tensors="pt")
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(8)
    print(s.getvalue())


if __name__ == "__main__":
    main()
