"""VideoBench: `{Subject}_QA_new.json` files + `answer/ANSWER.json` (the published Video-Bench layout; README "Running on real weights and data")."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config.schema import TaskConfig
from ..core import VIDEO_EXTENSIONS, ResultRow, Sample, SampleRecord
from ..errors import UserError
from ..metrics.choice import extract_choice
from ..metrics.videobench_score import GROUPS, group_scores, weighted_score
from .base import Scored, Task, limit_per_subject, subject_rows

SUBJECT_FILE_SUFFIX = "_QA_new.json"
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# The reference prompt has a trailing space after "is:" for 2, 3 and 5 choices; kept verbatim.
TRAILING_SPACE_COUNTS = (2, 3, 5)
INSTRUCTION = (
    " Please respond with only the corresponding options and do not provide any explanations "
    "or additional information. ASSISTANT:"
)


def build_prompt(question: str, choices: Dict[str, str]) -> str:
    """The reference VideoBench prompt for 2 to 6 non-null choices, in key order."""
    letters = list(choices)
    n = len(letters)
    listing = " ".join(f"{k}.{choices[k]}" for k in letters)
    listing = f"Choices: {listing}" if n == 6 else f" {listing}"
    tail = " " if n in TRAILING_SPACE_COUNTS else ""
    return (
        f"{question}{listing} \n Among the {COUNT_WORDS[n]} options {', '.join(letters)} above, "
        f"the one closest to the correct answer is:{tail}{INSTRUCTION}"
    )


def reference_choice(text: str) -> Optional[str]:
    """The reference harness's rule: the first of A..F found anywhere (kept for comparison only)."""
    for letter in "ABCDEF":
        if letter in text:
            return letter
    return None


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None


def _answer_letter(value: Any) -> Optional[str]:
    """ANSWER.json values are a letter ("A") in one tool and {"answer": "A", ...} in the reference."""
    if isinstance(value, dict):
        value = value.get("answer")
    if isinstance(value, str) and re.fullmatch(r"\s*[A-Fa-f]\s*", value):
        return value.strip().upper()
    return None


@dataclass
class VideoBenchTaskConfig(TaskConfig):
    task_name: str = "videobench"
    requested_max_input_length: int = 30000
    requested_max_output_length: int = 512
    # {Subject: {name: Subject}}; null (every entry commented out) means every subject on disk.
    subject_mapping: Optional[Dict[str, Any]] = None
    # Folder that relative `vid_path` values resolve against; null: the dataset folder, then its parent.
    video_root: Optional[str] = None
    answer_file: str = "answer/ANSWER.json"
    fps: float = 0.5
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    total_pixels: int = 24576 * 28 * 28

    def media_options(self) -> Dict[str, Dict[str, Any]]:
        return {
            "video": {
                "fps": self.fps,
                "min_frames": self.min_frames,
                "max_frames": self.max_frames,
                "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels,
                "total_pixels": self.total_pixels,
            }
        }


