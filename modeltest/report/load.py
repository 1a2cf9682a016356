"""Find a run's files under an output_dir (or from its result CSV / summary JSON) and read them."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from ..core import SCHEMA_VERSION, SampleRecord
from ..errors import UserError


@dataclass
class Run:
    label: str  # how tables name it (given, else derived from its path)
    task: str
    summary: dict  # *_summary.json
    config: dict  # *_config.json ({} if missing)
    records: pd.DataFrame  # one row per sample, dataset order (scored: from the debug file)
    summary_path: Path

    @property
    def rows(self) -> List[dict]:
        return self.summary.get("rows", [])


def _summaries(path: Path) -> List[Path]:
    if path.is_file():
        if path.name.endswith("_summary.json"):
            return [path]
        if path.name.endswith("_result.csv"):
            s = path.with_name(path.name[: -len("_result.csv")] + "_summary.json")
            if s.is_file():
                return [s]
            raise UserError(f"{path}: no {s.name} beside it; was the run finished?")
        raise UserError(f"{path}: give a run's output_dir, or a *_result.csv / *_summary.json inside it")
    if not path.is_dir():
        raise UserError(f"{path}: no such folder or file")
    found = sorted(path.rglob("*_summary.json"))
    if not found:
        raise UserError(f"{path}: no results here (no results/**/*_summary.json); point at a run's output_dir")
    return found


def find_run_summary(path: Path, task: Optional[str]) -> Path:
    """The summary of the run to read at `path`: the latest per task; `task` picks among tasks."""
    found = _summaries(path)
    by_task = {}
    for s in found:
        try:
            t = json.loads(s.read_text(encoding="utf-8")).get("task")
        except (OSError, ValueError):
            raise UserError(f"{s}: not a readable summary JSON") from None
        by_task.setdefault(t, []).append(s)
    if task is not None:
        if task not in by_task:
            raise UserError(f"{path}: no {task} run here (tasks: {', '.join(sorted(by_task))})")
        chosen = by_task[task]
    elif len(by_task) > 1:
        raise UserError(f"{path}: runs of several tasks ({', '.join(sorted(by_task))}); choose one with --task")
    else:
        chosen = next(iter(by_task.values()))
    return max(chosen, key=lambda p: p.stat().st_mtime)


def read_records(debug_file: Path) -> pd.DataFrame:
    """The scored per-sample records of a run's debug file, as a DataFrame."""
    if not debug_file.is_file():
        raise UserError(f"{debug_file}: the run's debug file is missing; run the same command again to rewrite it")
    rows = []
    with open(debug_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = SampleRecord.from_json(json.loads(line))
            except ValueError as e:
                raise UserError(
                    f"{debug_file}:{lineno}: not a sample record ({e}); the file is truncated or from "
                    f"a newer modeltest (records here are schema {SCHEMA_VERSION}); rerun the command "
                    "that wrote it to rewrite it"
                ) from None
            rows.append(
                {
                    "id": str(rec.id),
                    "subject": rec.subject,
                    "prompt": rec.input.get("prompt"),
                    "media": ", ".join(rec.input.get("images", []) + rec.input.get("videos", [])),
                    "output": rec.output,
                    "prediction": rec.prediction,
                    "gold": rec.gold,
                    "score": rec.score,
                    "error": rec.error,
                    "input_tokens": rec.input_tokens,
                    "output_tokens": rec.output_tokens,
                    "e2e_time": rec.e2e_time,
                    "queue_time": rec.queue_time,
                    "preprocess_time": rec.preprocess_time,
                    "schema": rec.schema,
                }
            )
    if not rows:
        raise UserError(f"{debug_file}: no records in it")
    return pd.DataFrame(rows)


def debug_file_of(summary_path: Path, summary: dict) -> Path:
    """The debug file the summary names; if the output_dir was moved since, the file of that
    name in the moved folder (results/T/M/V/x_summary.json -> debug/T/M/V/)."""
    named = Path(summary.get("debug_file", ""))
    if named.is_file():
        return named
    moved = summary_path.parents[4] / "debug" / summary_path.parent.relative_to(summary_path.parents[3]) / named.name
    return moved if moved.is_file() else named


def load_run(path: str, task: Optional[str] = None, label: Optional[str] = None) -> Run:
    summary_path = find_run_summary(Path(path), task)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    config_path = summary_path.with_name(summary_path.name[: -len("_summary.json")] + "_config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    records = read_records(debug_file_of(summary_path, summary))
    return Run(
        label=label or "",
        task=summary["task"],
        summary=summary,
        config=config,
        records=records,
        summary_path=summary_path,
    )


def facets(run: Run) -> Dict[str, str]:
    """What can tell one run from another, as short strings: the model, backend, data type, tp,
    batch size and the day it ran."""
    model = run.config.get("model") or {}
    backend = run.config.get("backend") or {}
    day = run.summary_path.stat().st_mtime
    return {
        "model": str(run.summary.get("model_name") or model.get("model_name") or ""),
        "backend": str(run.summary.get("backend") or model.get("backend") or ""),
        "data_type": str(backend.get("data_type") or model.get("data_type") or ""),
        "tp": f"tp{run.summary.get('tp')}" if run.summary.get("tp") else "",
        "batch": f"batch{(run.config.get('run') or {}).get('batch_size')}" if run.config.get("run") else "",
        "date": dt.date.fromtimestamp(day).isoformat(),
    }


def name_runs(runs: List[Run], paths: List[str]) -> None:
    """Label each unlabelled run by what differs between the runs (backend, model, data type, tp,
    batch size, date); where nothing does, by its folder; then number repeats (#2, #3)."""
    fs = [facets(r) for r in runs]
    differing = [k for k in fs[0] if len({f[k] for f in fs}) > 1] if len(runs) > 1 else []
    for run, f, path in zip(runs, fs, paths):
        if run.label:
            continue
        if differing:
            run.label = " ".join(f[k] for k in differing if f[k])
        else:
            name = Path(path).name or str(path)
            generic = name in ("precision_result", "results", "output", ".", "")
            run.label = " ".join(v for v in (f["model"], f["backend"], f["data_type"]) if v) if generic else name
    seen: Dict[str, int] = {}
    for r in runs:
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        if n:
            r.label = f"{r.label}#{n + 1}"
    for r in runs:  # a score on the server's own preprocessing is marked wherever the run is named
        if r.summary.get("preprocessing"):
            r.label += " [server-side preprocessing]"
