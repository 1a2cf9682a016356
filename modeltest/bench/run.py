"""`modeltest bench`: one process, the same random-weight model and inputs through `engine` and `hf`.

Prints a table and writes JSON: one row per (backend, workload, batch size), the engine/hf ratio
for each workload (best batch size against best for textvqa/videobench, equal batch sizes for
decode), whether the greedy tokens matched, and on a GPU the decode memory bandwidth achieved at
batch 1 against the hardware's.

Order (`--order`): `paired` (default) loads every backend first and, for each repeat, runs each
(batch size, backend) in turn, so engine and hf are timed seconds apart and a slow spell on a
shared machine falls on both; the samples/s ratio is then the median of the per-repeat ratios.
`sequential` loads one backend at a time (half the memory; for models that fit only once).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch

from ..device import TORCH_DTYPES
from ..errors import UserError
from . import reuse
from .measure import rss_bytes
from .presets import preset_checkpoint
from .runners import EngineRunner, HFRunner
from .workloads import WorkloadSpec, build_inputs

# Peak HBM bandwidth (GB/s) by device name, for the speed-of-light comparison.
PEAK_BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "A100": 2039}
RATIO_KEYS = (
    "samples_per_s",
    "tokens_per_s",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "decode_ms_per_token",
    "vision_ms",
    "peak_host_mb",
    "peak_device_mb",
)


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark the engine against transformers' generate")
    b.add_argument(
        "--preset",
        default="tiny",
        help="tiny | mid | 2b | 7b | qwen2.5-mid | qwen2.5-3b | qwen2.5-7b (random weights, real shapes)",
    )
    b.add_argument(
        "--workload",
        default="textvqa",
        help="textvqa | videobench | decode | all (engine vs hf); videobench-shared | serving-probe | "
        "kv-capacity (the engine's reuse and scheduling against itself with them off: bench/reuse.py)",
    )
    b.add_argument("--requests", type=int, default=16)
    b.add_argument("--batch-sizes", default="1,8", help="comma list; each backend runs each, the best counts")
    b.add_argument("--new-tokens", type=int, default=None, help="default: 8 (textvqa/videobench), 128 (decode)")
    b.add_argument("--image-size", default="448x336", help="textvqa image WxH")
    b.add_argument("--frames", type=int, default=8, help="videobench frames per video")
    b.add_argument("--frame-size", default="336x252", help="videobench frame WxH")
    b.add_argument("--dtype", default="bf16", choices=list(TORCH_DTYPES))
    b.add_argument("--device", default="auto")
    b.add_argument("--backends", default="engine,hf")
    b.add_argument("--json", default=None, help="write the results here")
    b.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time each (backend, workload, batch size) this many times and keep the median run",
    )
    b.add_argument(
        "--order",
        default="paired",
        choices=["paired", "sequential"],
        help="paired: all backends loaded, repeats interleaved (robust ratios on a noisy machine); "
        "sequential: one backend loaded at a time (half the memory)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--check-requests",
        type=int,
        default=2,
        help="requests per workload in the fp32 token check run when --dtype is not fp32 (0: skip)",
    )
    reuse.add_arguments(b)
    b.set_defaults(func=main, bench_parser=b)


def _size(text: str, flag: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        return w, h
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected WxH, e.g. 448x336") from None


def median_run(runs: list):
    """The run with the median elapsed time (noisy shared machines: one slow or fast outlier
    moves neither the figure nor the ratio). Greedy decoding is deterministic, so the repeats
    must agree on every token; `repeats_agree` says whether they did."""
    chosen = sorted(runs, key=lambda m: m.elapsed_s)[len(runs) // 2]
    chosen.extra["repeats_s"] = [round(m.elapsed_s, 4) for m in runs]
    chosen.extra["repeats_agree"] = all(m.tokens == runs[0].tokens for m in runs)
    return chosen


def attribute_memory(m, resident_mb: float, load_device_mb: float, base_rss_mb: float) -> None:
    """A backend's peak memory, not charged for another backend loaded beside it (paired order)
    or for what an earlier one left behind (sequential): the process's RSS before any backend
    loaded + this backend's resident growth (load and first warm-up) + the growth during this
    run; on a device, this backend's load allocations + the run's growth."""
    m.peak_host_mb = base_rss_mb + resident_mb + m.host_growth_mb
    if m.device_growth_mb is not None:
        m.peak_device_mb = load_device_mb + m.device_growth_mb


def measure_together(
    runners: dict, workloads, inputs, specs, batch_sizes, repeats, preset, base_rss_mb: float
) -> Dict[str, List]:
    """Time loaded backends side by side, each repeat running every (batch size, backend) in
    turn; returns each workload's median runs."""
    from tqdm import tqdm

    # The bar moves between timed runs only (never inside one), with an ETA for long presets.
    bar = tqdm(
        total=len(workloads) * repeats * len(batch_sizes) * len(runners),
        desc=f"bench {'+'.join(runners)}",
        unit="run",
        leave=False,
    )
    resident: Dict[str, float] = {}
    out: Dict[str, List] = {}
    for w in workloads:
        for backend, runner in runners.items():
            before = rss_bytes()
            runner.run(inputs[w][:1], 2, 1)  # warm-up
            # transformers maps the checkpoint lazily: its weights become resident at the first
            # forward, not at load. Load growth + the first warm-up's growth counts both.
            resident.setdefault(backend, runner.load_growth_mb["rss"] + max(0.0, (rss_bytes() - before) / 2**20))
        runs = {(b, bs): [] for b in runners for bs in batch_sizes}
        for _ in range(repeats):
            for bs in batch_sizes:
                for backend, runner in runners.items():
                    bar.set_postfix_str(f"{w} {backend} batch {bs}")
                    m = runner.run(inputs[w], specs[w].new_tokens, bs)
                    attribute_memory(m, resident[backend], runner.load_device_mb, base_rss_mb)
                    runs[(backend, bs)].append(m)
                    bar.update()
        out[w] = [median_run(ms) for ms in runs.values()]
        for (backend, bs), m in zip(runs, out[w]):
            bar.write(f"[bench] {backend:6s} {w:10s} batch {bs:3d}: {m.row(w, preset)['samples_per_s']} samples/s")
    bar.close()
    return out


