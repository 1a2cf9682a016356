"""`modeltest bench --workload videobench-shared | serving-probe | kv-capacity`: the engine's reuse
and scheduling against the same engine with them off — one process, one model, the same inputs,
timed back to back (ratios: shared machines are noisy).

- videobench-shared: clips x questions per clip at a real clip's size (60 s of 640x360 at fps 0.5:
  30 frames, 4,485 video tokens), questions on one clip together as the harness orders them.
  Reuse on (prefix + vision cache) against off: samples/s, and the greedy tokens must be equal.
- serving-probe: 4 streams decoding; a long text prompt arrives. Chunked prefill (the default
  max_num_batched_tokens) against the whole prompt in one pass: the streams' longest gap between
  tokens against the long request's time to first token.
- kv-capacity: a fixed KV budget, requests with max_tokens 512 whose answers end after 20 tokens
  (each is ended there, as a stop token would). KV on demand against reserving prompt +
  max_tokens at admission: the most sequences running at once, and samples/s.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from ..errors import UserError

REUSE_WORKLOADS = ("videobench-shared", "serving-probe", "kv-capacity")
OFF = dict(prefix_cache=False, vision_cache=False)


def add_arguments(b) -> None:
    b.add_argument("--clips", type=int, default=2, help="videobench-shared: clips")
    b.add_argument("--questions-per-clip", type=int, default=3, help="videobench-shared: questions per clip")
    b.add_argument("--clip", default="30x640x360", help="videobench-shared: FRAMESxWxH (60 s at fps 0.5)")
    b.add_argument("--long-prompt", type=int, default=8192, help="serving-probe: tokens of the arriving prompt")
    b.add_argument("--max-num-batched-tokens", type=int, default=None, help="the engine's (default: per device)")


# The options each workload reads; any other option set away from its default is refused by name.
COMMON = {"preset", "workload", "dtype", "device", "json", "seed", "help"}
REUSE_OPTIONS = {"clips", "questions_per_clip", "clip", "long_prompt", "max_num_batched_tokens"}
READS = {
    "videobench-shared": COMMON
    | {"clips", "questions_per_clip", "clip", "new_tokens", "batch_sizes", "repeats", "max_num_batched_tokens"},
    "serving-probe": COMMON | {"long_prompt", "max_num_batched_tokens"},
    "kv-capacity": COMMON | {"max_num_batched_tokens"},
}


def refuse_unused_options(args) -> None:
    """An option the chosen workload does not read is refused, not ignored."""
    w, parser = args.workload, args.bench_parser
    # the command's own options (argparse keeps them in _actions; the namespace also holds the
    # CLI's bookkeeping, which is not an option)
    options = [a.dest for a in parser._actions if a.option_strings]
    unused = [
        k
        for k in options
        if (k not in READS[w] if w in READS else k in REUSE_OPTIONS) and getattr(args, k) != parser.get_default(k)
    ]
    if unused:
        raise UserError(f"--{unused[0].replace('_', '-')} does not apply to --workload {w}; leave it out")


def make_engine(path, dtype: str, device: str, max_batch: int, max_input: int, max_output: int, **overrides):
    """An engine by the harness's path, with EngineConfig fields overridden."""
    from ..engine.engine import LLMEngine
    from ..engine.parallel import init_distributed
    from .runners import bench_engine_config

    cfg = bench_engine_config(path, dtype, device, max_batch, max_input, max_output, **overrides)
    return LLMEngine(cfg, init_distributed(device))


