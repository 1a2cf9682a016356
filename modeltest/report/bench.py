"""`modeltest report --bench A.json B.json ...`: benchmark JSONs side by side (the first is the
baseline), the ratio of each figure, and the regressions (worse by more than a threshold)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import pandas as pd

from ..errors import UserError

HIGHER_IS_BETTER = {
    "samples_per_s",
    "tokens_per_s",
    "request_throughput",
    "output_token_throughput",
    "total_token_throughput",
}
LOWER_IS_BETTER = {
    "ttft_p50_ms",
    "ttft_p90_ms",
    "decode_ms_per_token",
    "vision_ms",
    "peak_host_mb",
    "peak_device_mb",
    "ttft.median_ms",
    "ttft.p99_ms",
    "tpot.median_ms",
    "itl.p99_ms",
    "e2el.median_ms",
    "e2el.p99_ms",
}


def _rows(path: Path) -> List[Tuple[str, str, float]]:
    """(row name, figure, value) of a `modeltest bench` or `modeltest bench-serve` JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable benchmark JSON ({e})") from None
    out = []
    if isinstance(data, dict) and isinstance(data.get("results"), list):  # modeltest bench
        for r in data["results"]:
            name = f"{r.get('workload')} {r.get('backend')} batch {r.get('batch_size')}"
            out += [(name, k, float(r[k])) for k in HIGHER_IS_BETTER | LOWER_IS_BETTER if r.get(k) is not None]
    elif isinstance(data, dict) and "request_throughput" in data:  # modeltest bench-serve
        name = f"serve {data.get('task')} concurrency {data.get('max_concurrency') or 'unlimited'}"
        for k in HIGHER_IS_BETTER | LOWER_IS_BETTER:
            head, _, tail = k.partition(".")
            v = data.get(head)
            v = v.get(tail) if tail and isinstance(v, dict) else (v if not tail else None)
            if isinstance(v, (int, float)):
                out.append((name, k, float(v)))
    else:
        raise UserError(f"{path}: neither a `modeltest bench` nor a `modeltest bench-serve` JSON")
    return out


def compare_bench(paths: List[str], threshold: float = 0.05) -> pd.DataFrame:
    tables = [{(n, k): v for n, k, v in _rows(Path(p))} for p in paths]
    rows = []
    for key, base in sorted(tables[0].items()):
        for p, t in zip(paths[1:], tables[1:]):
            if key not in t or base == 0:
                continue
            ratio = t[key] / base
            worse = ratio < 1 - threshold if key[1] in HIGHER_IS_BETTER else ratio > 1 + threshold
            rows.append(
                {
                    "row": key[0],
                    "figure": key[1],
                    "baseline": base,
                    "run": Path(p).name,
                    "value": t[key],
                    "ratio": ratio,
                    "regression": bool(worse),
                }
            )
    return pd.DataFrame(rows, columns=["row", "figure", "baseline", "run", "value", "ratio", "regression"])
