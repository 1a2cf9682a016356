"""The reference runner's interface: one image/video (or every one in a folder) through the model,
with answers, token counts and performance figures.

    bash scripts/run_pa.sh --model_path DIR --input_image FILE --input_text "..." \\
         --max_batch_size 1 --max_input_length 4096 --max_output_length 256
    ATB_LLM_BENCHMARK_ENABLE=1 bash scripts/run_pa.sh ...     # + prefill/decode figures and a CSV

A single --input_image is replicated max_batch_size times (a batch of identical requests, as the
reference does for performance runs); with --dataset_path every image/video file in the folder is
one request, scheduled max_batch_size at a time with continuous batching.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .backends.base import Prepared
from .config.schema import ModelConfig
from .core import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Sample
from .engine.request import DEFAULT_MAX_INPUT_LENGTH, DEFAULT_MAX_OUTPUT_LENGTH
from .errors import SampleError, UserError

BENCH_COLUMNS = [
    "batch_size",
    "input_seq_len",
    "output_seq_len",
    "e2e_time(ms)",
    "prefill_time(ms)",
    "decoder_token_time(ms)",
    "prefill_count",
    "prefill_token_times",
    "decode_token_times",
    "prefill_average_time(ms)",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_pa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model_path", required=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input_image", help="an image (.jpg .jpeg .png .bmp) or video (.mp4 .wmv .avi) file")
    src.add_argument("--dataset_path", help="a folder: every image/video file in it is one request")
    p.add_argument("--input_text", default=None, help="the question (default: describe the image/video)")
    p.add_argument("--max_batch_size", type=int, default=1)
    p.add_argument("--max_input_length", type=int, default=DEFAULT_MAX_INPUT_LENGTH)
    p.add_argument("--max_output_length", type=int, default=DEFAULT_MAX_OUTPUT_LENGTH)
    p.add_argument("--results_save_path", default="./results.json")
    p.add_argument("--backend", choices=("engine", "hf"), default="engine")
    p.add_argument("--device", default="auto", choices=("auto", "npu", "cuda", "cpu"))
    p.add_argument(
        "--data_type", default=None, choices=("bf16", "fp16", "fp32"), help="default: config.json torch_dtype"
    )
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument(
        "--max_num_batched_tokens", type=int, default=None, help="new tokens per engine pass (default: per device)"
    )
    p.add_argument("--no_prefix_cache", action="store_true", help="prefill every prompt whole (engine)")
    p.add_argument("--no_vision_cache", action="store_true", help="run the vision tower for every request (engine)")
    p.add_argument("--video_fps", type=float, default=0.5, help="frames sampled per second (reference: 0.5)")
    p.add_argument("--ignore_eos", action="store_true", help="always generate max_output_length tokens")
    p.add_argument("--world_size", type=int, default=None, help="read by scripts/run_pa.sh (torchrun processes)")
    p.add_argument("--shm_name_save_path", default=None, help="accepted for compatibility; unused")
    return p.parse_args(argv)


def media_files(args) -> List[Path]:
    if args.dataset_path:
        folder = Path(args.dataset_path)
        if not folder.is_dir():
            raise UserError(f"--dataset_path: '{folder}' is not a folder")
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        if not files:
            raise UserError(f"--dataset_path: no {' '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)} files in '{folder}'")
        return files
    if args.input_image:
        f = Path(args.input_image)
        if not f.is_file():
            raise UserError(f"--input_image: '{f}' does not exist")
        if f.suffix.lower() not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            raise UserError(
                f"--input_image: '{f.suffix}' is neither an image ({' '.join(IMAGE_EXTENSIONS)}) "
                f"nor a video ({' '.join(VIDEO_EXTENSIONS)})"
            )
        return [f] * max(1, args.max_batch_size)
    return []


def build_samples(args) -> List[Sample]:
    files = media_files(args)
    if not files:  # text only
        return [
            Sample(id=str(i), subject="run_pa", prompt=args.input_text or "Who are you?")
            for i in range(max(1, args.max_batch_size))
        ]
    samples = []
    for i, f in enumerate(files):
        video = f.suffix.lower() in VIDEO_EXTENSIONS
        text = args.input_text or ("Describe this video." if video else "Describe this image.")
        samples.append(
            Sample(
                id=str(i),
                subject="run_pa",
                prompt=text,
                images=[] if video else [str(f)],
                videos=[str(f)] if video else [],
                video_options={"fps": args.video_fps},
            )
        )
    return samples


def main(argv=None) -> int:
    from .cli import quiet_libraries

    args = parse_args(argv)
    quiet_libraries()
    try:
        return run(args)
    except UserError as e:
        print(f"run_pa: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from .backends import make_backend

    settings = backend_settings(args)
    samples = build_samples(args)  # a file that is not there: one line, before the model loads
    backend = make_backend(settings)
    prepared, errors = prepare_all(backend, samples, args.max_input_length)
    start = time.perf_counter()
    outputs = backend.generate(prepared, args.max_output_length, ignore_eos=args.ignore_eos)
    elapsed = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    by_sample = {id(p.sample): o for p, o in zip(prepared, outputs)}
    results, generated = [], 0
    for i, s in enumerate(samples):
        results.append(report_one(i, s, by_sample.get(id(s)), errors.get(i)))
        generated += len(results[-1]["output_token_ids"])
    print(f"Latency(s): {elapsed:.4f}")
    print(f"Throughput(tokens/s): {generated / elapsed:.4f}" if elapsed > 0 else "Throughput(tokens/s): n/a")
    bad = sum(1 for r in results if r["error"])
    if bad:
        print(f"{bad} of {len(samples)} request(s) failed (see 'error' in the results file)", file=sys.stderr)
    out = Path(args.results_save_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"results: {out}")
    if os.environ.get("ATB_LLM_BENCHMARK_ENABLE") == "1" and prepared:
        write_benchmark(args, backend, prepared, outputs, elapsed)
    return 0


def backend_settings(args):
    """The backend's settings from the reference runner's arguments, checked before it loads."""
    from .backends import traits
    from .backends.base import BackendSettings
    from .config.loader import resolve_data_type, unused_engine_setting
    from .device import resolve_device
    from .engine.config import read_checkpoint_config

    model_path = Path(args.model_path)
    if not (model_path / "config.json").is_file():
        raise UserError(f"--model_path: '{model_path}' has no config.json; point it at a Qwen2-VL weights folder")
    read_checkpoint_config(model_path)
    mcfg = ModelConfig(
        model_path=str(model_path),
        backend=args.backend,
        data_type=args.data_type,
        block_size=args.block_size,
        prefix_cache=not args.no_prefix_cache,
        vision_cache=not args.no_vision_cache,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    unused = unused_engine_setting(mcfg)
    if unused:
        flag = {"prefix_cache": "--no_prefix_cache", "vision_cache": "--no_vision_cache"}.get(unused, f"--{unused}")
        raise UserError(f"{flag} is an engine setting; use it with --backend engine, not {args.backend}")
    mcfg.data_type = resolve_data_type(mcfg)
    if not traits(args.backend).tensor_parallel and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--backend {args.backend} runs in one process; use --backend engine for --world_size > 1")
    return BackendSettings(
        model=mcfg,
        device=resolve_device(args.device),
        max_batch_size=args.max_batch_size,
        max_input_length=args.max_input_length,
        max_output_length=args.max_output_length,
    )


def prepare_all(backend, samples: List[Sample], max_input_length: int) -> Tuple[List[Prepared], Dict[int, str]]:
    """Each request's model input; a file that cannot be read, or an input that is too long, is
    that request's error (by its index) and the others run."""
    prepared: List[Prepared] = []
    errors: Dict[int, str] = {}
    for i, s in enumerate(samples):
        try:
            p = backend.prepare(s)
        except SampleError as e:
            errors[i] = str(e)
            continue
        if p.input_length > max_input_length:
            errors[i] = f"input is {p.input_length} tokens, over --max_input_length {max_input_length}"
            continue
        prepared.append(p)
    return prepared, errors


