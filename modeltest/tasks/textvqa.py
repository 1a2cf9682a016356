"""TextVQA (val): `textvqa_val.jsonl` joined with `textvqa_val_annotations.json` (the reference's layout; README "Running on real weights and data")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config.schema import TaskConfig
from ..core import ResultRow, Sample, SampleRecord
from ..errors import UserError
from ..metrics.vqa import clean_answer, normalize_prediction, vqa_accuracy
from .base import Scored, Task, limit_per_subject, subject_rows

REQUIRED_KEYS = ("image", "question", "question_id")


def find_jsonl(path: Path) -> Path:
    """The questions file: the path itself, or the single *.jsonl in a folder."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.jsonl"))
    if len(found) != 1:
        raise UserError(
            f"task.local_dataset_path: '{path}' is a folder with {len(found)} .jsonl files; "
            "point it at textvqa_val.jsonl"
        )
    return found[0]


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in REQUIRED_KEYS if k not in obj]
            if missing:
                raise UserError(
                    f"{path}:{lineno}: missing key(s) {', '.join(missing)}; each line needs {', '.join(REQUIRED_KEYS)}"
                )
            obj["_line"] = lineno
            rows.append(obj)
    return rows


def read_annotations(path: Path) -> Dict[str, List[str]]:
    """question_id (as a string) -> the human answers."""
    if not path.is_file():
        raise UserError(
            f"{path}: annotations file not found; TextVQA needs '<jsonl stem>_annotations.json' beside the jsonl"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise UserError(f'{path}: expected {{"annotations": [...]}} (VQA format)')
    out = {}
    for i, ann in enumerate(anns):
        try:
            out[str(ann["question_id"])] = [str(a["answer"]) for a in ann["answers"]]
        except (KeyError, TypeError):
            raise UserError(
                f"{path}: annotations[{i}] needs 'question_id' and 'answers' [{{\"answer\": ...}}, ...]"
            ) from None
    return out


@dataclass
class TextVQATaskConfig(TaskConfig):
    task_name: str = "textvqa"
    # The prompt is prefix + question + suffix (the reference's short-answer instruction); a
    # model config may override either with mm_model.prompt_prefix / prompt_suffix.
    prompt_prefix: str = ""
    prompt_suffix: str = " Answer the question using a single word or phrase."


class TextVQATask(Task):
    name = "textvqa"
    config_class = TextVQATaskConfig

    def load_samples(self, limit: Optional[int] = None) -> List[Sample]:
        jsonl = find_jsonl(Path(self.cfg.local_dataset_path))
        ann_path = jsonl.with_name(jsonl.stem + "_annotations.json")
        answers = read_annotations(ann_path)
        mm = self.model_cfg.mm_model
        prefix = mm.prompt_prefix if mm.prompt_prefix is not None else self.cfg.prompt_prefix
        suffix = mm.prompt_suffix if mm.prompt_suffix is not None else self.cfg.prompt_suffix
        samples = []
        for row in read_jsonl(jsonl):
            qid = str(row["question_id"])
            if qid not in answers:
                raise UserError(
                    f"{jsonl}:{row['_line']}: question_id {qid} has no entry in {ann_path.name}; "
                    "use the matching annotations file or remove the line"
                )
            image = Path(str(row["image"]))
            if not image.is_absolute():
                image = jsonl.parent / image  # relative paths resolve against the jsonl's folder
            samples.append(
                Sample(
                    id=qid,
                    subject=self.name,
                    prompt=f"{prefix}{row['question']}{suffix}",
                    images=[str(image)],
                    gold=answers[qid],
                    image_options=self.cfg.media_options()["image"],
                    source=str(jsonl),
                )
            )
        return limit_per_subject(samples, limit)

    def score(self, sample: Sample, output: str) -> Scored:
        cleaned = clean_answer(output)
        return Scored(
            score=vqa_accuracy(output, sample.gold),
            prediction=cleaned,
            extra={"normalized": normalize_prediction(cleaned)},
        )

    def aggregate(self, records: List[SampleRecord]) -> List[ResultRow]:
        return subject_rows(records, [self.name], self.name)
