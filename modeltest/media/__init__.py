"""What turns image and video files into the pixels the model sees, exactly as the reference path
(qwen-vl-utils + decord + transformers' processor) does:

    decode.py          qwen-vl-utils on a conversation's local media; MediaSource, the interface
                       the rest of modeltest asks for pixels through; per-file errors
    cache.py           a lossless on-disk cache of decoded media, shared by processes
    pool.py            a process pool with per-task timeouts and replacement of dead workers
    workers.py         MediaSource on that pool: decoding in worker processes
    fast_processor.py  transformers' image processor, bit-identical, by table lookup
    processor.py       loading transformers' processor; copies lent to threads
    options.py         the options qwen-vl-utils reads (pixels, fps, frames): one check for all
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .decode import InProcessMedia, MediaSource

__all__ = ["InProcessMedia", "MediaSource", "open_media_source"]


def open_media_source(
    media_cache: Any = "default",
    media_cache_gb: float = 50.0,
    workers: Any = 0,
    timeout_s: float = 300.0,
    setting: str = "media_cache",
) -> MediaSource:
    """Where images and videos are decoded: in `workers` processes ("auto": the cores this rank
    may use; 0: in the caller's threads), through the media cache unless `media_cache` is off.
    `setting` names the option in the one-line error for a folder that cannot be used."""
    from .cache import MediaCache, default_cache_dir

    folder: Optional[Path] = None
    if media_cache not in ("off", "", None, False):
        folder = default_cache_dir() if media_cache == "default" else Path(media_cache)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise UserError(
                f"{setting}: cannot use '{folder}' ({e.strerror}); pass {setting}=/a/writable/folder or {setting}=off"
            ) from None
    max_bytes = int(media_cache_gb * 2**30)
    if workers == "auto":
        from .pool import auto_workers

        workers = auto_workers()
    if int(workers) == 0:
        return InProcessMedia(MediaCache(folder, max_bytes) if folder is not None else None)
    from .workers import WorkerMedia

    return WorkerMedia(int(workers), timeout_s, str(folder) if folder is not None else None, max_bytes)
