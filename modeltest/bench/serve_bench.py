"""`modeltest bench-serve TASK MODEL model.api_base=URL [...]`: drive any OpenAI-compatible server
with a task's samples — the same chat requests the `openai` backend sends — at a given
concurrency and/or request rate, and report what `vllm bench serve` reports (serve_metrics.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
from tabulate import tabulate
from termcolor import colored

from ..errors import SampleError, UserError, first_line
from .serve_metrics import PERCENTILES, RequestResult, parse_goodput, serving_metrics


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench-serve", help="benchmark a served deployment (as vllm bench serve does) with a task's samples"
    )
    b.add_argument("task")
    b.add_argument("model")
    b.add_argument("overrides", nargs="*", help="key=value as for `run`; model.api_base=http://HOST:PORT/v1 is needed")
    b.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    b.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: inf, all at once)",
    )
    b.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1: Poisson)")
    b.add_argument("--num-prompts", type=int, default=None, help="requests to send (default: every sample; cycled)")
    b.add_argument("--warmups", type=int, default=1, help="requests sent first and not counted")
    b.add_argument("--max-tokens", type=int, default=None, help="default: the task's output length")
    b.add_argument("--ignore-eos", action="store_true", help="generate max-tokens every time (vLLM extension)")
    b.add_argument(
        "--response-format",
        default=None,
        metavar="json_object|SCHEMA.json",
        help="structured output on every request: json_object, or a JSON-schema file (json_schema)",
    )
    b.add_argument(
        "--logprobs", type=int, default=None, metavar="N", help="ask each token's logprob and its N likeliest (0-20)"
    )
    b.add_argument("--goodput", nargs="*", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:2000")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, help="write the figures here")
    b.set_defaults(func=main)


def response_format(value):
    """--response-format -> the request's response_format (None: free text)."""
    if value is None:
        return None
    if value == "json_object":
        return {"type": "json_object"}
    try:
        schema = json.loads(Path(value).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--response-format {value}: json_object, or a JSON-schema file ({first_line(e)})") from None
    return {"type": "json_schema", "json_schema": {"name": Path(value).stem, "schema": schema}}


def request_options(args) -> dict:
    """What every request carries beside its messages: --response-format, --logprobs."""
    out = {}
    fmt = response_format(args.response_format)
    if fmt is not None:
        out["response_format"] = fmt
    if args.logprobs is not None:
        if not 0 <= args.logprobs <= 20:
            raise UserError(f"--logprobs {args.logprobs}: 0..20")
        out.update(logprobs=True, top_logprobs=args.logprobs)
    return out


async def one_request(
    client, model: str, request: dict, max_tokens: int, ignore_eos: bool, options: dict = None
) -> RequestResult:
    extra = dict(request["extra"])
    if ignore_eos:
        extra["ignore_eos"] = True
    start = time.perf_counter()
    first = last = None
    gaps: List[float] = []
    usage, chunks = None, 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=request["messages"],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
            **(options or {}),
        )
        async for chunk in stream:
            now = time.perf_counter()
            if getattr(chunk, "usage", None):
                usage = chunk.usage
            if any(c.delta and c.delta.content for c in chunk.choices or []):
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
    except Exception as e:  # a failed request is counted, and the benchmark goes on
        return RequestResult(ok=False, error=failure(e))
    end = time.perf_counter()
    return RequestResult(
        ok=True,
        prompt_tokens=(usage.prompt_tokens if usage else 0) or 0,
        output_tokens=usage.completion_tokens if usage and usage.completion_tokens is not None else chunks,
        ttft_s=(first - start) if first is not None else None,
        e2el_s=((last or end) - start),
        itl_s=gaps,
    )