def main(args) -> int:
    from transformers import AutoProcessor

    from ..device import resolve_device

    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be at least 1")
    reuse.refuse_unused_options(args)
    if args.workload in reuse.REUSE_WORKLOADS:
        return reuse.main(args)
    device = resolve_device(args.device)
    workloads = ["textvqa", "videobench", "decode"] if args.workload == "all" else [args.workload]
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    backends = args.backends.split(",")
    path = preset_checkpoint(args.preset, args.seed)
    processor = AutoProcessor.from_pretrained(path)
    specs, inputs = {}, {}
    for w in workloads:
        specs[w] = WorkloadSpec(
            name=w,
            requests=args.requests,
            new_tokens=args.new_tokens or (128 if w == "decode" else 8),
            image_size=_size(args.image_size, "--image-size"),
            frames=args.frames,
            frame_size=_size(args.frame_size, "--frame-size"),
        )
        inputs[w] = build_inputs(processor, specs[w], seed=args.seed)
    max_input = max(x["input_ids"].shape[1] for w in workloads for x in inputs[w])
    max_output = max(s.new_tokens for s in specs.values())

    def make_runner(backend):
        if backend == "engine":
            return EngineRunner(path, args.dtype, device, max(batch_sizes), max_input, max_output)
        return HFRunner(path, TORCH_DTYPES[args.dtype], device)

    measurements, load, engine_sizes = measure_backends(
        args, backends, make_runner, workloads, inputs, specs, batch_sizes, device
    )
    report = build_report(
        args,
        measurements,
        workloads,
        batch_sizes,
        device,
        load,
        engine_sizes.get("bytes_lm"),
        engine_sizes.get("shard_mb"),
    )
    report["repeats"] = args.repeats
    unstable = [
        {"workload": w, "backend": m.backend, "batch_size": m.batch_size, "problem": "tokens differ between repeats"}
        for w in workloads
        for m in measurements[w]
        if not m.extra.get("repeats_agree", True)
    ]
    if unstable:
        report["tokens_match"], report["mismatches"] = False, (unstable + report["mismatches"])[:10]
    check_tokens_in_fp32(args, report, path, device, inputs, specs, workloads, backends)
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"json: {args.json}")
    return 0 if report["tokens_match"] is not False else 1


