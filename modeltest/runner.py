"""The evaluation loop: samples -> (background preprocessing) -> batches -> backend -> records.

Every finished sample becomes one record (and one line in the debug file, flushed at once).
A sample whose media cannot be read, whose input is too long, or whose batch fails on its own is
recorded with an `error` and a score of 0; the run goes on.
"""
from __future__ import annotations

import collections
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from .backends import Backend, GenerationOutput, Prepared, make_backend
from .config.loader import EvalConfig
from .device import resolve_device
from .errors import SampleError, UserError
from .outputs import DebugWriter, RunPaths, config_record, write_json, write_result_csv
from .summary import print_summary
from .tasks import TASKS
from .tasks.base import ResultRow, Sample, Task


@dataclass
class RunResult:
    rows: List[ResultRow]
    records: List[Dict[str, Any]]
    paths: RunPaths


def max_new_tokens(cfg: EvalConfig) -> int:
    """The model's max_output_length, capped by the task's requested_max_output_length."""
    return min(cfg.model.mm_model.infer_params.max_output_length, cfg.task.requested_max_output_length)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def prepared_stream(samples: List[Sample], backend: Backend, max_input_length: int,
                    workers: int = 2, ahead: int = 8) -> Iterator[Tuple[Sample, Optional[Prepared], Optional[str]]]:
    """Yield (sample, prepared or None, error or None) in order, preparing up to `ahead` samples
    in background threads so image/video decoding overlaps with inference."""
    def prepare(sample: Sample):
        if sample.load_error:
            return None, sample.load_error
        try:
            prepared = backend.prepare(sample)
        except SampleError as e:
            return None, str(e)
        if prepared.input_length > max_input_length:
            return None, (f"input is {prepared.input_length} tokens, over requested_max_input_length "
                          f"{max_input_length}; lower the task's max_pixels/fps or raise the limit")
        return prepared, None

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess") as pool:
        queue: collections.deque = collections.deque()
        it = iter(samples)
        for sample in it:
            queue.append((sample, pool.submit(prepare, sample)))
            if len(queue) >= ahead:
                break
        while queue:
            sample, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(prepare, nxt)))
            try:
                prepared, error = fut.result()
            except Exception as e:  # a preprocessing bug must not end the run either
                prepared, error = None, f"preprocessing failed: {_first_line(e)}"
            yield sample, prepared, error


class Evaluator:
    def __init__(self, cfg: EvalConfig, backend: Optional[Backend] = None, show_progress: bool = True):
        self.cfg = cfg
        self.task: Task = TASKS[cfg.task.task_name](cfg.task, cfg.model)
        self.backend = backend
        self.show_progress = show_progress

    def record(self, sample: Sample, output: Optional[GenerationOutput], error: Optional[str],
               prepared: Optional[Prepared]) -> Dict[str, Any]:
        rec: Dict[str, Any] = {
            "id": sample.id, "subject": sample.subject,
            "input": {"prompt": sample.prompt, "images": sample.images, "videos": sample.videos},
            "output": output.text if output else None,
            "prediction": None, "gold": sample.gold, "score": 0.0, "error": error,
            "e2e_time": round(output.e2e_time, 6) if output else None,
            "preprocess_time": round(prepared.preprocess_time, 6) if prepared else None,
            "input_tokens": (output.input_length if output else (prepared.input_length if prepared else None)),
            "output_tokens": len(output.token_ids) if output else None,
            "prefill_time": round(output.prefill_time, 6) if output and output.prefill_time is not None else None,
        }
        if sample.choices is not None:
            rec["choices"] = sample.choices
        if output is not None and error is None:
            scored = self.task.score(sample, output.text)
            rec["score"], rec["prediction"] = scored.score, scored.prediction
            rec.update(scored.extra)
        return rec

    def run_batch(self, batch: List[Prepared], n_new: int) -> List[Tuple[Optional[GenerationOutput], Optional[str]]]:
        try:
            return [(None, o.error) if o.error else (o, None) for o in self.backend.generate(batch, n_new)]
        except Exception as e:
            if len(batch) == 1:
                return [(None, f"inference failed: {_first_line(e)}")]
            # Isolate the failing sample: run the batch one by one.
            return [self.run_batch([p], n_new)[0] for p in batch]

    def run(self) -> RunResult:
        cfg = self.cfg
        samples = self.task.load_samples(cfg.run.limit)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        main = int(os.environ.get("RANK", "0")) == 0      # only rank 0 writes files and prints
        paths = RunPaths.for_run(cfg, tp=world)
        if main:
            paths.create()
        device = resolve_device(cfg.run.device)
        n_new = max_new_tokens(cfg)
        if self.backend is None:
            if cfg.model.backend == "hf" and world > 1:
                raise UserError(f"backend hf runs in one process; tp={world} needs model.backend=engine")
            self.backend = make_backend(cfg.model, device, cfg.model.data_type, max_batch_size=cfg.run.batch_size,
                                        max_input_length=cfg.task.requested_max_input_length,
                                        max_output_length=n_new)
        started = time.time()
        if main:
            write_json(paths.config_json, config_record(cfg, {"backend": self.backend.describe(),
                                                              "max_new_tokens": n_new, "samples": len(samples)}))
        debug = DebugWriter(paths.debug_file) if main else None
        records: List[Dict[str, Any]] = []
        bar = tqdm(total=len(samples), desc=f"{cfg.task.task_name}", unit="sample",
                   disable=not (self.show_progress and main), dynamic_ncols=True)

        def finish(rec):
            records.append(rec)
            if debug:
                debug.write(rec)
            bar.update(1)

        pending: List[Prepared] = []

        def flush():
            for p, (out, err) in zip(pending, self.run_batch(pending, n_new)):
                finish(self.record(p.sample, out, err, p))
            pending.clear()

        try:
            for sample, prepared, error in prepared_stream(samples, self.backend, cfg.task.requested_max_input_length):
                if prepared is None:
                    finish(self.record(sample, None, error, None))
                    continue
                pending.append(prepared)
                if len(pending) >= cfg.run.batch_size:
                    flush()
            if pending:
                flush()
        finally:
            bar.close()
            if debug:
                debug.close()

        rows = self.task.aggregate(records)
        if not main:
            return RunResult(rows=rows, records=records, paths=paths)
        write_result_csv(paths.result_csv, rows)
        elapsed = time.time() - started
        write_json(paths.summary_json, {
            "task": cfg.task.task_name, "model_name": cfg.model.model_name,
            "rows": [r.__dict__ for r in rows], "samples": len(records),
            "errors": sum(1 for r in records if r["error"]),
            "unparsed": sum(1 for r in records if not r["error"] and r["prediction"] is None),
            "elapsed_s": round(elapsed, 3), "samples_per_s": round(len(records) / elapsed, 4) if elapsed else None,
            "result_csv": str(paths.result_csv), "debug_file": str(paths.debug_file),
        })
        if self.show_progress:
            print_summary(cfg, rows, records, paths, elapsed)
        return RunResult(rows=rows, records=records, paths=paths)
