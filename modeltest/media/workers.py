"""Images and videos decoded in worker processes (media/pool.py): `WorkerMedia` is the
MediaSource on top of the pool. Each worker decodes with one decoding thread through the shared
media cache (atomic entries: workers and data-parallel ranks can fill one folder) and sends the
frames back as uint8 where they are exact, or says "in the cache" so the harness reads the entry
itself instead of receiving the frames through a pipe.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .decode import MediaSource, Vision, media_names, media_parts
from .pool import WorkerPool

WORKER_MEMO_ENTRIES = 2  # decoded media a worker keeps in memory (its current clip, the next)


@dataclass
class _MediaTask:
    messages: List[Dict[str, Any]]
    uint8: bool
    send_frames: bool = False  # even when they are in the cache


@dataclass
class _MediaResult:
    images: Optional[list]  # PIL images, or None
    videos: Optional[list]  # numpy frames, or None
    hits: int
    misses: int
    in_cache: bool = False  # not sent: every medium is in the cache, read it there


@dataclass
class _WorkerState:
    cache: Any  # a MediaCache, or None
    faults: List[Tuple[str, str]]  # (hang | die, path substring): tests only


WORKER_LOG = "modeltest-media-workers.log"


def worker_log() -> str:
    """Where the workers' stderr goes (FFmpeg's and decord's lines about bad files, written from C
    where no Python setting reaches): a file in the temporary folder, not the progress bar."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), WORKER_LOG)


