"""A process pool for work that may hang or crash: media decoding (media/workers.py puts the
media layer on it), so a real VideoBench run is not bound by one Python process's host work,
and a decode that hangs or crashes costs one sample, not the run.

`WorkerPool` runs a function on tasks in N processes, one task per process at a time:

  * processes come from a forkserver (a clean process that has imported torch, qwen-vl-utils and
    decord once), never forked from the harness (its threads, OpenMP pools and a CUDA/NPU
    context must not be copied);
  * a task running past `timeout_s` has its process killed; the task fails with a SampleError
    that names its media, and a fresh process takes the slot (decord is known to hang on some
    files);
  * a process that dies (segfault, OOM killer) fails its task the same way and is replaced;
  * tasks for the same media go to the process already holding them, so questions on one clip
    share one decode (the process's media cache keeps the last few decoded media in memory).

The function a pool runs must be importable by name in a fresh process (a module-level
function); FORKSERVER_PRELOAD's modules are imported once in the forkserver.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ..errors import SampleError, first_line

_CONTEXT_LOCK = threading.Lock()
_CONTEXT = None


# Imported once in the forkserver, so each worker starts as a cheap fork with them loaded. The
# forkserver starts once per process, with the first pool: this list holds what any pool of this
# project will want (the media workers' modules), whichever pool comes first.
START_TIMEOUT_S = 120.0  # a worker not ready after this long (its init hangs) is replaced
FORKSERVER_PRELOAD = ("torch", "decord", "qwen_vl_utils.vision_process", "modeltest.media.workers")


def _context(extra: Sequence[str]):
    """The forkserver context, its server preloaded with FORKSERVER_PRELOAD and the first pool's
    own module (once per harness process; each worker is then a cheap fork of a process without
    threads)."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(list(dict.fromkeys([*FORKSERVER_PRELOAD, *extra])))
            _CONTEXT = ctx
        return _CONTEXT