def failure(e: Exception) -> str:
    """A failed request as the figures name it: the server's message, or what broke the
    connection (a reset is said to be one, not a plain connection failure)."""
    import httpx

    from ..backends.openai import server_error_message

    cause = e if isinstance(e, httpx.TransportError) else (e.__cause__ or e.__context__)
    if isinstance(cause, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return f"connection reset by the server ({type(cause).__name__}: {first_line(cause, 100, with_type=False)})"
    return server_error_message(getattr(e, "body", None), first_line(e, 120))


async def refused_extension(client, model: str, request: dict, field: str) -> Optional[str]:
    """Why the server refuses an extension field (one one-token request carrying it), or None."""
    import openai

    try:
        await client.chat.completions.create(
            model=model,
            messages=request["messages"],
            max_tokens=1,
            temperature=0,
            extra_body={**request["extra"], field: True},
        )
    except openai.APIStatusError as e:
        if 400 <= e.status_code < 500:
            return f"HTTP {e.status_code}: {failure(e)}"
    except openai.APIError:
        return None  # not an answer about the field: the run itself will show what is wrong
    return None


async def drive(args, api_base: str, api_key: str, model: str, requests: List[dict], max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=api_base, api_key=api_key, max_retries=0, timeout=3600)
    args.ignore_eos_refused = None
    if args.ignore_eos:
        args.ignore_eos_refused = await refused_extension(client, model, requests[0], "ignore_eos")
        if args.ignore_eos_refused:
            print(
                colored(
                    f"bench-serve: the server refuses ignore_eos ({args.ignore_eos_refused}); sending "
                    "without it: answers end where the model stops, so output lengths vary",
                    "yellow",
                ),
                flush=True,
            )
            args.ignore_eos = False
    for r in requests[: args.warmups]:
        await one_request(client, model, r, max_tokens, args.ignore_eos, args.options)
    n = args.num_prompts or len(requests)
    todo = [requests[i % len(requests)] for i in range(n)]
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = np.random.default_rng(args.seed)

    async def limited(r):
        if gate is None:
            return await one_request(client, model, r, max_tokens, args.ignore_eos, args.options)
        async with gate:
            return await one_request(client, model, r, max_tokens, args.ignore_eos, args.options)

    start = time.perf_counter()
    tasks = []
    for i, r in enumerate(todo):
        if i and np.isfinite(args.request_rate):
            await asyncio.sleep(float(rng.gamma(args.burstiness, 1.0 / (args.request_rate * args.burstiness))))
        tasks.append(asyncio.create_task(limited(r)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return {"results": results, "duration": duration}


def main(args) -> int:
    from ..backends.base import BackendSettings
    from ..backends.openai import OpenAIBackend, api_key
    from ..config import load_config
    from ..runner import max_new_tokens
    from ..tasks import TASKS

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UserError(f"--max-concurrency {args.max_concurrency}: must be at least 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserError(
            f"--num-prompts {args.num_prompts}: must be at least 1 (leave it out to send every sample once)"
        )
    if not args.request_rate > 0:
        raise UserError(f"--request-rate {args.request_rate}: must be above 0 (inf: all at once)")
    slo = parse_goodput(args.goodput)
    args.options = request_options(args)
    cfg = load_config(TASKS, args.task, args.model, [*args.overrides, "backend=openai"])
    task = TASKS[cfg.task.task_name](cfg.task, cfg.model)
    n_new = args.max_tokens or max_new_tokens(cfg)
    backend = OpenAIBackend(BackendSettings.from_eval(cfg, "cpu", n_new))
    requests = []
    for s in task.load_samples(cfg.run.limit):
        if s.load_error:
            continue
        try:
            requests.append(backend.prepare(s).request)
        except SampleError:
            continue
    backend.close()
    if not requests:
        raise UserError(f"{cfg.task.local_dataset_path}: no sample could be turned into a request")
    print(
        f"bench-serve: {args.num_prompts or len(requests)} request(s) from {len(requests)} {cfg.task.task_name} "
        f"sample(s) to {cfg.model.api_base} ({backend.served_name}), concurrency "
        f"{args.max_concurrency or 'unlimited'}, rate {args.request_rate}/s",
        flush=True,
    )
    run = asyncio.run(drive(args, cfg.model.api_base, api_key(cfg.model), backend.served_name, requests, n_new))
    figures = serving_metrics(run["results"], run["duration"], slo)
    report = {
        "task": cfg.task.task_name,
        "api_base": cfg.model.api_base,
        "model": backend.served_name,
        "max_concurrency": args.max_concurrency,
        "request_rate": args.request_rate,
        "burstiness": args.burstiness,
        "max_tokens": n_new,
        "ignore_eos": args.ignore_eos,
        "ignore_eos_refused": args.ignore_eos_refused,  # why it was dropped, if the server refused it
        "response_format": args.response_format,
        "logprobs": args.logprobs,
        **figures,
    }
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"json: {args.json}")
    return 0 if figures["successful_requests"] else 1


def print_report(r: dict) -> None:
    def f(x, digits=2):
        return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))

    rows = [
        ["Successful requests", r["successful_requests"]],
        ["Failed requests", r["failed_requests"]],
        ["Max concurrency", r["max_concurrency"] or "unlimited"],
        ["Request rate (req/s)", f(r["request_rate"])],
        ["Benchmark duration (s)", f(r["duration_s"])],
        ["Total input tokens", r["total_input_tokens"]],
        ["Total generated tokens", r["total_output_tokens"]],
        ["Request throughput (req/s)", f(r["request_throughput"])],
        ["Output token throughput (tok/s)", f(r["output_token_throughput"])],
        ["Total token throughput (tok/s)", f(r["total_token_throughput"])],
    ]
    if r.get("ignore_eos_refused"):
        rows.append(["ignore_eos", f"refused by the server, not sent ({r['ignore_eos_refused']})"])
    if "goodput" in r:
        rows.append(["Request goodput (req/s)", f(r["goodput"]["request_goodput"])])
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        s = r[name]
        rows.append([colored(title, attrs=["bold"]), ""])
        rows += [["  mean / median (ms)", f"{f(s['mean_ms'])} / {f(s['median_ms'])}"]]
        rows += [[f"  p{p} (ms)", f(s[f"p{p}_ms"])] for p in PERCENTILES[1:]]
    print(colored("\n============ Serving Benchmark Result ============", "cyan", attrs=["bold"]))
    print(tabulate(rows, tablefmt="plain"))
    for message, n in r["errors"].items():
        print(colored(f"{n} request(s) failed: {message}", "yellow"))
