"""The evaluation loop: samples -> (background preprocessing) -> backend stream -> records.

Every finished sample becomes one record, appended and fsync'd at once (records.py), so a crash
never costs a finished sample. A sample whose media cannot be read, whose input is too long, or
whose request fails on its own is recorded with an `error` and a score of 0; the run goes on.
Scores are computed at the end from the stored outputs (Task.score_record), never in the loop.
"""

from __future__ import annotations

import collections
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from .backends import make_backend, model_identity, traits
from .backends.base import Backend, BackendSettings, GenerationOutput, Prepared
from .config.loader import EvalConfig
from .core import ResultRow, Sample, SampleRecord
from .device import resolve_device
from .engine.parallel import ParallelContext, init_parallel
from .errors import Interrupted, SampleError, UserError, first_line
from .media import InProcessMedia, MediaSource, open_media_source
from .outputs import RunPaths, config_record, read_json, write_debug_file, write_json, write_result_csv, write_summary
from .records import RecordStore, ShardProgress, file_digest, run_identity, sample_key
from .summary import print_summary
from .tasks import TASKS
from .tasks.base import Task
from .work_order import share_by_medium

MAX_ERROR_LINES = 20  # sample errors printed as they happen (all are in the debug file)
# Set by modeltest's launcher (launch.py) in the processes it starts: the launcher reports an
# interruption once, for every rank, so the workers stay quiet about it.
LAUNCHED_ENV = "MODELTEST_LAUNCHED"


@dataclass
class RunResult:
    rows: List[ResultRow]
    records: List[SampleRecord]
    paths: RunPaths


def max_new_tokens(cfg: EvalConfig) -> int:
    """The model's max_output_length, capped by the task's requested_max_output_length."""
    return min(cfg.model.mm_model.infer_params.max_output_length, cfg.task.requested_max_output_length)


@dataclass
class PrepOutcome:
    sample: Sample
    prepared: Optional[Prepared]
    error: Optional[str] = None
    transient: bool = False  # the error may go away (a timed-out decode): retried on resume


def prepared_stream(
    samples: List[Sample], backend: Backend, max_input_length: int, threads: int = 2, ahead: int = 8
) -> Iterator[PrepOutcome]:
    """Yield each sample's outcome in order, preparing up to `ahead` samples in `threads`
    background threads so image/video decoding overlaps with inference. With media workers, every
    sample in the window is decoding in them at once (backend.prefetch); the threads only run
    the processor on what comes back."""

    def prepare(sample: Sample) -> PrepOutcome:
        if sample.load_error:
            return PrepOutcome(sample, None, sample.load_error)
        try:
            prepared = backend.prepare(sample)
        except SampleError as e:
            return PrepOutcome(sample, None, str(e), e.transient)
        if prepared.input_length > max_input_length:
            return PrepOutcome(
                sample,
                None,
                f"input is {prepared.input_length} tokens, over requested_max_input_length "
                f"{max_input_length}; lower the task's max_pixels/fps or raise the limit",
            )
        return PrepOutcome(sample, prepared)

    def start(sample: Sample):
        backend.prefetch(sample)  # decoding starts now in the media workers, if any
        return sample, pool.submit(prepare, sample)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preprocess")
    try:
        queue: collections.deque = collections.deque()
        it = iter(samples)
        for sample in it:
            queue.append(start(sample))
            if len(queue) >= ahead:
                break
        while queue:
            sample, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(start(nxt))
            try:
                outcome = fut.result()
            except Exception as e:  # a preprocessing bug must not end the run either
                outcome = PrepOutcome(sample, None, f"preprocessing failed: {first_line(e)}")
            yield outcome
    finally:
        # Interrupted: do not wait for decodes in flight (closing the media source ends them).
        pool.shutdown(wait=False, cancel_futures=True)


def new_record(
    sample: Sample,
    key: str,
    output: Optional[GenerationOutput],
    error: Optional[str],
    prepared: Optional[Prepared],
    transient: bool = False,
) -> SampleRecord:
    """What was computed for a sample, unscored (scores come from Task.score_record)."""

    def sec(x: Optional[float]) -> Optional[float]:
        return round(x, 6) if x is not None else None

    transient = transient or bool(output is not None and output.error and output.transient)
    if output is not None and output.error:
        error, output = output.error, None
    return SampleRecord(
        id=sample.id,
        subject=sample.subject,
        input={"prompt": sample.prompt, "images": sample.images, "videos": sample.videos},
        output=output.text if output else None,
        gold=sample.gold,
        error=error,
        e2e_time=sec(output.e2e_time) if output else None,
        queue_time=sec(output.queue_time) if output else None,
        preprocess_time=sec(prepared.preprocess_time) if prepared else None,
        input_tokens=output.input_length if output else (prepared.input_length if prepared else None),
        output_tokens=output.output_tokens if output else None,
        prefill_time=sec(output.prefill_time) if output else None,
        choices=sample.choices,
        preprocessing=output.preprocessing if output else None,
        transient=transient,
        key=key,
    )