def auto_workers() -> int:
    """The cores this rank may use: the process's CPU affinity divided among the ranks torchrun
    started on this node (LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, ranks))


class TaskFailed(SampleError):
    """The task's process hung past the timeout or died: the sample is retried when the run is
    resumed (raise prep_timeout_s first if the media is only slow)."""

    transient = True


# ---- the worker process ----------------------------------------------------------------------
def _worker_main(conn, init: Optional[Callable], init_args: tuple, fn: Callable) -> None:
    # The harness reports Ctrl-C and stops the workers; a worker must not print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state = init(*init_args) if init is not None else None
    try:
        conn.send((None, "ready", None))  # a task's clock starts when the worker can run it
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, task = msg
        try:
            reply = (task_id, "ok", fn(state, task))
        except SampleError as e:
            reply = (task_id, "sample_error", str(e))
        except Exception as e:
            reply = (task_id, "error", first_line(e))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


# ---- the pool ----------------------------------------------------------------------------------
@dataclass
class _Task:
    id: int
    payload: Any
    affinity: Optional[str]  # tasks with the same key go to one worker
    what: str  # named in errors: the media
    future: Future = field(default_factory=Future)


@dataclass
class _Worker:
    process: Any
    conn: Any
    queue: Deque[_Task] = field(default_factory=collections.deque)
    running: Optional[_Task] = None
    started: float = 0.0
    ready: bool = False  # its init is done (it said so): tasks go to ready workers only
    born: float = field(default_factory=time.monotonic)


class WorkerPool:
    def __init__(
        self,
        fn: Callable,
        workers: int,
        timeout_s: float,
        init: Optional[Callable] = None,
        init_args: tuple = (),
    ):
        """fn(state, payload) -> result runs in the workers (state = init(*init_args), once per
        process); both must be importable module-level functions."""
        self.fn, self.init, self.init_args = fn, init, init_args
        self.timeout_s = timeout_s
        self.replaced = 0  # processes started again after a hang or a death
        self._ctx = _context([fn.__module__])
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._inbox: Deque[_Task] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._owner: Dict[str, Tuple[int, int]] = {}  # affinity key -> (worker index, tasks)
        self._waiting: Deque[_Task] = collections.deque()  # tasks no worker owns yet: the next idle one takes
        self._size = max(1, workers)
        self._workers: List[_Worker] = []  # started by the dispatcher thread: the harness goes on
        self._started = threading.Event()
        # Starting (the init) has its own, generous bound: it is not any task's time.
        self.start_timeout_s = max(timeout_s, START_TIMEOUT_S)
        self._start_failures = 0  # workers that died or hung before they were ready
        self._stop_error: SampleError = SampleError("media workers stopped")
        self._ended = False  # the dispatcher thread has stopped: new tasks fail at once
        self._thread = threading.Thread(target=self._loop, name="media-workers", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return self._size

    def wait_started(self, timeout: Optional[float] = None) -> bool:
        """Block until every worker process is running and ready (benchmarks start their clocks
        after)."""
        return self._started.wait(timeout)

    def submit(self, payload: Any, affinity: Optional[str], what: str) -> Future:
        task = _Task(next(self._ids), payload, affinity, what)
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if self._ended:  # the dispatcher stopped (the workers cannot start): say why at once
                task.future.set_exception(self._stop_error)
                return task.future
            self._inbox.append(task)
        os.write(self._wake_w, b"x")
        return task.future

    def close(self) -> None:
        """Stop every worker (pending tasks fail); safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=30)
        for w in list(self._workers):
            self._stop(w)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- processes ----------------------------------------------------------------------------
    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(
            target=_worker_main,
            args=(child, self.init, self.init_args, self.fn),
            name="modeltest-media-worker",
            daemon=True,
        )
        p.start()
        child.close()
        return _Worker(process=p, conn=parent)

    @staticmethod
    def _stop(w: _Worker) -> None:
        """Kill the process (its task, if any, is abandoned) and reap it."""
        try:
            w.process.kill()
        except (OSError, ValueError):
            pass
        w.process.join(timeout=5)
        w.conn.close()

    # ---- the dispatcher thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._dispatch()
        except (OSError, EOFError) as e:
            # Starting a process failed: the machine is out of processes, or this process is being
            # stopped (a signal took the forkserver down mid-start). Every waiting decode fails
            # with this error, as one line — not a thread's traceback.
            self._stop_error = TaskFailed(
                f"the media worker processes cannot start ({type(e).__name__}: {e}); "
                "run with prep_workers=0 (modeltest serve: --decode-workers 0) to decode in threads"
            )
        finally:
            error = self._stop_error
            for w in self._workers:
                for t in ([w.running] if w.running else []) + list(w.queue):
                    if not t.future.done():
                        t.future.set_exception(error)
            for t in self._waiting:
                t.future.set_exception(error)
            with self._lock:
                self._ended = True
                for t in self._inbox:
                    t.future.set_exception(error)
                self._inbox.clear()

    def _dispatch(self) -> None:
        # The first start launches the forkserver (a few seconds of imports), meanwhile the
        # harness loads its model.
        for _ in range(self._size):
            self._workers.append(self._start())
        while True:
            with self._lock:
                if self._closed:
                    return
                new = list(self._inbox)
                self._inbox.clear()
            for t in new:
                self._assign(t)
            for i, w in enumerate(self._workers):
                if w.ready and w.running is None and (w.queue or self._waiting):
                    self._send(i, w.queue.popleft() if w.queue else self._take(i))
            busy = [w for w in self._workers if w.running is not None]
            starting = [w for w in self._workers if not w.ready]
            deadline = min(
                [w.started + self.timeout_s for w in busy] + [w.born + self.start_timeout_s for w in starting],
                default=None,
            )
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            watched = busy + starting
            handles = [self._wake_r] + [w.conn for w in watched] + [w.process.sentinel for w in watched]
            ready = wait(handles, timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if not self._check_starting(ready):
                return
            for i, w in enumerate(self._workers):
                if w.running is None:
                    continue
                if w.conn in ready:
                    self._receive(i, w)
                elif w.process.sentinel in ready:
                    self._fail_and_replace(
                        i, f"the preprocessing worker died ({self._how(w)}) while reading {w.running.what}"
                    )
                elif time.monotonic() >= w.started + self.timeout_s:
                    self._fail_and_replace(
                        i,
                        f"reading {w.running.what} took over {self.timeout_s:g} s and was "
                        "stopped (raise prep_timeout_s if the file is only slow)",
                    )

    def _check_starting(self, ready: list) -> bool:
        """Workers still starting: mark those that said they are ready; replace one that died or
        took longer than start_timeout_s to start (its tasks wait in its line meanwhile). False (the
        pool stops, failing its tasks) when starting keeps failing: a worker that cannot start."""
        for i, w in enumerate(self._workers):
            if w.ready:
                continue
            if w.conn in ready:
                try:
                    _, status, _ = w.conn.recv()
                except (EOFError, OSError):
                    status = "died"
                if status == "ready":
                    w.ready = True
                    continue
            if w.conn in ready or w.process.sentinel in ready or time.monotonic() >= w.born + self.start_timeout_s:
                self._start_failures += 1
                if self._start_failures > 3 * self._size:
                    self._stop_error = TaskFailed(
                        f"the media worker processes cannot start ({self._start_failures} died or hung before "
                        "they were ready); run with prep_workers=0 to decode in the harness's threads"
                    )
                    return False
                self._replace(i)
        if all(w.ready for w in self._workers):
            self._started.set()
        return True

    @staticmethod
    def _how(w: _Worker) -> str:
        w.process.join(timeout=5)  # its pipe closed: the exit status follows at once
        code = w.process.exitcode
        return f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"

    def _assign(self, t: _Task) -> None:
        """A task for media a worker already has joins that worker's line; any other waits for
        the first idle worker (so long decodes spread by time, not by count)."""
        if t.affinity is not None and t.affinity in self._owner:
            index, n = self._owner[t.affinity]
            self._owner[t.affinity] = (index, n + 1)
            self._workers[index].queue.append(t)
        else:
            self._waiting.append(t)

    def _take(self, index: int) -> _Task:
        """The oldest waiting task for idle worker `index`, which becomes the owner of its media:
        the other waiting tasks for the same media join its line."""
        t = self._waiting.popleft()
        if t.affinity is not None:
            same = [o for o in self._waiting if o.affinity == t.affinity]
            for o in same:
                self._waiting.remove(o)
                self._workers[index].queue.append(o)
            self._owner[t.affinity] = (index, 1 + len(same))
        return t

    def _send(self, index: int, t: _Task, retry: bool = True) -> None:
        w = self._workers[index]
        w.running, w.started = t, time.monotonic()
        try:
            w.conn.send((t.id, t.payload))
        except (BrokenPipeError, OSError):
            if not retry:
                self._fail_and_replace(index, f"the preprocessing worker died before reading {t.what}")
                return
            w.running = None  # it died while idle: not this task's fault
            self._replace(index)
            self._send(index, t, retry=False)

    def _receive(self, index: int, w: _Worker) -> None:
        t = w.running
        try:
            task_id, status, value = w.conn.recv()
        except (EOFError, OSError):
            self._fail_and_replace(index, f"the preprocessing worker died ({self._how(w)}) while reading {t.what}")
            return
        self._finish(t)
        w.running = None
        if status == "ok":
            t.future.set_result(value)
        elif status == "sample_error":
            t.future.set_exception(SampleError(value))
        else:
            t.future.set_exception(SampleError(f"preprocessing failed on {t.what}: {value}"))

    def _finish(self, t: _Task) -> None:
        if t.affinity is not None and t.affinity in self._owner:
            index, n = self._owner[t.affinity]
            if n <= 1:
                del self._owner[t.affinity]
            else:
                self._owner[t.affinity] = (index, n - 1)

    def _replace(self, index: int) -> None:
        w = self._workers[index]
        self._stop(w)
        fresh = self._start()
        fresh.queue = w.queue  # its waiting tasks stay in line, on the new process
        self._workers[index] = fresh
        self.replaced += 1

    def _fail_and_replace(self, index: int, message: str) -> None:
        t = self._workers[index].running
        self._replace(index)
        if t is not None:
            self._finish(t)
            t.future.set_exception(TaskFailed(f"{message}; the next run of the command retries this sample"))