def measure_backends(args, backends, make_runner, workloads, inputs, specs, batch_sizes, device):
    """Every backend's measurements per workload, with their load growth and the engine's sizes:
    all backends loaded at once and interleaved (--order paired), or one after the other."""
    measurements: Dict[str, List] = {w: [] for w in workloads}
    load, engine_sizes = {}, {}
    base_rss_mb = rss_bytes() / 2**20
    groups = [backends] if args.order == "paired" else [[b] for b in backends]
    try:
        for group in groups:
            runners = {b: make_runner(b) for b in group}
            for backend, runner in runners.items():
                load[backend] = runner.load_growth_mb
                if backend == "engine":
                    stats = runner.engine.stats()
                    engine_sizes = {"bytes_lm": stats.decode_weight_bytes, "shard_mb": stats.shard_bytes / 2**20}
            timed = measure_together(
                runners, workloads, inputs, specs, batch_sizes, args.repeats, args.preset, base_rss_mb
            )
            for w in workloads:
                measurements[w] += timed[w]
            del runners
            if device == "cuda":
                torch.cuda.empty_cache()
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5; the same class
        if args.order != "paired":
            raise
        raise UserError(
            "bench: out of device memory with every backend loaded at once (--order paired); "
            "rerun with --order sequential"
        ) from None
    return measurements, load, engine_sizes


def check_tokens_in_fp32(args, report, path, device, inputs, specs, workloads, backends) -> None:
    """In bf16/fp16, move the token comparison's verdict to `lowp_*` and check tokens in fp32."""
    if args.dtype != "fp32" and report["tokens_match"] is not None and args.check_requests > 0:
        # Random weights make near-ties between top logits common, and bf16/fp16 rounding then
        # flips some of them differently in two correct implementations. Token equality is a
        # correctness property, so it is checked where the arithmetic is precise: fp32, same inputs.
        report["lowp_mismatches"] = report.pop("mismatches")
        report["lowp_tokens_match"] = report["tokens_match"]
        check = fp32_token_check(
            path,
            device,
            {w: inputs[w][: args.check_requests] for w in workloads},
            {w: min(specs[w].new_tokens, 16) for w in workloads},
            backends,
        )
        report["tokens_match"], report["mismatches"] = not check, check[:10]
        report["tokens_checked_in"] = "fp32"


def fp32_token_check(path, device, inputs, new_tokens, backends) -> list:
    """Greedy tokens of both backends in fp32, each request alone; returns the mismatches."""
    tokens = {}
    for backend in backends:
        runner = (
            EngineRunner(
                path,
                "fp32",
                device,
                1,
                max(x["input_ids"].shape[1] for v in inputs.values() for x in v),
                max(new_tokens.values()),
            )
            if backend == "engine"
            else HFRunner(path, torch.float32, device)
        )
        for w, xs in inputs.items():
            tokens[(backend, w)] = runner.run(xs, new_tokens[w], 1).tokens
        del runner
    out = []
    for w in inputs:
        for i, (a, b) in enumerate(zip(tokens[("engine", w)], tokens[("hf", w)])):
            if a != b:
                out.append({"workload": w, "batch_size": 1, "request": i, "engine": a, "hf": b, "dtype": "fp32"})
    return out