def media_source(cfg: EvalConfig) -> MediaSource:
    """Where this rank's images and videos are decoded: in `prep_workers` processes or in the
    harness's threads, through the media cache unless it is off. The openai backend decodes
    nothing here (the server does)."""
    run = cfg.run
    if not traits(cfg.model.backend).local_media:
        return InProcessMedia(None)
    return open_media_source(run.media_cache, run.media_cache_gb, run.prep_workers, run.prep_timeout_s)


class Evaluator:
    def __init__(self, cfg: EvalConfig, backend: Optional[Backend] = None, show_progress: bool = True):
        self.cfg = cfg
        self.task: Task = TASKS[cfg.task.task_name](cfg.task, cfg.model)
        self.backend = backend
        self.show_progress = show_progress
        self.media: Optional[MediaSource] = None

    def say(self, par: ParallelContext, text: str) -> None:
        if par.is_main and self.show_progress:
            print(text, flush=True)

    def run(self) -> RunResult:
        cfg = self.cfg
        samples = self.task.load_samples(cfg.run.limit)
        if not samples:
            raise UserError(
                f"task.local_dataset_path: '{cfg.task.local_dataset_path}' has no {cfg.task.task_name} "
                "questions (an empty file, or every subject empty); nothing to evaluate"
            )
        device = resolve_device(cfg.run.device)
        par = self._parallel(device)
        paths = RunPaths.for_run(cfg, tp=par.tp)
        if par.is_main:
            paths.create()
        n_new = max_new_tokens(cfg)
        keys = self._keys(samples, n_new)
        store = RecordStore(paths.records_dir, shard=f"dp{par.dp_rank}")
        todo = self._unfinished(samples, keys, store, par)
        mine = share_by_medium(todo, par.dp, par.dp_rank)  # questions on one medium together

        load_s = None
        if mine and self.backend is None:
            t0 = time.time()
            self.backend = self._load_backend(par, device, n_new)
            load_s = time.time() - t0
        # The run's speed is its evaluation time: loading the model is reported on its own.
        started = time.time()
        if par.is_main:
            write_json(
                paths.config_json,
                config_record(
                    cfg,
                    {
                        "backend": self._backend_facts(paths, device),
                        "max_new_tokens": n_new,
                        "samples": len(samples),
                        "tp": par.tp,
                        "dp": par.dp,
                    },
                ),
            )
        progress = (
            ShardProgress(paths.records_dir, [f"dp{r}" for r in range(par.dp) if r != par.dp_rank])
            if par.is_main and par.dp > 1
            else None
        )
        try:
            self._compute(mine, store, par, n_new, total=len(todo), others=progress)
        finally:
            if self.media is not None:
                self.media.close()
        par.barrier()
        if not par.is_main:
            return RunResult(rows=[], records=[], paths=paths)
        return self._finish(
            samples, keys, store, paths, par, computed=len(todo), elapsed=time.time() - started, load_s=load_s
        )

    def _parallel(self, device: str) -> ParallelContext:
        """This process's place among the dp x tp processes, checked against the configuration."""
        cfg = self.cfg
        par = init_parallel(device, cfg.run.dp)
        if cfg.run.tp is not None and cfg.run.tp != par.tp:
            raise UserError(
                f"tp={cfg.run.tp} but {par.world_size} process(es) started for dp={par.dp}; "
                "start the run with `modeltest run` or scripts/mm_run.sh, which launch dp x tp processes"
            )
        if not traits(cfg.model.backend).tensor_parallel and par.tp > 1:
            raise UserError(
                f"backend {cfg.model.backend} runs one process per replica; tp={par.tp} needs "
                f"model.backend=engine (or use dp= for several {cfg.model.backend} replicas)"
            )
        return par

    def _keys(self, samples: List[Sample], n_new: int) -> List[str]:
        """Each sample's resume key: what can change its answer (records.py)."""
        run_id = run_identity(self.cfg, n_new, model_identity(self.cfg.model))
        digests: Dict[str, str] = {}
        keys = []
        for s in samples:
            if s.source not in digests:
                digests[s.source] = file_digest(Path(s.source)) if s.source else ""
            keys.append(sample_key(run_id, s, digests[s.source]))
        return keys

    def _unfinished(
        self, samples: List[Sample], keys: List[str], store: RecordStore, par: ParallelContext
    ) -> List[Tuple[Sample, str]]:
        """The samples no earlier run finished (whatever its dp/tp/batch size), with their keys; a
        sample that failed on a transient error (a server, a timed-out decode) is computed again."""
        if not self.cfg.run.resume and par.is_main:
            aside = store.reset()
            if aside:
                self.say(par, f"resume=false: earlier records moved to {aside}")
        par.barrier()
        done = store.load()
        todo = [(s, k) for s, k in zip(samples, keys) if k not in done or done[k].transient]
        if len(todo) < len(samples):
            self.say(
                par,
                f"resuming: {len(samples) - len(todo)} of {len(samples)} samples already finished in "
                f"{store.folder}; computing {len(todo)}",
            )
        return todo

    def _finish(
        self,
        samples: List[Sample],
        keys: List[str],
        store: RecordStore,
        paths: RunPaths,
        par: ParallelContext,
        computed: int,
        elapsed: float,
        load_s: Optional[float],
    ) -> RunResult:
        """Rank 0, once every replica is done: score every record, write the result files, say so."""
        cfg = self.cfg
        done = store.load()
        missing = [s.id for s, k in zip(samples, keys) if k not in done]
        if missing:
            raise UserError(
                f"{paths.records_dir}: {len(missing)} sample(s) have no record after the run "
                f"(first: {missing[0]}); run the same command again to compute them"
            )
        records = [self.task.score_record(s, done[k]) for s, k in zip(samples, keys)]
        rows = self.task.aggregate(records)
        write_result_csv(paths.result_csv, rows)
        write_debug_file(paths.debug_file, records)
        cache = self.media.summary() if self.media is not None else None
        reuse = self.backend.reuse() if self.backend is not None else None
        write_summary(
            paths,
            cfg,
            rows,
            records,
            computed=computed,
            elapsed=elapsed,
            tp=par.tp,
            dp=par.dp,
            media_cache=cache,
            load_s=load_s,
            engine_reuse=reuse,
        )
        if self.show_progress:
            print_summary(cfg, rows, records, paths, elapsed, computed=computed, load_s=load_s)
            if cache is not None:
                workers = f"; {cache['workers']} decoding worker(s)" if cache.get("workers") else ""
                replaced = (
                    f", {cache['workers_replaced']} replaced after a hang or crash"
                    if cache.get("workers_replaced")
                    else ""
                )
                print(
                    f"media cache: {cache['hits']} hit(s), {cache['misses']} miss(es) in {cache['folder']}"
                    + workers
                    + replaced
                    + (" (this rank)" if par.dp > 1 else "")
                )
            if reuse is not None and reuse["prompt_tokens"]:
                print(
                    f"engine reuse: {reuse['prefix_hit_rate']:.1%} of prompt tokens from the prefix cache, "
                    f"vision cache {reuse['vision_cache_hits']} hit(s) / {reuse['vision_cache_misses']} miss(es), "
                    f"{reuse['preemptions']} preemption(s)" + (" (this rank)" if par.dp > 1 else "")
                )
            retry = sum(1 for r in records if r.transient)
            if retry:
                print(
                    f"{retry} sample(s) failed on transient errors (server, network, or a media decode that "
                    "timed out or crashed; recorded as errors); run the same command again to retry only those"
                )
        return RunResult(rows=rows, records=records, paths=paths)

    def _load_backend(self, par: ParallelContext, device: str, n_new: int) -> Backend:
        m = self.cfg.model
        where = f"{device} x {par.world_size} (tp={par.tp}, dp={par.dp})" if par.world_size > 1 else device
        if traits(m.backend).served:
            served = m.served_model_name or "the model it serves"
            self.say(
                par, f"evaluating {served} at {m.api_base} (openai backend, {m.concurrency} request(s) at once) ..."
            )
        else:
            self.say(par, f"loading {m.model_path} ({m.backend} backend, {m.data_type}) on {where} ...")
        t0 = time.time()
        self.media = media_source(self.cfg)
        backend = make_backend(BackendSettings.from_eval(self.cfg, device, n_new, self.media), tp_ctx=par.tp_ctx)
        self.say(par, f"loaded in {time.time() - t0:.1f}s")
        return backend

    def _backend_facts(self, paths: RunPaths, device: str) -> dict:
        """What computes (or computed) this run's results, for the saved configuration: the loaded
        backend's description; with nothing to compute, the one a previous run of these results
        saved; failing that, what the configuration says."""
        if self.backend is not None:
            return self.backend.describe()
        previous = read_json(paths.config_json)
        if isinstance(previous, dict) and isinstance(previous.get("backend"), dict):
            return previous["backend"]
        return {
            "backend": self.cfg.model.backend,
            "device": device,
            "data_type": self.cfg.model.data_type,
            "loaded": False,
        }

    def _compute(
        self,
        mine: List[Tuple[Sample, str]],
        store: RecordStore,
        par: ParallelContext,
        n_new: int,
        total: int,
        others: Optional[ShardProgress],
    ) -> int:
        """Run this replica's unfinished samples; each is saved (fsync) as soon as it is done.

        The bar on rank 0 counts every replica's finished samples (`others` reads their shards)."""
        cfg = self.cfg
        bar = tqdm(
            total=total,
            desc=f"{cfg.task.task_name}",
            unit="sample",
            dynamic_ncols=True,
            disable=not (self.show_progress and par.is_main) or not total,
        )
        saver = RecordSaver(store, par, {id(s): k for s, k in mine}, bar, others, self.show_progress)
        backend = self.backend
        # Keep a batch waiting behind the running one (engine, hf), or `concurrency` requests in
        # flight (a server): the backend says how many.
        keep = backend.queue_depth(cfg.run.batch_size) - 1 if backend is not None else 0

        def drain(limit: int) -> None:
            # Step until at most `limit` samples are in the backend (deterministic on every rank).
            while backend.pending() > limit:
                for p, out in backend.step():
                    saver.finish(p.sample, out, None, p)

        try:
            if mine:
                # Processor threads (each holds a processor copy, about a second to make): 2, or up to
                # 4 beside media workers; the window keeps every worker busy with a sample to spare.
                workers = backend.settings.media.parallelism() if backend.settings.media is not None else 0
                threads = min(4, max(2, workers))
                samples = [s for s, _ in mine]
                limit = cfg.task.requested_max_input_length
                for o in prepared_stream(samples, backend, limit, threads=threads, ahead=max(8, 2 * workers + threads)):
                    if o.prepared is None:
                        saver.finish(o.sample, None, o.error, None, o.transient)
                        continue
                    backend.submit(o.prepared, n_new)
                    drain(keep)
                drain(0)
            # Rank 0 keeps the bar moving until every replica has finished its share.
            while others is not None and bar.n < total:
                time.sleep(0.2)
                saver.update_bar()
        except KeyboardInterrupt:
            # A second Ctrl-C while the records are closed must not cut the message short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if backend is not None:
                backend.close()
            if self.media is not None:
                self.media.close()
            raise Interrupted(
                f"interrupted: {saver.count} finished sample(s) of this run are saved in {store.folder}; "
                "run the same command again to resume"
            ) from None
        finally:
            bar.close()
            store.close()
        return saver.count


