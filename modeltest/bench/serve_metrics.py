"""The figures `vllm bench serve` reports, from per-request measurements (pure functions).

Definitions (as `vllm bench serve` reports them): TTFT = time to the first chunk that carries content; ITL = the gaps
between successive content chunks, pooled over requests; TPOT = (E2EL - TTFT) / (output tokens - 1)
per request with more than one output token; E2EL = time to the last chunk. Throughputs are per
second of the whole run (first request sent to last answer). Goodput counts the successful
requests that meet every given SLO (milliseconds), per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: Optional[float] = None
    e2el_s: Optional[float] = None
    itl_s: List[float] = field(default_factory=list)  # gaps between content chunks
    error: Optional[str] = None

    @property
    def tpot_s(self) -> Optional[float]:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2el_s is None:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


def summarize(values_s: List[float]) -> Dict[str, Optional[float]]:
    """mean, median, std and percentiles, in milliseconds (None when there are no values)."""
    if not values_s:
        return {"mean_ms": None, "median_ms": None, "std_ms": None, **{f"p{p}_ms": None for p in PERCENTILES}}
    a = np.asarray(values_s, dtype=float) * 1000
    return {
        "mean_ms": float(a.mean()),
        "median_ms": float(np.median(a)),
        "std_ms": float(a.std()),
        **{f"p{p}_ms": float(np.percentile(a, p)) for p in PERCENTILES},
    }


def meets(r: RequestResult, slo_ms: Dict[str, float]) -> bool:
    got = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2el_s}
    for name, limit in slo_ms.items():
        value = got[name]
        if name == "tpot" and value is None and r.ok:  # a one-token answer has no TPOT to miss
            continue
        if value is None or value * 1000 > limit:
            return False
    return True


def serving_metrics(results: List[RequestResult], duration_s: float, slo_ms: Optional[Dict[str, float]] = None) -> Dict:
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out = {
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
        "output_token_throughput": output_tokens / duration_s if duration_s > 0 else None,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s if duration_s > 0 else None,
        "ttft": summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot": summarize([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl": summarize([g for r in ok for g in r.itl_s]),
        "e2el": summarize([r.e2el_s for r in ok if r.e2el_s is not None]),
        # AISBench's view of load: the mean number of requests in flight.
        "concurrency": sum(r.e2el_s for r in ok if r.e2el_s) / duration_s if duration_s > 0 else None,
    }
    if slo_ms:
        good = sum(1 for r in ok if meets(r, slo_ms))
        out["goodput"] = {
            "slo_ms": dict(slo_ms),
            "good_requests": good,
            "request_goodput": good / duration_s if duration_s > 0 else None,
        }
    errors: Dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    out["errors"] = errors
    return out


def parse_goodput(items: List[str]) -> Dict[str, float]:
    """["ttft:500", "tpot:50", "e2el:2000"] -> {"ttft": 500.0, ...} (milliseconds)."""
    from ..errors import UserError

    slo = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep:
            raise UserError(f"--goodput {item}: expected NAME:MILLISECONDS, e.g. ttft:500")
        if name not in ("ttft", "tpot", "e2el"):
            raise UserError(f"--goodput {item}: the SLO name must be ttft, tpot or e2el")
        try:
            slo[name] = float(value)
        except ValueError:
            raise UserError(f"--goodput {item}: expected NAME:MILLISECONDS, e.g. ttft:500") from None
    return slo
