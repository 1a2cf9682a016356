"""The evaluation loop: samples -> (background preprocessing) -> batches -> backend -> records.

Every finished sample becomes one record (and one line in the debug file, flushed at once).
A sample whose media cannot be read, whose input is too long, or whose batch fails on its own is
recorded with an `error` and a score of 0; the run goes on.
"""
from __future__ import annotations

import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from .backends import Backend, GenerationOutput, Prepared, make_backend
from .config.loader import EvalConfig
from .device import resolve_device
from .errors import Interrupted, SampleError, UserError
from .engine.parallel import init_parallel
from .outputs import RunPaths, config_record, write_debug_file, write_json, write_result_csv
from .records import RecordStore, file_digest, run_identity, sample_key
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
        device = resolve_device(cfg.run.device)
        par = init_parallel(device, cfg.run.dp)
        if cfg.model.backend == "hf" and par.tp > 1:
            raise UserError(f"backend hf runs one process per replica; tp={par.tp} needs model.backend=engine "
                            "(or use dp= for several hf replicas)")
        paths = RunPaths.for_run(cfg, tp=par.tp)
        if par.is_main:
            paths.create()
        n_new = max_new_tokens(cfg)

        # Which samples are already finished (by any earlier run, whatever its dp/tp/batch size)?
        run_id = run_identity(cfg, n_new)
        digests: Dict[str, str] = {}
        keys = []
        for s in samples:
            if s.source not in digests:
                digests[s.source] = file_digest(Path(s.source)) if s.source else ""
            keys.append(sample_key(run_id, s, digests[s.source]))
        store = RecordStore(paths.records_dir, shard=f"dp{par.dp_rank}")
        if not cfg.run.resume and par.is_main:
            aside = store.reset()
            if aside and self.show_progress:
                print(f"resume=false: earlier records moved to {aside}")
        par.barrier()
        done = store.load()
        todo = [(s, k) for s, k in zip(samples, keys) if k not in done]
        mine = todo[par.dp_rank::par.dp]
        if par.is_main and self.show_progress and len(todo) < len(samples):
            print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples already finished in "
                  f"{paths.records_dir}; computing {len(todo)}")

        started = time.time()
        if mine and self.backend is None:
            self.backend = make_backend(cfg.model, device, cfg.model.data_type, max_batch_size=cfg.run.batch_size,
                                        max_input_length=cfg.task.requested_max_input_length,
                                        max_output_length=n_new, tp_ctx=par.tp_ctx)
        if par.is_main:
            write_json(paths.config_json, config_record(cfg, {
                "backend": self.backend.describe() if self.backend else None, "max_new_tokens": n_new,
                "samples": len(samples), "tp": par.tp, "dp": par.dp}))
        self._compute(mine, store, par, n_new)
        par.barrier()
        if not par.is_main:
            return RunResult(rows=[], records=[], paths=paths)

        done = store.load()
        missing = [s.id for s, k in zip(samples, keys) if k not in done]
        if missing:
            raise UserError(f"{paths.records_dir}: {len(missing)} sample(s) have no record after the run "
                            f"(first: {missing[0]}); run the same command again to compute them")
        records = [self.rescore(s, done[k]) for s, k in zip(samples, keys)]
        rows = self.task.aggregate(records)
        write_result_csv(paths.result_csv, rows)
        write_debug_file(paths.debug_file, records)
        elapsed = time.time() - started
        write_json(paths.summary_json, {
            "task": cfg.task.task_name, "model_name": cfg.model.model_name,
            "rows": [r.__dict__ for r in rows], "samples": len(records),
            "computed": len(todo), "reused": len(samples) - len(todo),
            "errors": sum(1 for r in records if r["error"]),
            "unparsed": sum(1 for r in records if not r["error"] and r["prediction"] is None),
            "elapsed_s": round(elapsed, 3), "samples_per_s": round(len(todo) / elapsed, 4) if elapsed and todo else None,
            "tp": par.tp, "dp": par.dp,
            "result_csv": str(paths.result_csv), "debug_file": str(paths.debug_file),
            "records_dir": str(paths.records_dir),
        })
        if self.show_progress:
            print_summary(cfg, rows, records, paths, elapsed)
        return RunResult(rows=rows, records=records, paths=paths)

    def rescore(self, sample: Sample, rec: Dict[str, Any]) -> Dict[str, Any]:
        """Scores come from the stored output and today's answer key, not from the record."""
        rec = dict(rec)
        rec["gold"] = sample.gold
        if rec.get("error") is None and rec.get("output") is not None:
            scored = self.task.score(sample, rec["output"])
            rec["score"], rec["prediction"] = scored.score, scored.prediction
            rec.update(scored.extra)
        else:
            rec["score"], rec["prediction"] = 0.0, None
        return rec

    def _compute(self, mine, store: RecordStore, par, n_new: int) -> int:
        """Run this replica's unfinished samples; each is saved (fsync) as soon as it is done."""
        cfg = self.cfg
        key_of = {id(s): k for s, k in mine}
        bar = tqdm(total=len(mine), desc=f"{cfg.task.task_name}", unit="sample",
                   disable=not (self.show_progress and par.is_main) or not mine, dynamic_ncols=True)
        count = 0
        # Crash-recovery tests slow a run down so they can kill it halfway (seconds per sample).
        throttle = float(os.environ.get("MODELTEST_SLOW_SAMPLE_S", "0") or 0)

        def finish(rec, sample):
            nonlocal count
            rec["key"] = key_of[id(sample)]
            if par.is_replica_leader:
                store.append(rec)
            count += 1
            bar.update(1)
            if throttle:
                time.sleep(throttle)

        pending: List[Prepared] = []

        def flush():
            for p, (out, err) in zip(pending, self.run_batch(pending, n_new)):
                finish(self.record(p.sample, out, err, p), p.sample)
            pending.clear()

        streaming = hasattr(self.backend, "submit")

        def drain(keep: int):
            # Step the engine until at most `keep` requests are in it (deterministic on every rank).
            while self.backend.pending() > keep:
                for p, out in self.backend.step():
                    finish(self.record(p.sample, None if out.error else out, out.error, p), p.sample)

        try:
            if mine:
                for sample, prepared, error in prepared_stream([s for s, _ in mine], self.backend,
                                                               cfg.task.requested_max_input_length):
                    if prepared is None:
                        finish(self.record(sample, None, error, None), sample)
                        continue
                    if streaming:
                        self.backend.submit(prepared, n_new)
                        drain(2 * cfg.run.batch_size - 1)   # keep a batch waiting behind the running one
                        continue
                    pending.append(prepared)
                    if len(pending) >= cfg.run.batch_size:
                        flush()
                if streaming:
                    drain(0)
                elif pending:
                    flush()
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {count} finished sample(s) of this run are saved in {store.folder}; "
                              "run the same command again to resume") from None
        finally:
            bar.close()
            store.close()
        return count