def report_one(i: int, s: Sample, o, error: Optional[str]) -> Dict:
    """Print one request's question and answer (the reference's lines); its results.json entry."""
    media = (s.images + s.videos or [None])[0]
    error = error or (o.error if o else None)
    print(f"Question[{i}]: {s.prompt}")
    if error:
        print(f"Answer[{i}]: ERROR {error}")
        return {
            "input": {"text": s.prompt, "media": media},
            "output": None,
            "output_token_ids": [],
            "prefill_time": None,
            "decode_token_time": None,
            "e2e_time": None,
            "error": error,
        }
    n = len(o.token_ids)
    # JSON-quoted so that whitespace and control tokens in the answer stay visible.
    print(f"Answer[{i}]: {json.dumps(o.text, ensure_ascii=False)}")
    print(f"Generate[{i}] token num: {n}")
    decode_token = (o.decode_time / (n - 1)) if (o.decode_time is not None and n > 1) else None
    return {
        "input": {"text": s.prompt, "media": media},
        "output": o.text,
        "output_token_ids": o.token_ids,
        "prefill_time": o.prefill_time,
        "decode_token_time": decode_token,
        "e2e_time": o.e2e_time,
        "error": None,
    }


def write_benchmark(args, backend, prepared, outputs, elapsed: float) -> None:
    """The reference's performance line and CSV (README "scripts/run_pa.sh")."""
    from .backends.engine import EngineBackend

    if isinstance(backend, EngineBackend):
        stats = backend.engine.stats()
        prefill, decode = [t * 1000 for t in stats.prefill_times], [t * 1000 for t in stats.decode_times]
    else:  # transformers' generate does not expose its steps: only end-to-end is known
        prefill, decode = [], []
    prefill_time = prefill[0] if prefill else float("nan")
    prefill_avg = statistics.fmean(prefill) if prefill else float("nan")
    # Reference: total decode time / (max_new_tokens - 1); a decode pass makes one token per request.
    decode_token = statistics.fmean(decode) if decode else float("nan")
    e2e = elapsed * 1000
    print(
        f"Prefill time: {prefill_time:.3f}ms, Prefill average time: {prefill_avg:.3f}ms, "
        f"Decode token time: {decode_token:.3f}ms, E2E time: {e2e:.3f}ms"
    )
    path = Path(os.environ.get("ATB_LLM_BENCHMARK_FILEPATH", "./benchmark_result/benchmark.csv"))
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(BENCH_COLUMNS)
        w.writerow(
            [
                args.max_batch_size,
                round(statistics.fmean(p.input_length for p in prepared)),
                round(statistics.fmean(len(o.token_ids) for o in outputs)),
                f"{e2e:.3f}",
                f"{prefill_time:.3f}",
                f"{decode_token:.3f}",
                len(prefill),
                " ".join(f"{t:.3f}" for t in prefill),
                " ".join(f"{t:.3f}" for t in decode),
                f"{prefill_avg:.3f}",
            ]
        )
    print(f"benchmark csv: {path}")


if __name__ == "__main__":
    from .cli import exit_process

    exit_process(main())
