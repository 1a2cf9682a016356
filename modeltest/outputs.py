"""Where a run writes, and the writers: result CSV, saved configuration, summary, debug records.

Layout (names are stable; other tools read them):
    <output_dir>/results/<task>/<model_name>/<variant>/<task>_<model_name>_<variant>_batch<bs>_tp<tp>_result.csv
    .../<same stem>_config.json     the run's configuration and library versions
    .../<same stem>_summary.json    the CSV's rows plus counts and timings, as JSON
    <output_dir>/debug/<task>/<model_name>/<variant>/output_<timestamp>.txt   one JSON object per sample
    <output_dir>/records/<task>/<model_name>/<variant>/records_dp<replica>.jsonl   the resume records
<variant> is the data type (bf16, fp16, fp32) for the default `engine` backend, and
`<data type>_<backend>` for another one (bf16_hf), so runs of two backends never share files.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .backends.traits import DEFAULT_BACKEND
from .config.loader import EvalConfig, default_config_dir
from .core import SCHEMA_VERSION, ResultRow, SampleRecord, count_errors, count_unparsed, errors_by_message
from .errors import UserError

CSV_COLUMNS = ["Tasks", "N-Shot", "Total", "Pass", "Metric", "Value", "Errors", "Unparsed"]


def default_output_dir(model_name: str, today: Optional[dt.date] = None) -> Path:
    today = today or dt.date.today()
    return default_config_dir().parent / "output" / today.isoformat() / "modeltest" / model_name / "precision_result"


def run_variant(data_type: Optional[str], backend: str) -> str:
    """The folder/file-name part that tells runs of one model apart: bf16, bf16_hf, or openai (a
    served model, whose data type is the server's)."""
    if data_type is None:
        return backend
    return str(data_type) if backend == DEFAULT_BACKEND else f"{data_type}_{backend}"


@dataclasses.dataclass
class RunPaths:
    root: Path
    result_csv: Path
    config_json: Path
    summary_json: Path
    debug_file: Path
    records_dir: Path

    @classmethod
    def for_run(cls, cfg: EvalConfig, tp: int = 1, timestamp: Optional[str] = None) -> "RunPaths":
        root = Path(cfg.run.output_dir) if cfg.run.output_dir else default_output_dir(cfg.model.model_name)
        task, model = cfg.task.task_name, cfg.model.model_name
        variant = run_variant(cfg.model.data_type, cfg.model.backend)
        sub = Path(task) / model / variant
        stem = f"{task}_{model}_{variant}_batch{cfg.run.batch_size}_tp{tp}"
        results = root / "results" / sub
        timestamp = timestamp or dt.datetime.now().strftime("%Y%m%d_%H%M%S")
        return cls(
            root=root,
            result_csv=results / f"{stem}_result.csv",
            config_json=results / f"{stem}_config.json",
            summary_json=results / f"{stem}_summary.json",
            debug_file=root / "debug" / sub / f"output_{timestamp}.txt",
            records_dir=root / "records" / sub,
        )

    def create(self) -> None:
        """Make the folders and prove they are writable before any model loads."""
        for folder in (self.result_csv.parent, self.debug_file.parent, self.records_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UserError(
                    f"output_dir: cannot write to '{folder}' ({e.strerror}); pass output_dir=/a/writable/folder"
                ) from None


def library_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("modeltest", "torch", "transformers", "qwen-vl-utils", "decord", "torchvision"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fmt_number(x: Optional[float], digits: int) -> str:
    if x is None:
        return ""
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.{digits}f}"


def write_result_csv(path: Path, rows: List[ResultRow]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.tasks,
                    r.n_shot,
                    r.total if r.metric == "acc" else "",
                    _fmt_number(r.passed, 4) if r.metric == "acc" else "",
                    r.metric,
                    _fmt_number(r.value, 6),
                    r.errors if r.metric == "acc" else "",
                    r.unparsed if r.metric == "acc" else "",
                ]
            )
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


SECRET = "<redacted>"


def redact(text: str) -> str:
    """An override or command line without the value of an api_key."""
    import re

    return re.sub(r"((?:^|\s|\.)api_key=)\S+", r"\1" + SECRET, text)


def config_record(cfg: EvalConfig, extra: Dict[str, Any]) -> Dict[str, Any]:
    """The saved configuration; an API key never appears in it."""
    model = dataclasses.asdict(cfg.model)
    if model.get("api_key"):
        model["api_key"] = SECRET
    return {
        "model": model,
        "task": dataclasses.asdict(cfg.task),
        "run": dataclasses.asdict(cfg.run),
        "model_file": cfg.model_file,
        "task_file": cfg.task_file,
        "overrides": [redact(o) for o in cfg.overrides],
        "command": redact(" ".join(sys.argv)),
        "versions": library_versions(),
        **extra,
    }


def read_json(path: Path) -> Any:
    """A JSON file's content, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_debug_file(path: Path, records: List[SampleRecord]) -> None:
    """One JSON object per line per sample, in dataset order (written once, at the end)."""
    tmp = path.with_suffix(".txt.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_summary(
    paths: RunPaths,
    cfg: EvalConfig,
    rows: List[ResultRow],
    records: List[SampleRecord],
    computed: int,
    elapsed: float,
    tp: int,
    dp: int,
    media_cache: Optional[dict] = None,
    load_s: Optional[float] = None,
    engine_reuse: Optional[dict] = None,
) -> None:
    """elapsed: seconds of evaluation (samples_per_s is computed/elapsed); load_s: seconds spent
    loading the model before it (None: nothing was loaded, every sample was reused)."""
    write_json(
        paths.summary_json,
        {
            "task": cfg.task.task_name,
            "model_name": cfg.model.model_name,
            "backend": cfg.model.backend,
            "rows": [dataclasses.asdict(r) for r in rows],
            "samples": len(records),
            "computed": computed,
            "reused": len(records) - computed,
            "errors": count_errors(records),
            "errors_by_message": [{"error": m, "samples": n} for m, n in errors_by_message(records)],
            # what records followed instead of the task's preprocessing (a server's own), if any
            "preprocessing": sorted({r.preprocessing for r in records if r.preprocessing}) or None,
            "unparsed": count_unparsed(records),
            "elapsed_s": round(elapsed, 3),
            "load_s": round(load_s, 3) if load_s is not None else None,
            "samples_per_s": round(computed / elapsed, 4) if elapsed and computed else None,
            "tp": tp,
            "dp": dp,
            "record_schema": SCHEMA_VERSION,
            "media_cache": media_cache,
            "engine_reuse": engine_reuse,
            "result_csv": str(paths.result_csv),
            "debug_file": str(paths.debug_file),
            "records_dir": str(paths.records_dir),
        },
    )
