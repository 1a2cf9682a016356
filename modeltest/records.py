"""Crash-safe per-sample records, and the keys that decide whether a finished sample can be reused.

Every finished sample is appended as one JSON line to this replica's shard file and fsync'd
before it counts as done, so a crash (even SIGKILL) loses at most the samples in flight. A
re-run reads every shard in the folder, whatever dp/tp/batch size wrote it, and reuses the
records whose key still matches.

The key of a sample covers what can change its answer — task, the questions file's content,
sample id, prompt, media paths and preprocessing options, generation settings, model identity —
and nothing that cannot (tensor/data-parallel sizes, batch size, output paths). Scores are not
part of a record's identity: they are recomputed from the stored output at the end, so a fixed
answer key needs no new inference.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from .core import Sample, SampleRecord
from .errors import UserError


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run_identity(cfg, max_new_tokens: int, model: Dict[str, Any]) -> Dict[str, Any]:
    """The settings shared by every sample of a run that can change an answer. `model`: what
    identifies the model (backends.model_identity: the checkpoint's files, or what a server says
    it serves)."""
    m = cfg.model
    return {
        "task": cfg.task.task_name,
        "model": model,
        "backend": m.backend,
        "data_type": m.data_type,
        "use_chat_template": m.use_chat_template,
        "max_new_tokens": max_new_tokens,
        "max_input_length": cfg.task.requested_max_input_length,
        "decoding": "greedy",
    }


def sample_key(run_id: Dict[str, Any], sample: Sample, source_digest: str) -> str:
    payload = {
        "run": run_id,
        "source": source_digest,
        "id": sample.id,
        "subject": sample.subject,
        "prompt": sample.prompt,
        "images": sample.images,
        "videos": sample.videos,
        "image_options": sample.image_options,
        "video_options": sample.video_options,
        "load_error": sample.load_error,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


class RecordStore:
    """The records folder of one task/model/dtype under output_dir."""

    def __init__(self, folder: Path, shard: str):
        self.folder = folder
        self.path = folder / f"records_{shard}.jsonl"
        self._f = None

    def reset(self) -> Optional[Path]:
        """resume=false: set the old records aside (renamed, not deleted) and start empty."""
        if not self.folder.exists() or not any(self.folder.glob("records_*.jsonl")):
            return None
        aside = self.folder.with_name(self.folder.name + ".replaced-" + dt.datetime.now().strftime("%Y%m%d_%H%M%S_%f"))
        self.folder.rename(aside)
        return aside

    def load(self) -> Dict[str, SampleRecord]:
        """key -> record from every shard; a torn or corrupt line (a crash mid-write), or a
        record of a newer schema, is skipped (its sample is computed again)."""
        out: Dict[str, SampleRecord] = {}
        for shard in sorted(self.folder.glob("records_*.jsonl")):
            with open(shard, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = SampleRecord.from_json(json.loads(line))
                    except ValueError:  # JSONDecodeError is one
                        continue
                    # A sample computed again after a server error: its real record wins,
                    # whichever shard holds which.
                    if not (rec.transient and rec.key in out and not out[rec.key].transient):
                        out[rec.key] = rec
        return out

    def append(self, record: SampleRecord) -> None:
        """Write one record and fsync it: only then does the sample count as done."""
        try:
            if self._f is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                torn = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
                self._f = open(self.path, "a", encoding="utf-8")
                if torn:  # a crash cut the last line short: end it, so the next record starts clean
                    self._f.write("\n")
            self._f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise UserError(
                f"{self.path}: cannot save a finished sample ({why}); free space or fix the folder, "
                "then run the same command again: finished samples are kept and will be reused"
            ) from None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ShardProgress:
    """Counts the records other replicas append to their shards after it is created (rank 0's
    progress bar covers every replica without any collective)."""

    def __init__(self, folder: Path, shards: List[str]):
        self.paths = [folder / f"records_{s}.jsonl" for s in shards]
        self.offsets = {p: (p.stat().st_size if p.exists() else 0) for p in self.paths}
        self.partial = {p: b"" for p in self.paths}
        self.lines = 0

    def count(self) -> int:
        for p in self.paths:
            try:
                with open(p, "rb") as f:
                    f.seek(self.offsets[p])
                    data = f.read()
            except OSError:
                continue
            self.offsets[p] += len(data)
            text = self.partial[p] + data
            *complete, self.partial[p] = text.split(b"\n")
            self.lines += sum(1 for line in complete if line.rstrip().endswith(b"}"))
        return self.lines


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