def clip_questions(processor, clips: int, questions: int, frames: int, size, seed: int) -> List[dict]:
    """Processor outputs, clip-major: every question on clip 0, then on clip 1, ..."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for c in range(clips):
        small = rng.integers(0, 255, (frames, h // 16, w // 16, 3), dtype=np.uint8)
        video = torch.from_numpy(small.repeat(16, axis=1).repeat(16, axis=2)).permute(0, 3, 1, 2).float()
        for q in range(questions):
            content = [
                {"type": "video"},
                {
                    "type": "text",
                    "text": f"Question {q} on clip {c}: what happens? A.run B.walk C.sit D.jump \n Among the four "
                    "options A, B, C, D above, the one closest to the correct answer is:",
                },
            ]
            text = processor.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            out.append(processor(text=[text], videos=[video], return_tensors="pt"))
    return out


def timed_generate(engine, inputs: List[dict], new_tokens: int):
    """(seconds, tokens per request, reuse stats of this run) from empty caches."""
    from ..backends.engine import engine_reuse
    from ..engine.request import SamplingParams
    from ..inputs import ModelInput, engine_request

    engine.clear_caches()
    before = engine.stats(timings=False)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [engine_request(i, ModelInput(text="", inputs=dict(x)), params) for i, x in enumerate(inputs)]
    t0 = time.perf_counter()
    engine.generate(reqs)
    elapsed = time.perf_counter() - t0
    bad = [r.error for r in reqs if r.error]
    if bad:
        raise UserError(f"bench: a request failed ({bad[0]})")
    after = engine_reuse(engine.stats(timings=False))
    for k in ("prompt_tokens", "cached_prompt_tokens", "vision_cache_hits", "vision_cache_misses", "preemptions"):
        after[k] -= getattr(before, k)
    after["prefix_hit_rate"] = round(after["cached_prompt_tokens"] / max(1, after["prompt_tokens"]), 4)
    return elapsed, [r.output_ids for r in reqs], after


def videobench_shared(args, path, device, processor) -> Dict:
    frames, w, h = (int(v) for v in args.clip.lower().split("x"))
    inputs = clip_questions(processor, args.clips, args.questions_per_clip, frames, (w, h), args.seed)
    longest = max(x["input_ids"].shape[1] for x in inputs)
    new = args.new_tokens or 8
    batch = max(int(b) for b in args.batch_sizes.split(","))
    kw = dict(max_num_batched_tokens=args.max_num_batched_tokens)
    engines = {
        "on": make_engine(path, args.dtype, device, batch, longest, new, **kw),
        "off": make_engine(path, args.dtype, device, batch, longest, new, **kw, **OFF),
    }
    for e in engines.values():  # warm-up: kernels and allocator, not timed
        timed_generate(e, inputs[:1], 2)
    runs = {k: [] for k in engines}
    for _ in range(args.repeats):
        for name, e in engines.items():
            runs[name].append(timed_generate(e, inputs, new))
            print(f"[bench] videobench-shared reuse {name}: {runs[name][-1][0]:.2f} s", flush=True)
    ratio = statistics.median(off[0] / on[0] for on, off in zip(runs["on"], runs["off"]))
    on_s, off_s = (statistics.median(r[0] for r in runs[k]) for k in ("on", "off"))
    return {
        "workload": "videobench-shared",
        "clips": args.clips,
        "questions_per_clip": args.questions_per_clip,
        "prompt_tokens": [int(x["input_ids"].shape[1]) for x in inputs[: args.questions_per_clip]],
        "batch_size": batch,
        "new_tokens": new,
        "samples_per_s": {"reuse_on": round(len(inputs) / on_s, 4), "reuse_off": round(len(inputs) / off_s, 4)},
        "on_over_off": round(ratio, 3),
        "tokens_identical": all(a[1] == b[1] for a, b in zip(runs["on"], runs["off"])),
        "reuse": runs["on"][0][2],
        "repeats_s": {k: [round(r[0], 3) for r in v] for k, v in runs.items()},
    }


def stream_gaps(engine, long_prompt: int, streams: int = 4) -> Dict:
    """Streams decode; a long prompt arrives: the streams' longest gap between tokens from its
    arrival to its first token, against its time to first token."""
    from ..engine.request import Request, SamplingParams

    rng = np.random.default_rng(0)

    def text(rid, n, new):
        ids = rng.integers(1000, 50000, n).tolist()  # ordinary text tokens
        return Request(id=rid, input_ids=ids, params=SamplingParams(max_new_tokens=new, ignore_eos=True))

    engine.clear_caches()
    running = [text(f"s{i}", 64, 4096) for i in range(streams)]
    for r in running:
        engine.add_request(r)
    while min(len(r.output_ids) for r in running) < 4:
        engine.step()
    long = text("long", long_prompt, 1)
    token_times = {r.id: [] for r in running}
    engine.add_request(long)
    arrival = time.perf_counter()
    while long.t_first_token is None:
        counts = {r.id: len(r.output_ids) for r in running}
        engine.step()
        now = time.perf_counter()
        for r in running:
            if len(r.output_ids) > counts[r.id]:
                token_times[r.id].append(now)
    for r in running:
        engine.abort(r.id)
    while engine.has_work():
        engine.step()
    ttft = long.t_first_token - arrival
    gaps = [b - a for times in token_times.values() for a, b in zip([arrival] + times, times + [long.t_first_token])]
    return {"ttft_s": round(ttft, 3), "longest_gap_s": round(max(gaps), 3), "gap_over_ttft": round(max(gaps) / ttft, 3)}


def serving_probe(args, path, device) -> Dict:
    n = args.long_prompt
    engines = {
        "chunked": make_engine(
            path, args.dtype, device, 8, n + 64, 4096, max_num_batched_tokens=args.max_num_batched_tokens
        ),
        "one_pass": make_engine(path, args.dtype, device, 8, n + 64, 4096, max_num_batched_tokens=n + 64),
    }
    out = {"workload": "serving-probe", "long_prompt": n, "streams": 4}
    for name, e in engines.items():
        stream_gaps(e, min(n, 512))  # warm-up
        out[name] = stream_gaps(e, n)
        out[name]["max_num_batched_tokens"] = e.stats(timings=False).max_num_batched_tokens
        print(f"[bench] serving-probe {name}: {out[name]}", flush=True)
    return out


def running_at_once(engine, requests: int, prompt: int, max_tokens: int, answer: int) -> Dict:
    from ..engine.request import Request, SamplingParams

    rng = np.random.default_rng(1)
    reqs = [
        Request(
            id=i,
            input_ids=rng.integers(1000, 50000, prompt).tolist(),
            params=SamplingParams(max_new_tokens=max_tokens, ignore_eos=True),
        )
        for i in range(requests)
    ]
    engine.clear_caches()
    for r in reqs:
        engine.add_request(r)
    peak, t0 = 0, time.perf_counter()
    while engine.has_work():
        engine.step()
        peak = max(peak, engine.stats(timings=False).running)
        for r in reqs:
            if len(r.output_ids) >= answer and not r.is_done:
                engine.abort(r.id)  # the answer ends here (a stop token, for a real model)
    return {
        "peak_running": peak,
        "samples_per_s": round(requests / (time.perf_counter() - t0), 3),
        "preemptions": engine.stats(timings=False).preemptions,
    }


def kv_capacity(args, path, device) -> Dict:
    prompt, max_tokens, answer, requests, batch = 100, 512, 20, 64, 64
    budget = 8 * (prompt + max_tokens)  # KV tokens: 8 requests' worth if each reserves prompt + max_tokens
    kw = dict(kv_cache_tokens=budget, max_num_batched_tokens=args.max_num_batched_tokens)
    out = {"workload": "kv-capacity", "kv_cache_tokens": budget, "prompt": prompt, "max_tokens": max_tokens}
    for name, on_demand in (("on_demand", True), ("reserved", False)):
        e = make_engine(path, args.dtype, device, batch, prompt, max_tokens, kv_on_demand=on_demand, **kw)
        out[name] = running_at_once(e, requests, prompt, max_tokens, answer)
        print(f"[bench] kv-capacity {name}: {out[name]}", flush=True)
    out["on_demand_over_reserved"] = round(out["on_demand"]["peak_running"] / out["reserved"]["peak_running"], 2)
    return out


def main(args) -> int:
    from transformers import AutoProcessor

    from ..device import resolve_device
    from .presets import preset_checkpoint
    from .run import device_name

    device = resolve_device(args.device)
    path = preset_checkpoint(args.preset, args.seed)
    if args.workload == "videobench-shared":
        result = videobench_shared(args, path, device, AutoProcessor.from_pretrained(path))
    elif args.workload == "serving-probe":
        result = serving_probe(args, path, device)
    else:
        result = kv_capacity(args, path, device)
    result.update(
        preset=args.preset,
        device=device_name(device),
        dtype=args.dtype,
        command=" ".join(sys.argv),
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"json: {args.json}")
    return 0 if result.get("tokens_identical", True) else 1