def build_report(args, measurements, workloads, batch_sizes, device, load, bytes_lm, shard_mb) -> dict:
    rows, ratios, mismatches, hf_drift = [], [], [], {}
    for w in workloads:
        ms = measurements[w]
        rows += [m.row(w, args.preset) for m in ms]
        by = {(m.backend, m.batch_size): m for m in ms}
        if "engine" in {m.backend for m in ms} and "hf" in {m.backend for m in ms}:
            # The reference is transformers at the smallest batch size (each request nearly alone):
            # its own padded batches can drift in bf16, which is reported, not held against the engine.
            reference = by[("hf", batch_sizes[0])].tokens
            for bs in batch_sizes:
                for i, (a, b) in enumerate(zip(by[("engine", bs)].tokens, reference)):
                    if a != b:
                        mismatches.append({"workload": w, "batch_size": bs, "request": i, "engine": a, "hf": b})
                hf_drift[f"{w}/batch{bs}"] = sum(a != b for a, b in zip(by[("hf", bs)].tokens, reference))
            pairs = (
                [(bs, bs) for bs in batch_sizes]
                if w == "decode"
                else [
                    (
                        max((m for m in ms if m.backend == "engine"), key=lambda m: m.elapsed_s * -1).batch_size,
                        max((m for m in ms if m.backend == "hf"), key=lambda m: m.elapsed_s * -1).batch_size,
                    )
                ]
            )
            for ebs, hbs in pairs:
                er, hr = by[("engine", ebs)].row(w, args.preset), by[("hf", hbs)].row(w, args.preset)
                ratio = {
                    "workload": w,
                    "engine_batch_size": ebs,
                    "hf_batch_size": hbs,
                    **{k: round(er[k] / hr[k], 3) if er[k] and hr[k] else None for k in RATIO_KEYS},
                }
                if args.order == "paired" and args.repeats > 1:
                    # Repeat r of engine and of hf ran seconds apart: each pair shares the machine's
                    # state, so the median of their ratios is the figure least moved by other tenants.
                    paired = [
                        round(h / e, 3)
                        for e, h in zip(by[("engine", ebs)].extra["repeats_s"], by[("hf", hbs)].extra["repeats_s"])
                    ]
                    ratio["samples_per_s_by_repeat"] = paired
                    ratio["samples_per_s"] = statistics.median(paired)
                ratios.append(ratio)
    report = {
        "preset": args.preset,
        "device": device_name(device),
        "dtype": args.dtype,
        "requests": args.requests,
        "order": args.order,
        "results": rows,
        "ratios": ratios,
        "tokens_match": None if not ratios else not mismatches,
        "mismatches": mismatches[:10],
        "hf_batch_drift": hf_drift,
        "load_host_growth_mb": load,
        "engine_shard_mb": shard_mb,
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda" and bytes_lm:
        decode_b1 = next(
            (r for r in rows if r["backend"] == "engine" and r["workload"] == "decode" and r["batch_size"] == 1), None
        )
        if decode_b1 and decode_b1["decode_ms_per_token"]:
            achieved = bytes_lm / (decode_b1["decode_ms_per_token"] / 1000) / 1e9
            peak = next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in report["device"]), None)
            report["bandwidth"] = {
                "model_gb": round(bytes_lm / 1e9, 3),
                "achieved_gbs": round(achieved, 1),
                "peak_gbs": peak,
                "fraction": round(achieved / peak, 3) if peak else None,
            }
    return report


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    if device == "npu":
        return "Ascend NPU"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_report(report: dict) -> None:
    from tabulate import tabulate
    from termcolor import colored

    cols = [
        "backend",
        "workload",
        "batch_size",
        "samples_per_s",
        "tokens_per_s",
        "ttft_p50_ms",
        "ttft_p90_ms",
        "decode_ms_per_token",
        "vision_ms",
        "peak_host_mb",
        "peak_device_mb",
    ]
    repeats = report.get("repeats", 1)
    timing = f" | median of {repeats} runs each, {report.get('order', 'sequential')} order" if repeats > 1 else ""
    print(
        colored(f"\npreset {report['preset']} | {report['device']} | {report['dtype']}{timing}", "cyan", attrs=["bold"])
    )
    print(tabulate([[r[c] for c in cols] for r in report["results"]], headers=cols, tablefmt="github"))
    if report["ratios"]:
        rcols = [
            "workload",
            "engine_batch_size",
            "hf_batch_size",
            "samples_per_s",
            "tokens_per_s",
            "ttft_p50_ms",
            "decode_ms_per_token",
            "vision_ms",
            "peak_host_mb",
        ]
        print(colored("\nengine / hf", "cyan", attrs=["bold"]))
        if any("samples_per_s_by_repeat" in r for r in report["ratios"]):
            rcols.append("samples_per_s_by_repeat")
            print("samples_per_s: median of the per-repeat ratios (engine and hf timed back to back)")
        print(tabulate([[r.get(c) for c in rcols] for r in report["ratios"]], headers=rcols, tablefmt="github"))
    if "bandwidth" in report:
        b = report["bandwidth"]
        print(f"decode bandwidth at batch 1: {b['achieved_gbs']} GB/s of {b['peak_gbs']} GB/s ({b['fraction']})")
    where = f" (checked in {report['tokens_checked_in']})" if "tokens_checked_in" in report else ""
    if report["tokens_match"] is False:
        print(colored(f"TOKENS DIFFER between engine and hf{where}: {report['mismatches'][:3]}", "red", attrs=["bold"]))
    elif report["tokens_match"]:
        print(colored(f"tokens match between engine and hf{where}", "green"))
    if report.get("lowp_tokens_match") is False:
        n = len(report["lowp_mismatches"])
        print(
            colored(
                f"note: {n}+ request(s) differ in {report['dtype']} (near-tied logits on random weights "
                "round differently); see lowp_mismatches",
                "yellow",
            )
        )
