"""The types every layer passes: a sample to evaluate, the record of one finished sample, a row
of the result CSV. They import nothing from modeltest, so tasks, media, backends, records,
outputs and the report can all use them without importing each other.

The per-sample record (`SampleRecord`) is what the resume shards, the debug file and the report
hold. Schema (version 2; one JSON object per line, keys in this order):
    id, subject          the sample (question_id / qid; the subject, or the task name)
    input                {"prompt", "images", "videos"}: the user text and media paths
    output               the decoded answer text (null when the sample failed)
    prediction           the cleaned answer / extracted letter the score used (null: unparsed)
    gold                 the human answers (TextVQA) / the letter (VideoBench)
    score                0..1, recomputed from `output` and today's answer key
    error                null, or why the sample failed (one line)
    e2e_time             seconds the sample's request was computed: from its admission into the
                         engine (hf: the start of its batch) to its last token; excludes queueing
    queue_time           seconds the request waited before its computation started
    preprocess_time      seconds of image/video loading and the processor
    input_tokens         prompt tokens with vision placeholders expanded
    output_tokens        generated tokens, without the stop token
    prefill_time         seconds from admission to the first token: its prefill, in one pass or in chunks (engine; null for hf)
    choices              (VideoBench) the options shown, letter -> text
    <task extras>        TextVQA: normalized; VideoBench: reference_rule_choice
    transient            (only when true) the error may not be the sample's — a server or network
                         fault, a media decode that timed out or whose worker crashed: a
                         resumed run computes the sample again
    key                  the resume key (records.py: what can change the answer)
    schema               this schema's version
Version 1 (before queue_time and schema) is read as well: its e2e_time included queueing.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".wmv", ".avi")
SCHEMA_VERSION = 2


@dataclass
class Sample:
    """One question, ready for inference."""

    id: str  # question_id (TextVQA) / qid (VideoBench), as a string
    subject: str  # VideoBench subject; the task name for TextVQA
    prompt: str  # the user text, after the task's prompt template
    images: List[str] = field(default_factory=list)  # absolute paths, in prompt order
    videos: List[str] = field(default_factory=list)
    gold: Any = None  # the human answers (TextVQA) / the letter (VideoBench)
    choices: Optional[Dict[str, str]] = None
    # Media options handed to qwen-vl-utils for this sample (pixels, fps, frames).
    image_options: Dict[str, Any] = field(default_factory=dict)
    video_options: Dict[str, Any] = field(default_factory=dict)
    # A problem found while loading (e.g. no choices): the sample is recorded as an error.
    load_error: Optional[str] = None
    # The questions file this sample came from (part of its resume key).
    source: Optional[str] = None


@dataclass
class ResultRow:
    """One row of the result CSV."""

    tasks: str
    total: int
    passed: float
    value: Optional[float]
    metric: str = "acc"
    n_shot: int = 0
    errors: int = 0
    unparsed: int = 0


@dataclass
class SampleRecord:
    id: str
    subject: str
    input: Dict[str, Any]
    output: Optional[str] = None
    prediction: Optional[str] = None
    gold: Any = None
    score: float = 0.0
    error: Optional[str] = None
    e2e_time: Optional[float] = None
    queue_time: Optional[float] = None
    preprocess_time: Optional[float] = None
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    prefill_time: Optional[float] = None
    choices: Optional[Dict[str, str]] = None
    # When the model's input did not follow the task's preprocessing (a served model whose server
    # could not take the media options): what it followed. Written only when set.
    preprocessing: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # the task's per-sample extras
    # The error was the server's or the network's (unreachable, timeout, 429/5xx after retries),
    # not the sample's: a resumed run computes the sample again. Written only when true.
    transient: bool = False
    key: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def unparsed(self) -> bool:
        """Answered, but no answer could be read from the output."""
        return self.error is None and self.prediction is None

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "key", "schema", "transient"):
                continue
            if f.name in ("choices", "preprocessing") and getattr(self, f.name) is None:
                continue
            d[f.name] = getattr(self, f.name)
        d.update(self.extra)
        if self.transient:
            d["transient"] = True
        d["key"] = self.key
        d["schema"] = self.schema
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SampleRecord":
        """A record from its JSON object (version 1 or 2); ValueError if it is not one."""
        if not isinstance(d, dict) or "key" not in d or "id" not in d:
            raise ValueError("not a sample record")
        schema = d.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise ValueError(f"record schema {schema!r} is newer than this modeltest's {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        known["schema"] = schema
        return cls(**known, extra=extra)


def count_errors(records: List[SampleRecord]) -> int:
    return sum(1 for r in records if r.error)


def errors_by_message(records: List[SampleRecord]) -> List[Tuple[str, int]]:
    """The records' errors grouped by message, the most frequent first."""
    return collections.Counter(r.error for r in records if r.error).most_common()


def run_failure(records: List[SampleRecord], fail_on_errors: bool) -> Optional[str]:
    """Why a finished run must exit non-zero (one line), or None: every sample failed, or — with
    fail_on_errors — any did."""
    errors = count_errors(records)
    if not records or not errors or (errors < len(records) and not fail_on_errors):
        return None
    first = errors_by_message(records)[0][0]
    if errors == len(records):
        return f"every sample failed ({errors}); nothing was scored. Most frequent error: {first}"
    return f"{errors} of {len(records)} samples failed (fail_on_errors=true). Most frequent error: {first}"


def count_unparsed(records: List[SampleRecord]) -> int:
    return sum(1 for r in records if r.unparsed)