class VideoBenchTask(Task):
    name = "videobench"
    config_class = VideoBenchTaskConfig

    @property
    def root(self) -> Path:
        return Path(self.cfg.local_dataset_path)

    def available_subjects(self) -> List[str]:
        return sorted(p.name[: -len(SUBJECT_FILE_SUFFIX)] for p in self.root.glob("*" + SUBJECT_FILE_SUFFIX))

    def selected_subjects(self) -> List[str]:
        available = self.available_subjects()
        if not self.root.is_dir():
            raise UserError(
                f"task.local_dataset_path: '{self.root}' must be the Eval_QA folder "
                f"holding the {{Subject}}{SUBJECT_FILE_SUFFIX} files"
            )
        if self.cfg.subject_mapping is None:
            if not available:
                raise UserError(f"task.local_dataset_path: no *{SUBJECT_FILE_SUFFIX} files in '{self.root}'")
            return available
        unknown = [s for s in self.cfg.subject_mapping if s not in available]
        if unknown:
            raise UserError(
                f"task.subject_mapping: subject(s) {', '.join(unknown)} have no "
                f"{{Subject}}{SUBJECT_FILE_SUFFIX} in {self.root} (there: {', '.join(available) or 'none'}); "
                "run every subject on disk with task.subject_mapping=null, or comment the missing "
                "ones out in configs/task/videobench.yaml"
            )
        return list(self.cfg.subject_mapping)

    def resolve_video(self, vid_path: str) -> str:
        p = Path(vid_path)
        if p.is_absolute():
            return str(p)
        roots = [Path(self.cfg.video_root)] if self.cfg.video_root else [self.root, self.root.parent]
        for r in roots:
            if (r / p).exists():
                return str(r / p)
        return str(roots[0] / p)  # not found: reported per sample when it is read

    def load_samples(self, limit: Optional[int] = None) -> List[Sample]:
        subjects = self.selected_subjects()
        answer_path = self.root / self.cfg.answer_file
        answers = _load_json(answer_path, "answer key (set task.answer_file)")
        video_options = self.cfg.media_options()["video"]
        samples: List[Sample] = []
        for subject in subjects:
            path = self.root / f"{subject}{SUBJECT_FILE_SUFFIX}"
            entries = _load_json(path, "subject file")
            if not isinstance(entries, dict):
                raise UserError(f"{path}: expected a mapping qid -> entry")
            key = answers.get(subject) if isinstance(answers, dict) else None
            if not isinstance(key, dict):
                raise UserError(
                    f"{answer_path}: no answers for subject '{subject}'; use the ANSWER.json that matches the QA files"
                )
            subject_samples = []
            for qid, entry in entries.items():
                if qid not in key:
                    raise UserError(
                        f"{answer_path}: subject '{subject}' has no answer for qid '{qid}' (from {path.name})"
                    )
                gold = _answer_letter(key[qid])
                if gold is None:
                    raise UserError(
                        f"{answer_path}: answer for {subject}/{qid} is {key[qid]!r}; expected a "
                        'letter A-F or {"answer": "A"}'
                    )
                sample = self._sample(subject, str(qid), entry, gold, video_options)
                sample.source = str(path)
                subject_samples.append(sample)
            samples += limit_per_subject(subject_samples, limit)
        return samples

    def _sample(self, subject: str, qid: str, entry: Any, gold: str, video_options: Dict) -> Sample:
        sample = Sample(id=qid, subject=subject, prompt="", gold=gold, video_options=dict(video_options))
        if not isinstance(entry, dict):
            sample.load_error = f"{subject}/{qid}: entry is not a JSON object"
            return sample
        raw_choices = entry.get("choices")
        choices = (
            {str(k): str(v) for k, v in raw_choices.items() if v is not None} if isinstance(raw_choices, dict) else {}
        )
        vid = entry.get("vid_path")
        question = entry.get("question")
        if not choices:
            sample.load_error = (
                f"{subject}/{qid}: entry has no choices; fix 'choices' in {subject}{SUBJECT_FILE_SUFFIX}"
            )
        elif len(choices) not in COUNT_WORDS:
            sample.load_error = f"{subject}/{qid}: {len(choices)} choices; VideoBench prompts take 2 to 6"
        elif not isinstance(question, str):
            sample.load_error = f"{subject}/{qid}: entry has no 'question' text"
        elif isinstance(vid, list):
            sample.load_error = (
                f"{subject}/{qid}: 'vid_path' is a list of frames; a video given as frames is not "
                "supported (as in the reference): point vid_path at a video file"
            )
        elif not isinstance(vid, str) or not vid:
            sample.load_error = f"{subject}/{qid}: entry has no 'vid_path'"
        elif Path(vid).suffix.lower() not in VIDEO_EXTENSIONS:
            sample.load_error = (
                f"{subject}/{qid}: '{vid}' is not a supported video type ({', '.join(VIDEO_EXTENSIONS)})"
            )
        sample.choices = choices
        if sample.load_error is None:
            sample.prompt = build_prompt(question, choices)
            sample.videos = [self.resolve_video(vid)]
        return sample

    def score(self, sample: Sample, output: str) -> Scored:
        letter = extract_choice(output, sample.choices or {})
        return Scored(
            score=1.0 if letter == sample.gold else 0.0,
            prediction=letter,
            extra={"reference_rule_choice": reference_choice(output)},
        )

    def aggregate(self, records: List[SampleRecord]) -> List[ResultRow]:
        subjects = list(dict.fromkeys(r.subject for r in records))
        rows = subject_rows(records, subjects, self.name)
        acc = {r.tasks: r.value for r in rows[1:] if r.value is not None}
        groups = group_scores(acc)
        final = weighted_score(acc)
        if final is not None:
            for g in GROUPS:
                rows.append(ResultRow(tasks=g, total=0, passed=0, value=groups[g], metric="weighted_acc"))
            rows.append(ResultRow(tasks="weighted_score", total=0, passed=0, value=final, metric="weighted_acc"))
        return rows