class RecordSaver:
    """This replica's finished samples: each appended to its record shard (fsync) the moment it
    ends, counted on the progress bar (rank 0's counts every replica's), and its error, if any,
    printed as one line (the first MAX_ERROR_LINES; all are in the debug file)."""

    def __init__(
        self,
        store: RecordStore,
        par: ParallelContext,
        key_of: Dict[int, str],
        bar,
        others: Optional[ShardProgress],
        show: bool,
    ):
        self.store, self.par, self.key_of, self.bar, self.others, self.show = store, par, key_of, bar, others, show
        self.count = 0
        self.errors = 0

    def update_bar(self) -> None:
        self.bar.n = self.count + (self.others.count() if self.others else 0)
        self.bar.refresh()

    def finish(
        self,
        sample: Sample,
        output: Optional[GenerationOutput],
        error: Optional[str],
        prepared: Optional[Prepared],
        transient: bool = False,
    ) -> None:
        rec = new_record(sample, self.key_of[id(sample)], output, error, prepared, transient)
        if self.par.is_replica_leader:
            self.store.append(rec)
        if rec.error and self.par.is_main and self.show:
            self.errors += 1
            if self.errors <= MAX_ERROR_LINES:
                self.bar.write(f"sample {sample.id}: {rec.error}")
            elif self.errors == MAX_ERROR_LINES + 1:
                self.bar.write("... more sample errors: see 'error' in the debug file")
        self.count += 1
        self.update_bar()
