"""How far video decoding scales from one process to two on this machine, with no modeltest
code involved: the ceiling for `prep_workers` 1 -> 2 (docs/PERFORMANCE.md, "Real-size media").

    python docs/perf/decode_scaling.py [--clip PATH] [--decodes 8]

Each decode is what qwen-vl-utils asks decord for on a 60 s clip at fps 0.5 (30 frames spread
over the clip), one decoding thread per process.
"""

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_CLIP = Path.home() / ".cache" / "modeltest" / "bench" / "prep-media" / "clip_60s_640x360.mp4"


def decode(path: str) -> float:
    import decord
    import numpy as np

    start = time.perf_counter()
    vr = decord.VideoReader(path, num_threads=1)
    idx = np.linspace(0, len(vr) - 1, 30).round().astype(int)
    vr.get_batch(list(idx)).asnumpy()
    return time.perf_counter() - start


def wall(processes: int, path: str, decodes: int) -> float:
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(decode, [path] * processes))  # imports and file cache warm
        start = time.perf_counter()
        list(pool.map(decode, [path] * decodes))
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default=str(DEFAULT_CLIP), help="made by `modeltest bench-prep`")
    ap.add_argument("--decodes", type=int, default=8)
    args = ap.parse_args()
    one, two = wall(1, args.clip, args.decodes), wall(2, args.clip, args.decodes)
    print(f"{args.decodes} decodes: one process {one:.2f} s, two processes {two:.2f} s: {one / two:.2f}x")


if __name__ == "__main__":
    main()