def _stderr_to_log() -> None:
    try:
        fd = os.open(worker_log(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return  # keep the inherited stderr
    os.dup2(fd, 2)
    os.close(fd)


def _media_init(cache_folder: Optional[str], cache_bytes: int, faults: List[Tuple[str, str]]) -> _WorkerState:
    """Each worker: one torch thread, one decoding thread, its own handle on the shared cache."""
    import decord
    import torch

    from .cache import MediaCache
    from .decode import quiet_video_libraries

    torch.set_num_threads(1)
    quiet_video_libraries()
    _stderr_to_log()
    reader = decord.VideoReader
    # qwen-vl-utils opens `decord.VideoReader(path)`, whose default uses every core; a worker
    # takes one (FFmpeg decodes bit-identically with any number of threads).
    decord.VideoReader = lambda *a, **k: reader(*a, **{"num_threads": 1, **k})
    cache = MediaCache(cache_folder, cache_bytes, memo_entries=WORKER_MEMO_ENTRIES) if cache_folder else None
    return _WorkerState(cache, faults)


def _media_work(state: _WorkerState, task: _MediaTask) -> _MediaResult:
    """Decode (through the cache). Where every medium is then in the cache, say so rather than
    send the frames (the harness reads the entry it shares: no 20 MB per question through a
    pipe); else the frames as numpy arrays, pickled as bytes (not shared as torch tensors
    through file descriptors)."""
    from .decode import vision_from_messages

    for kind, part in state.faults:
        if part in media_names(task.messages):
            if kind == "hang":
                time.sleep(1e6)
            os.kill(os.getpid(), signal.SIGKILL)
    cache = state.cache
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    images, videos = vision_from_messages(task.messages, cache, task.uint8)
    if cache is None:
        return _MediaResult(images, [v.numpy() for v in videos] if videos else None, 0, 0)
    from qwen_vl_utils.vision_process import extract_vision_info

    counts = cache.hits - hits, cache.misses - misses
    if not task.send_frames and all(cache.has(e) for e in extract_vision_info(task.messages)):
        return _MediaResult(None, None, *counts, in_cache=True)
    return _MediaResult(images, [v.numpy() for v in videos] if videos else None, *counts)


def _media_key(messages: List[Dict[str, Any]]) -> Optional[str]:
    """The videos of a message list and their options: the affinity of its task (images are
    cheap enough to go to any worker)."""
    parts = [p for p in media_parts(messages) if p["type"] == "video"]
    return (
        repr(sorted((str(p.get("video")), sorted((k, repr(v)) for k, v in p.items())) for p in parts))
        if parts
        else None
    )


class WorkerMedia(MediaSource):
    """With a cache, the workers fill it and this process reads it: a medium already there is read
    here (memory or disk, checksum verified) without a worker or a pipe; only a miss is decoded in
    a worker, which writes the entry and sends the frames back."""

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        cache_folder: Optional[str],
        cache_bytes: int,
        faults: Sequence[Tuple[str, str]] = (),
    ):
        """faults: for tests only, no run passes any — ("hang" | "die", SUBSTRING) makes a worker
        hang on, or be killed by, media whose path contains SUBSTRING, so that the harness's
        handling of a stuck or crashed decode can be proven."""
        from .cache import MediaCache

        self.cache_folder = cache_folder
        self.cache = MediaCache(cache_folder, cache_bytes) if cache_folder else None  # this process's reader
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._prefetched: Dict[str, List[Future]] = {}  # decodes started ahead of vision()
        self.pool = WorkerPool(
            _media_work,
            workers,
            timeout_s,
            init=_media_init,
            init_args=(cache_folder, cache_bytes, list(faults)),
        )

    def _elements(self, messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        from qwen_vl_utils.vision_process import extract_vision_info

        return extract_vision_info(messages)

    def _all_cached(self, messages: List[Dict[str, Any]]) -> bool:
        try:
            return self.cache is not None and all(self.cache.has(e) for e in self._elements(messages))
        except OSError:  # a missing file: the worker's decode names it
            return False

    def _from_cache(self, messages: List[Dict[str, Any]], uint8: bool, count: bool = True) -> Optional[Vision]:
        """Every medium of the messages from the cache, or None if one is not there."""
        if self.cache is None:
            return None
        images, videos = [], []
        try:
            for ele in self._elements(messages):
                got = self.cache.cached(ele, uint8, count)
                if got is None:
                    return None
                (videos if "video" in ele else images).append(got)
        except OSError:
            return None
        return images or None, videos or None

    def prefetch(self, messages: List[Dict[str, Any]], uint8: bool = False) -> None:
        if self._all_cached(messages):
            return  # vision() reads it here
        future = self._submit(messages, uint8)
        with self._lock:
            self._prefetched.setdefault(repr((messages, uint8)), []).append(future)

    def _submit(self, messages: List[Dict[str, Any]], uint8: bool, send_frames: bool = False) -> Future:
        return self.pool.submit(
            _MediaTask(messages, uint8, send_frames),
            _media_key(messages),
            media_names(messages) or "the sample's media",
        )

    def vision(self, messages: List[Dict[str, Any]], uint8: bool = False) -> Vision:
        import torch

        with self._lock:
            waiting = self._prefetched.get(repr((messages, uint8)))
            future = waiting.pop(0) if waiting else None
            if waiting == []:
                del self._prefetched[repr((messages, uint8))]
        if future is None:
            got = self._from_cache(messages, uint8)
            if got is not None:
                return got
            future = self._submit(messages, uint8)
        result: _MediaResult = future.result()
        with self._lock:
            self.hits += result.hits
            self.misses += result.misses
        if result.in_cache:
            got = self._from_cache(messages, uint8, count=False)  # the worker counted it
            if got is not None:
                return got
            # The entry went in between (evicted, corrupted): have the frames sent this time.
            result = self._submit(messages, uint8, send_frames=True).result()
        return result.images, ([torch.from_numpy(v) for v in result.videos] if result.videos else None)

    def parallelism(self) -> int:
        return self.pool.size

    def summary(self) -> Optional[Dict[str, Any]]:
        if self.cache_folder is None:
            return None
        return {
            "folder": self.cache_folder,
            "hits": self.hits + self.cache.hits,
            "misses": self.misses,
            "workers": self.pool.size,
            "workers_replaced": self.pool.replaced,
        }

    def close(self) -> None:
        self.pool.close()
