"""`modeltest bench-prep`: what preprocessing real-size media costs the host, with inference
left out — so a user sees whether a run will wait on its host.

Generates (once, cached beside the bench checkpoints) 1024x768 JPEG photos and H.264 clips at
30 fps with ordinary GOPs, several questions per clip as in VideoBench, then reports:
  * per medium, one thread: qwen-vl-utils' decode + resize; transformers' processor; the fast
    (bit-identical) processor; and a warm question (media cache read + fast processor);
  * the preprocessing pipeline's samples/s: in `--threads` threads (cache off, cold, warm) and in
    1 and `--workers` worker processes (cold, warm) — inference left out;
  * with --infer PRESET: the harness's end-to-end samples/s against the engine alone on the same
    inputs (bench/harness_rate.py).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from tabulate import tabulate
from termcolor import colored

from ..core import Sample
from ..errors import UserError
from ..tasks.textvqa import TextVQATaskConfig
from ..tasks.videobench import VideoBenchTaskConfig


def add_parser(sub) -> None:
    b = sub.add_parser("bench-prep", help="host preprocessing cost on real-size media (no inference)")
    b.add_argument("--photos", type=int, default=8, help="1024x768 JPEG photos (TextVQA-like)")
    b.add_argument("--photo-size", default="1024x768")
    b.add_argument(
        "--clips",
        default="10x640x360,60x640x360,180x1280x720",
        help="comma list of [COUNT*]SECONDSxWxH clips (30 fps H.264; COUNT distinct clips of that kind)",
    )
    b.add_argument("--questions-per-clip", type=int, default=3)
    b.add_argument("--threads", type=int, default=2, help="preprocessing threads (prep_workers=0)")
    b.add_argument("--workers", type=int, default=2, help="worker processes to compare with one")
    b.add_argument("--preset", default="tiny", help="whose processor files to use (the same for every Qwen2-VL)")
    b.add_argument(
        "--infer",
        default=None,
        metavar="PRESET",
        help="also run the harness end to end and the engine alone on this preset (tiny, mid, 2b, 7b)",
    )
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default=None, help="--infer's data type (default: bf16 on a GPU/NPU, fp32 on CPU)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--new-tokens", type=int, default=8)
    b.add_argument("--prep-workers", default="auto", help="--infer's harness prep_workers")
    b.add_argument("--skip-pipeline", action="store_true", help="only --infer (no per-medium or pipeline figures)")
    b.add_argument("--json", default=None)
    b.set_defaults(func=main)


def _parse_clips(text: str) -> List[Tuple[int, int, int, int]]:
    """ "4*60x640x360,180x1280x720" -> [(60, 640, 360, k) for k in 0..3] + [(180, 1280, 720, 0)]:
    a count makes that many distinct clips (different content, as a real dataset's)."""
    out = []
    try:
        for c in text.split(","):
            if not c:
                continue
            count, _, spec = c.rpartition("*")
            seconds, w, h = (int(v) for v in spec.lower().split("x"))
            out += [(seconds, w, h, k) for k in range(int(count) if count else 1)]
    except ValueError:
        raise UserError(f"--clips {text!r}: expected [COUNT*]SECONDSxWxH,... e.g. 4*60x640x360,180x1280x720") from None
    return out


def build_media(folder: Path, photos: int, photo_size: Tuple[int, int], clips: List[Tuple[int, int, int, int]]):
    """Photos and clips under `folder` (kept: building a 3-minute 720p clip takes a while)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths_p, paths_v = [], []
    for i in range(photos):
        p = folder / f"photo_{i}_{photo_size[0]}x{photo_size[1]}.jpg"
        if not p.is_file():
            arr = rng.integers(0, 255, size=(photo_size[1] // 8, photo_size[0] // 8, 3), dtype=np.uint8)
            img = Image.fromarray(arr).resize(photo_size, Image.BILINEAR)
            ImageDraw.Draw(img).text((40, 40), f"SIGN {i}", fill=(255, 255, 255))
            img.save(p, quality=90)
        paths_p.append(p)
    for seconds, w, h, k in clips:
        p = folder / (f"clip_{seconds}s_{w}x{h}.mp4" if k == 0 else f"clip_{seconds}s_{w}x{h}_{k}.mp4")
        if not p.is_file():
            print(f"[bench-prep] writing a {seconds} s {w}x{h} clip ...", flush=True)
            _write_clip(p, seconds, w, h, seed=k)
        paths_v.append(p)
    return paths_p, paths_v


def _write_clip(path: Path, seconds: int, width: int, height: int, fps: int = 30, seed: int = 0) -> None:
    import av

    tmp = path.with_suffix(".part.mp4")
    rng = np.random.default_rng(seconds * 1000 + width + 7919 * seed)
    base = rng.integers(0, 255, size=(height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(2 * fps), "preset": "veryfast"}
        for i in range(seconds * fps):
            frame = np.roll(base, 4 * i, axis=1)  # moving content: real P-frames
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)


def samples_for(photos: List[Path], clips: List[Path], questions: int) -> List[Sample]:
    t, v = TextVQATaskConfig(), VideoBenchTaskConfig()
    image_opts = {"min_pixels": t.min_pixels, "max_pixels": t.max_pixels}
    video_opts = {
        "fps": v.fps,
        "min_frames": v.min_frames,
        "max_frames": v.max_frames,
        "min_pixels": v.min_pixels,
        "max_pixels": v.max_pixels,
        "total_pixels": v.total_pixels,
    }
    out = [
        Sample(id=f"p{i}", subject="photo", prompt="what does the sign say?", images=[str(p)], image_options=image_opts)
        for i, p in enumerate(photos)
    ]
    for c in clips:
        out += [
            Sample(
                id=f"{c.stem}_{q}",
                subject=c.stem,
                prompt=f"question {q} about this clip?",
                videos=[str(c)],
                video_options=video_opts,
            )
            for q in range(questions)
        ]
    return out


def split_times(processor, fast, samples: List[Sample], cache_dir: Path) -> Dict[str, Dict[str, float]]:
    """Per distinct medium, one thread: decode + resize (qwen-vl-utils), transformers' processor,
    the fast processor, and a warm question: the entry read from the media cache (a new process's
    view: from disk) + the fast processor."""
    from ..inputs import model_input, prompt_text, sample_messages
    from ..media import InProcessMedia
    from ..media.cache import MediaCache
    from ..media.decode import vision_from_messages

    seen, out = set(), {}
    for s in samples:
        media = tuple(s.images + s.videos)
        if media in seen:
            continue
        seen.add(media)
        t0 = time.perf_counter()
        messages = sample_messages(s)
        images, videos = vision_from_messages(messages)
        t1 = time.perf_counter()
        text = prompt_text(processor, messages, True)
        processor(text=[text], images=images, videos=videos, return_tensors="pt")
        t2 = time.perf_counter()
        fast(text=[text], images=images, videos=videos, return_tensors="pt")
        t3 = time.perf_counter()
        model_input(fast, messages, InProcessMedia(MediaCache(cache_dir, 1 << 40)))  # fill the entry
        warm = InProcessMedia(MediaCache(cache_dir, 1 << 40))  # a later run's view: from disk
        t4 = time.perf_counter()
        model_input(fast, messages, warm)
        t5 = time.perf_counter()
        model_input(fast, messages, warm)  # the next question on it
        t6 = time.perf_counter()
        out[Path(media[0]).name] = {
            "decode_s": t1 - t0,
            "processor_s": t2 - t1,
            "fast_processor_s": t3 - t2,
            "warm_question_s": t5 - t4,
            "warm_next_question_s": t6 - t5,
            "today_s": t2 - t0,
        }
    return out


def pipeline_rate(processor, samples: List[Sample], threads: int, media, prefetch: bool = False) -> float:
    """samples/s of preparing every sample in `threads` threads (the harness's prepare step),
    decoding through `media` (a media.MediaSource; prefetch: every sample's media asked for at
    once first, as the harness does with worker processes)."""
    from ..inputs import model_input, prefetch_media, sample_messages
    from ..media.processor import ProcessorCopies

    def prepare(s: Sample):
        with procs.borrow() as proc:
            return model_input(proc, sample_messages(s), media)

    procs = ProcessorCopies(processor)
    with contextlib.ExitStack() as stack:  # the copies exist before the clock (a run makes them once)
        for _ in range(threads):
            stack.enter_context(procs.borrow())
    start = time.perf_counter()
    if prefetch:
        for s in samples:
            prefetch_media(sample_messages(s), media, uint8=True)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(prepare, samples))
    return len(samples) / (time.perf_counter() - start)


def worker_rates(fast, samples: List[Sample], workers: int, folder: Path) -> Dict[str, float]:
    """With decoding in `workers` processes: the decode alone (cold, every sample's media asked
    for at once, as the harness's prefetch does), then the pipeline with the processor in the
    harness's threads (min(4, max(2, workers))), cold (an empty cache) then warm."""
    from ..inputs import prefetch_media, sample_messages
    from ..media.workers import WorkerMedia

    out = {}
    for state in ("decode only, cold", "cold", "warm"):
        where = folder / ("decode" if state.startswith("decode") else "pipeline")
        media = WorkerMedia(workers, 3600, str(where), 1 << 40)
        try:
            media.pool.wait_started()  # workers up before the clock
            if state.startswith("decode"):
                start = time.perf_counter()
                for s in samples:
                    prefetch_media(sample_messages(s), media, uint8=True)
                for s in samples:
                    media.vision(sample_messages(s), uint8=True)
                out[state] = len(samples) / (time.perf_counter() - start)
            else:
                out[state] = pipeline_rate(fast, samples, min(4, max(2, workers)), media, prefetch=True)
        finally:
            media.close()
    return out


def main(args) -> int:
    from .presets import cache_root

    try:
        w, h = (int(x) for x in args.photo_size.lower().split("x"))
    except ValueError:
        raise UserError(f"--photo-size {args.photo_size!r}: expected WxH, e.g. 1024x768") from None
    clips = _parse_clips(args.clips)
    photos, videos = build_media(cache_root() / "prep-media", args.photos, (w, h), clips)
    report: Dict = {"photos": args.photos, "clips": args.clips, "questions_per_clip": args.questions_per_clip}
    if not args.skip_pipeline:
        report.update(pipeline(args, samples_for(photos, videos, args.questions_per_clip)))
        print_pipeline(report)
    if args.infer:
        report["infer"] = infer(args, photos, videos)
        print_infer(report["infer"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"json: {args.json}")
    return 0


def pipeline(args, samples: List[Sample]) -> Dict:
    """Per medium, the split of one thread's work; then the pipeline's samples/s with the cache
    off, cold and warm, in threads and in worker processes."""
    import copy

    import torch

    from ..media import InProcessMedia
    from ..media.cache import MediaCache
    from ..media.processor import load_processor
    from .presets import preset_checkpoint

    processor = load_processor(str(preset_checkpoint(args.preset)))
    fast = load_processor(str(preset_checkpoint(args.preset)), fast=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each preprocessing thread or worker gets
    n = args.threads
    with tempfile.TemporaryDirectory(prefix="bench-prep-cache-") as tmp:
        split = split_times(processor, fast, samples, Path(tmp) / "split")
        rates = {
            f"{n} threads, transformers' processor, cache off": pipeline_rate(
                processor, samples, n, InProcessMedia(None)
            ),
            f"{n} threads, cache off": pipeline_rate(fast, samples, n, InProcessMedia(None)),
        }
        cold = MediaCache(Path(tmp) / "threads", 1 << 40)
        rates[f"{n} threads, cache cold"] = pipeline_rate(fast, samples, n, InProcessMedia(cold))
        warm = MediaCache(Path(tmp) / "threads", 1 << 40)
        rates[f"{n} threads, cache warm"] = pipeline_rate(fast, samples, n, InProcessMedia(warm))
        for workers in sorted({1, args.workers}):
            r = worker_rates(copy.deepcopy(fast), samples, workers, Path(tmp) / f"workers{workers}")
            rates[f"{workers} worker(s), decode only, cache cold"] = r["decode only, cold"]
            rates[f"{workers} worker(s), cache cold"] = r["cold"]
            rates[f"{workers} worker(s), cache warm"] = r["warm"]
    torch.set_num_threads(threads)
    return dict(
        samples=len(samples),
        threads=n,
        per_medium=split,
        pipeline_samples_per_s=rates,
        cache={"cold": cold.summary(), "warm": warm.summary()},
    )


def print_pipeline(report: Dict) -> None:
    rows = [
        [name]
        + [
            f"{t[k]:.3f}"
            for k in (
                "decode_s",
                "processor_s",
                "fast_processor_s",
                "today_s",
                "warm_question_s",
                "warm_next_question_s",
            )
        ]
        + [f"{t['today_s'] / t['warm_question_s']:.1f}x", f"{t['today_s'] / t['warm_next_question_s']:.1f}x"]
        for name, t in report["per_medium"].items()
    ]
    headers = [
        "medium",
        "decode + resize",
        "processor",
        "fast processor",
        "decode + processor",
        "warm: 1st question",
        "warm: next question",
        "speed-up 1st",
        "speed-up next",
    ]
    print(colored("\nper medium, one thread (seconds)", "cyan", attrs=["bold"]))
    print(tabulate(rows, headers=headers, tablefmt="github"))
    rates = report["pipeline_samples_per_s"]
    print(colored(f"\npreprocessing pipeline, {report['samples']} samples, no inference", "cyan", attrs=["bold"]))
    print(tabulate([[k, f"{v:.2f}"] for k, v in rates.items()], headers=["how", "samples/s"], tablefmt="github"))


def infer(args, photos, videos) -> Dict:
    """The harness end to end next to the engine alone, on the same generated datasets."""
    from ..device import resolve_device
    from .harness_rate import harness_vs_engine, write_datasets
    from .presets import preset_checkpoint

    device = resolve_device(args.device)
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    with tempfile.TemporaryDirectory(prefix="bench-prep-data-") as tmp:
        tv, vb = write_datasets(Path(tmp), photos, videos, args.questions_per_clip)
        tasks = harness_vs_engine(
            preset_checkpoint(args.infer), tv, vb, device, dtype, args.batch_size, args.new_tokens, args.prep_workers
        )
    return {
        "preset": args.infer,
        "device": device,
        "data_type": dtype,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "prep_workers": args.prep_workers,
        "tasks": tasks,
    }


def print_infer(report: Dict) -> None:
    print(
        colored(
            f"\nharness end to end vs the engine alone ({report['preset']}, {report['device']}, "
            f"{report['data_type']}, batch {report['batch_size']}, {report['new_tokens']} new tokens)",
            "cyan",
            attrs=["bold"],
        )
    )
    rows = [
        [t, r["samples"]]
        + [
            f"{r[k]:.2f}"
            for k in ("engine_only", "harness_cold", "harness_warm", "cold_over_engine", "warm_over_engine")
        ]
        for t, r in report["tasks"].items()
    ]
    headers = [
        "task",
        "samples",
        "engine only /s",
        "harness cold /s",
        "harness warm /s",
        "cold / engine",
        "warm / engine",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
