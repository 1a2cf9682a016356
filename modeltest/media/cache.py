"""A persistent cache of preprocessed media: what qwen-vl-utils returns for an image or a video,
stored losslessly, so a second model evaluated on the same dataset (or a resumed run, or the next
question on the same clip) decodes nothing.

Why lossless is possible: qwen-vl-utils resizes decord's uint8 frames (and PIL's uint8 images)
with torchvision/PIL on uint8 data, so every value it returns is an integer in 0..255; a uint8
array holds it exactly and the model input is bit-identical (tests compare with torch.equal).
An entry whose values are not so (another qwen-vl-utils) is simply not cached.

Key: the file's content (sha256), every option that changes the frames (fps, frame and pixel
bounds — the element's keys), and the versions of the libraries that produce them. Entries are
written to a temporary file and renamed (atomic: data-parallel ranks can share the folder; two
ranks writing the same entry write the same bytes); each carries the sha256 of its payload, so a
corrupt or truncated entry is detected, removed and computed again. The folder is kept under a
size bound by removing the least recently used entries.

Decoded once across processes too: the ranks of a tensor-parallel replica build the same inputs
at the same moment, and worker processes may ask for one clip together. Whoever creates an
entry's lock file (O_EXCL) decodes; the others wait for the entry — or take over once the lock's
process is gone (same host) or the lock is older than STALE_LOCK_S (another host's).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import struct
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

MAGIC = b"MTMC1\n"
FORMAT_VERSION = 1
MEMO_ENTRIES = 8  # decoded media kept in memory (the next questions on the same clip)
LOCK_POLL_S = 0.05  # how often a process waiting for another's decode looks
STALE_LOCK_S = 3600.0  # a lock from another host older than this is abandoned


def library_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"format": str(FORMAT_VERSION)}
    for name in ("qwen-vl-utils", "decord", "torchvision", "torch", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def exact_uint8(video):
    """`video` (qwen-vl-utils' float frames) as a uint8 tensor holding the same values, or None
    where some value is not an integer in 0..255."""
    import torch

    if not isinstance(video, torch.Tensor):
        return None
    if video.dtype == torch.uint8:
        return video
    if not video.is_floating_point():
        return None
    u8 = video.to(torch.uint8)
    return u8 if torch.equal(u8.to(video.dtype), video) else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODELTEST_MEDIA_CACHE", Path.home() / ".cache" / "modeltest" / "media"))


class MediaCache:
    def __init__(self, folder: Path, max_bytes: int, memo_entries: int = MEMO_ENTRIES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.memo_entries = memo_entries
        self.versions = library_versions()
        self.hits = self.misses = self.uncacheable = 0
        self._lock = threading.Lock()
        self._digests: Dict[Tuple[str, int, int], str] = {}
        self._memo: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        self._views: Dict[str, Any] = {}  # key -> the uint8 tensor over a remembered entry
        self._total: Optional[int] = None  # bytes on disk, scanned at the first write
        self._pending: Dict[str, threading.Event] = {}  # keys being computed by some thread
        self._uncacheable: set = set()
        self.folder.mkdir(parents=True, exist_ok=True)

    # ---- the two kinds ------------------------------------------------------------------------
    def image(self, ele: Dict[str, Any]):
        """fetch_image(ele) (a resized RGB PIL image), from the cache when there."""
        from PIL import Image
        from qwen_vl_utils.vision_process import fetch_image

        def compute():
            image = fetch_image(ele)
            return image, (np.asarray(image) if image.mode == "RGB" else None)

        arr, fresh = self._fetch(self.key(ele, "image"), compute)
        return fresh if fresh is not None else Image.fromarray(arr, "RGB")

    def cached(self, ele: Dict[str, Any], uint8: bool = False, count: bool = True):
        """image(ele) or video(ele, uint8) from memory or disk, or None where there is no (valid)
        entry: nothing is decoded. count=False: not a hit (the miss that wrote it was counted)."""
        from PIL import Image

        kind = "image" if ("image" in ele or "image_url" in ele) else "video"
        key = self.key(ele, kind)
        arr = self._lookup(key)
        if arr is None:
            return None
        if count:
            with self._lock:
                self.hits += 1
        return Image.fromarray(arr, "RGB") if kind == "image" else self._frames(key, arr, uint8)

    def has(self, ele: Dict[str, Any]) -> bool:
        """Whether an entry exists (in memory or on disk; not read or verified)."""
        kind = "image" if ("image" in ele or "image_url" in ele) else "video"
        key = self.key(ele, kind)
        with self._lock:
            if key in self._memo:
                return True
        return self._path(key).is_file()

    def video(self, ele: Dict[str, Any], uint8: bool = False):
        """fetch_video(ele) (float frames [T, C, H, W]), from the cache when there. uint8=True:
        the same values as a uint8 tensor where they are exact (always, from an entry)."""
        from qwen_vl_utils.vision_process import fetch_video

        def compute():
            video = fetch_video(ele)
            exact = exact_uint8(video)
            return video, (exact.numpy() if exact is not None else None)

        key = self.key(ele, "video")
        arr, fresh = self._fetch(key, compute)
        if fresh is not None:
            exact = exact_uint8(fresh) if uint8 else None
            return exact if exact is not None else fresh
        return self._frames(key, arr, uint8)

    def _frames(self, key: str, arr: np.ndarray, uint8: bool):
        """An entry's frames as qwen-vl-utils' float frames (a new tensor), or (uint8) its
        read-only memory without a copy — one tensor per entry while it is remembered, marked
        immutable, so the fast processor reuses its patches for the clip's next questions."""
        import torch

        from .fast_processor import mark_immutable

        if not uint8:
            return torch.from_numpy(arr.copy()).float()  # (the copy: a writable source, no warning)
        with self._lock:
            view = self._views.get(key)
            if view is not None and view.data_ptr() == arr.ctypes.data:
                return view
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            view = mark_immutable(torch.from_numpy(arr))
        with self._lock:
            if key in self._memo:
                self._views[key] = view
        return view

    def _fetch(self, key: str, compute):
        """(cached array, None) on a hit; (array or None, the freshly computed value) on a miss.
        Threads asking for the same key while it is being computed wait for it: each medium is
        decoded once per run, whatever the number of preprocessing threads."""
        while True:
            arr = self._lookup(key)
            if arr is not None:
                with self._lock:
                    self.hits += 1
                return arr, None
            with self._lock:
                waiting_on = self._pending.get(key)
                if waiting_on is None:
                    self._pending[key] = threading.Event()
            if waiting_on is None:
                break
            waiting_on.wait()
            if key not in self._uncacheable:
                continue  # computed and stored by the other thread: read it
            break
        try:
            # Other processes (the ranks of a tensor-parallel replica, other workers) may want the
            # same entry now: the one that creates its lock file decodes, the others wait for it.
            while not self._lock_entry(key):
                arr = self._wait_for_other_process(key)
                if arr is not None:
                    with self._lock:
                        self.hits += 1
                    return arr, None
            try:
                with self._lock:
                    self.misses += 1
                fresh, arr = compute()
                self._put(key, arr)
                return arr, fresh
            finally:
                self._lock_path(key).unlink(missing_ok=True)
        finally:
            with self._lock:
                self._pending.pop(key).set()

    # ---- one decode across processes ------------------------------------------------------------
    def _lock_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.lock"

    def _lock_entry(self, key: str) -> bool:
        """Create the entry's lock file (atomically: one process wins); False if another has it."""
        path = self._lock_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError:
            return True  # a read-only or odd folder: decode without the lock
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True

    def _wait_for_other_process(self, key: str) -> Optional[np.ndarray]:
        """Wait while another live process holds the entry's lock: its entry, or None once the
        lock is gone without one (it could not cache it, or died: then this process decodes)."""
        lock = self._lock_path(key)
        while True:
            arr = self._lookup(key)
            if arr is not None:
                return arr
            try:
                owner = lock.read_text().split()
                age = time.time() - lock.stat().st_mtime
            except OSError:
                return self._lookup(key)  # the lock just went: the entry, or decode here
            if self._stale(owner, age):
                lock.unlink(missing_ok=True)
                return None
            time.sleep(LOCK_POLL_S)

    @staticmethod
    def _stale(owner: list, age: float) -> bool:
        """A lock whose process is gone (same host), or older than STALE_LOCK_S (another host)."""
        if len(owner) != 2:
            return age > 60  # written in the instant after its creation, or garbage
        host, pid = owner
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except ValueError:
                return True  # not a pid: garbage
            except PermissionError:
                return False  # alive, another user's
            return False
        return age > STALE_LOCK_S

    # ---- keys -----------------------------------------------------------------------------------
    def key(self, ele: Dict[str, Any], kind: str) -> str:
        path = str(ele.get(kind) or ele.get(f"{kind}_url"))
        if path.startswith("file://"):
            path = path[len("file://") :]
        options = {k: v for k, v in ele.items() if k not in ("type", kind, f"{kind}_url")}
        payload = {"kind": kind, "content": self._digest(path), "options": options, "versions": self.versions}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _digest(self, path: str) -> str:
        st = os.stat(path)
        ident = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if ident in self._digests:
                return self._digests[ident]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        with self._lock:
            self._digests[ident] = h.hexdigest()
        return h.hexdigest()

    # ---- entries ------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.bin"

    def _lookup(self, key: str) -> Optional[np.ndarray]:
        """The entry from memory or disk, or None."""
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        arr = self._read(self._path(key))
        if arr is not None:
            with self._lock:
                self._remember(key, arr)
        return arr

    def _put(self, key: str, arr: Optional[np.ndarray]) -> None:
        if arr is None:
            with self._lock:
                self.uncacheable += 1
                self._uncacheable.add(key)
            return
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        with self._lock:
            self._remember(key, arr)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = arr.tobytes()
        header = json.dumps({"shape": list(arr.shape), "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header + payload)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)  # a full disk costs the cache entry, never the run
            return
        with self._lock:
            if self._total is None:
                self._total = sum(p.stat().st_size for p in self.folder.glob("*/*.bin"))
            else:
                self._total += path.stat().st_size
            over = self._total > self.max_bytes
        if over:
            self._evict()

    def _remember(self, key: str, arr: np.ndarray) -> None:
        self._memo[key] = arr
        self._memo.move_to_end(key)
        while len(self._memo) > self.memo_entries:
            gone, _ = self._memo.popitem(last=False)
            self._views.pop(gone, None)

    @staticmethod
    def _read(path: Path) -> Optional[np.ndarray]:
        """The entry's array, or None if it is missing, truncated or corrupt (then removed)."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            if not data.startswith(MAGIC):
                raise ValueError("bad magic")
            n = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])[0]
            start = len(MAGIC) + 4
            header = json.loads(data[start : start + n])
            payload = memoryview(data)[start + n :]  # no copy of the frames
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch")
            arr = np.frombuffer(payload, dtype=np.uint8).reshape(header["shape"])
        except (ValueError, KeyError, struct.error):
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: evicted last
        return arr

    def _evict(self) -> None:
        """Remove the least recently used entries until the folder is under 90% of the bound."""
        entries = []
        for p in self.folder.glob("*/*.bin"):
            try:
                st = p.stat()
            except OSError:  # another rank removed it
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= 0.9 * self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
        with self._lock:
            self._total = total

    def summary(self) -> Dict[str, Any]:
        return {"folder": str(self.folder), "hits": self.hits, "misses": self.misses, "uncacheable": self.uncacheable}
