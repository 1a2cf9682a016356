"""What every dataset task provides: samples, per-sample scoring, aggregation into result rows.

A task is one module (textvqa.py, videobench.py): its config dataclass, how it reads the dataset
and builds prompts, how it scores an answer; `tasks/__init__.py` registers it by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..config.schema import ModelConfig, TaskConfig
from ..core import ResultRow, Sample, SampleRecord, count_errors, count_unparsed


@dataclass
class Scored:
    score: float  # 0..1
    prediction: Optional[str]  # the cleaned answer / the extracted letter (None: unparseable)
    extra: Dict[str, Any] = field(default_factory=dict)


class Task:
    name: str = ""
    config_class: type = TaskConfig

    def __init__(self, task_cfg: TaskConfig, model_cfg: ModelConfig):
        self.cfg = task_cfg
        self.model_cfg = model_cfg

    def load_samples(self, limit: Optional[int] = None) -> List[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> Scored:
        raise NotImplementedError

    def score_record(self, sample: Sample, record: SampleRecord) -> SampleRecord:
        """The one place a score is computed: from the record's stored output and today's answer
        key (a fixed key needs no new inference); a failed sample scores 0."""
        rec = dataclasses.replace(record, gold=sample.gold, score=0.0, prediction=None, extra={})
        if rec.error is None and rec.output is not None:
            scored = self.score(sample, rec.output)
            rec.score, rec.prediction, rec.extra = scored.score, scored.prediction, dict(scored.extra)
        return rec

    def aggregate(self, records: List[SampleRecord]) -> List[ResultRow]:
        """Result rows: the overall row first, then one per subject (and task-specific extras)."""
        raise NotImplementedError

    def summary(self, rows: List[ResultRow]) -> Dict[str, Any]:
        """Extra machine-readable figures for the summary JSON."""
        return {}


def limit_per_subject(samples: List[Sample], limit: Optional[int]) -> List[Sample]:
    if limit is None:
        return samples
    seen: Dict[str, int] = {}
    out = []
    for s in samples:
        n = seen.get(s.subject, 0)
        if n < limit:
            out.append(s)
            seen[s.subject] = n + 1
    return out


def subject_rows(records: List[SampleRecord], subjects: List[str], overall_name: str) -> List[ResultRow]:
    """Overall (micro) row and one row per subject, from scored per-sample records."""

    def row(name, recs):
        total = len(recs)
        passed = sum(r.score for r in recs)
        return ResultRow(
            tasks=name,
            total=total,
            passed=passed,
            value=(passed / total) if total else None,
            errors=count_errors(recs),
            unparsed=count_unparsed(recs),
        )

    rows = [row(overall_name, records)]
    if len(subjects) > 1 or (subjects and subjects[0] != overall_name):
        for s in subjects:
            rows.append(row(s, [r for r in records if r.subject == s]))
    return rows
