"""Comparisons between runs of one task (pure functions over loaded runs).

Scores are recomputed from the records (the mean of per-sample scores), and the difference of
each run to the baseline gets a 95% interval from a paired bootstrap over the samples both runs
scored (matched by subject and id), with a fixed seed so the report is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd

from .load import Run

BOOTSTRAP_SAMPLES = 2000
SEED = 0


def paired_bootstrap(
    base: np.ndarray, other: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED
) -> Tuple[float, float]:
    """95% interval of mean(other - base) over paired per-sample scores: resample the pairs with
    replacement `samples` times (numpy's default_rng(seed)), take the 2.5th and 97.5th percentiles."""
    diff = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    if diff.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(samples, diff.size))
    means = diff[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def subjects(run: Run) -> List[str]:
    """The task's overall row name first, then the subjects (as in the result CSV)."""
    names = list(dict.fromkeys(run.records["subject"]))
    return [run.task] + ([s for s in names if s != run.task] if len(names) > 1 or names != [run.task] else [])


def _rows_of(run: Run, subject: str) -> pd.DataFrame:
    r = run.records
    return r if subject == run.task else r[r["subject"] == subject]


def score_table(runs: List[Run], baseline: int = 0) -> pd.DataFrame:
    """One row per (subject, run): value (the run's mean over its own samples), total, errors,
    unparsed, and — over the samples both this run and the baseline scored (`paired`) — the delta
    to the baseline and its paired-bootstrap interval, significant when the interval excludes
    zero."""
    base = runs[baseline]
    out = []
    for subject in subjects(base):
        b = _rows_of(base, subject).set_index(["subject", "id"])
        for i, run in enumerate(runs):
            rows = _rows_of(run, subject)
            value = float(rows["score"].mean()) if len(rows) else float("nan")
            entry = {
                "task": run.task,
                "subject": subject,
                "run": run.label,
                "value": value,
                "total": int(len(rows)),
                "errors": int(rows["error"].notna().sum()),
                "unparsed": int((rows["error"].isna() & rows["prediction"].isna()).sum()),
                "delta": None,
                "ci_low": None,
                "ci_high": None,
                "paired": None,
                "significant": None,
            }
            if i != baseline:
                o = rows.set_index(["subject", "id"])
                both = b.index.intersection(o.index)
                bs, os_ = b.loc[both, "score"].to_numpy(float), o.loc[both, "score"].to_numpy(float)
                lo, hi = paired_bootstrap(bs, os_)
                entry.update(
                    # over the samples both runs scored, as the interval is: with different sample
                    # sets (a --limit, a failed shard) the runs' own means are not comparable
                    delta=float(os_.mean() - bs.mean()) if len(both) else None,
                    ci_low=lo,
                    ci_high=hi,
                    paired=int(len(both)),
                    significant=bool(lo > 0 or hi < 0),
                )
            out.append(entry)
    table = pd.DataFrame(out)
    table["paired"] = table["paired"].astype("Int64")
    return table


def weighted_rows(runs: List[Run], baseline: int = 0) -> pd.DataFrame:
    """VideoBench's group scores and weighted score per run (from the result rows), with deltas."""
    out = []
    base = {r["tasks"]: r["value"] for r in runs[baseline].rows if r.get("metric") == "weighted_acc"}
    for run in runs:
        for r in run.rows:
            if r.get("metric") == "weighted_acc" and r.get("value") is not None:
                b = base.get(r["tasks"])
                out.append(
                    {
                        "run": run.label,
                        "score": r["tasks"],
                        "value": r["value"],
                        "delta": (r["value"] - b) if b is not None and run is not runs[baseline] else None,
                    }
                )
    return pd.DataFrame(out)


def _flatten(d, prefix="") -> Dict[str, object]:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


IGNORED_CONFIG_KEYS = ("command", "overrides", "model_file", "task_file")


def config_diff(runs: List[Run]) -> pd.DataFrame:
    """The saved-configuration keys whose values differ between runs (model, dtype, backend,
    tp/dp, batch size, preprocessing options, library versions...)."""
    flat = [{k: v for k, v in _flatten(r.config).items() if not k.startswith(IGNORED_CONFIG_KEYS)} for r in runs]
    keys = sorted(set().union(*flat))
    rows = []
    for k in keys:
        values = [f.get(k) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append({"key": k, **{r.label: _show(v) for r, v in zip(runs, values)}})
    return pd.DataFrame(rows, columns=["key"] + [r.label for r in runs])


def _show(v) -> str:
    return "" if v is None else (v if isinstance(v, str) else str(v))


def changed_samples(base: Run, other: Run) -> pd.DataFrame:
    """Samples scored in both whose score changed (better or worse), with both outputs."""
    a = base.records.set_index(["subject", "id"])
    b = other.records.set_index(["subject", "id"])
    both = a.index.intersection(b.index)
    a, b = a.loc[both], b.loc[both]
    changed = a.index[(a["score"] - b["score"]).abs() > 1e-12]
    rows = []
    for key in changed:
        ra, rb = a.loc[key], b.loc[key]
        rows.append(
            {
                "subject": key[0],
                "id": key[1],
                "change": "better" if rb["score"] > ra["score"] else "worse",
                "prompt": ra["prompt"],
                "media": ra["media"],
                "gold": _show(ra["gold"]),
                f"output ({base.label})": _show(ra["output"]),
                f"output ({other.label})": _show(rb["output"]),
                f"score ({base.label})": ra["score"],
                f"score ({other.label})": rb["score"],
            }
        )
    return pd.DataFrame(rows)


def error_groups(runs: List[Run]) -> pd.DataFrame:
    """Errors by message (the message with digits folded, so one cause is one row), per run."""
    rows = []
    for run in runs:
        errs = run.records["error"].dropna()
        for message, n in errs.str.replace(r"\d+", "N", regex=True).value_counts().items():
            rows.append({"run": run.label, "error": message, "samples": int(n)})
    return pd.DataFrame(rows, columns=["run", "error", "samples"])


def confusion(run: Run) -> pd.DataFrame:
    """Gold letters (rows) against predicted letters (columns; `none` = unparsed or failed)."""
    r = run.records
    pred = r["prediction"].fillna("none")
    return pd.crosstab(r["gold"].astype(str), pred, rownames=["gold"], colnames=["predicted"])


def length_bins(runs: List[Run], bins: int = 4) -> pd.DataFrame:
    """Accuracy by prompt length: quantile bins of input_tokens over the baseline's samples."""
    base = runs[0].records["input_tokens"].dropna()
    if base.empty:
        return pd.DataFrame(columns=["run", "tokens", "samples", "accuracy"])
    edges = np.unique(np.quantile(base.to_numpy(float), np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0] + 1])
    rows = []
    for run in runs:
        r = run.records.dropna(subset=["input_tokens"])
        cut = pd.cut(r["input_tokens"].astype(float), edges, include_lowest=True)
        for interval, group in r.groupby(cut, observed=False):
            rows.append(
                {
                    "run": run.label,
                    "tokens": f"{int(interval.left)}-{int(interval.right)}",
                    "samples": int(len(group)),
                    "accuracy": float(group["score"].mean()) if len(group) else None,
                }
            )
    return pd.DataFrame(rows)


def speed(runs: List[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        r, s = run.records, run.summary

        def pct(col, q):
            v = r[col].dropna()
            return float(np.percentile(v, q)) if len(v) else None

        rows.append(
            {
                "run": run.label,
                "samples_per_s": s.get("samples_per_s"),
                "computed": s.get("computed"),
                "reused": s.get("reused"),
                "e2e_p50_s": pct("e2e_time", 50),
                "e2e_p90_s": pct("e2e_time", 90),
                "e2e_p99_s": pct("e2e_time", 99),
                "preprocess_p50_s": pct("preprocess_time", 50),
                "preprocess_p90_s": pct("preprocess_time", 90),
            }
        )
    return pd.DataFrame(rows)


@dataclass
class GateRule:
    subject: str  # a subject, the task name (overall), or "all"
    max_drop: float  # fail when the score drops by more than this, significantly


def parse_gate(items: List[str]) -> List[GateRule]:
    from ..errors import UserError

    rules = []
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            rules.append(GateRule(name.strip(), float(value)))
        except ValueError:
            raise UserError(f"--fail-below {item}: expected SUBJECT=DELTA or all=DELTA, e.g. all=0.01") from None
    return rules


def gate_failures(scores: pd.DataFrame, rules: List[GateRule]) -> List[str]:
    """Why the gate fails: each (run, subject) whose score fell by more than the rule allows,
    with an interval entirely below zero."""
    out = []
    compared = scores[scores["delta"].notna()]
    for rule in rules:
        rows = compared if rule.subject == "all" else compared[compared["subject"] == rule.subject]
        for _, r in rows.iterrows():
            if r["delta"] < -rule.max_drop and r["ci_high"] < 0:
                out.append(
                    f"{r['run']}: {r['subject']} dropped {-r['delta']:.4f} (95% CI {r['ci_low']:+.4f} .. "
                    f"{r['ci_high']:+.4f}, {r['paired']} paired samples), more than {rule.max_drop} allowed"
                )
    return out
