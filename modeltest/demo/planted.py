"""Planted answers, so the demo's TextVQA score is not 0 and is known in advance.

Random weights answer nonsense, so every human answer misses and every score is 0: a run then
shows neither that scoring works nor what a score looks like. After building the datasets, the
demo runs the tiny model once through the harness itself (CPU, the model config's defaults —
what `modeltest demo` runs) and writes its own normalised answers into the annotations of a few
questions: all ten human answers for PLANTED_ALL (VQA accuracy 1 each), one of ten for
PLANTED_ONE (0.3: the match counts in 9 of the 10 leave-one-out subsets, min(1/3, 1) each). The
demo's TextVQA score is then EXPECTED_TEXTVQA_SCORE on the machine that built it.

VideoBench cannot be planted the same way: a question's options are part of its prompt, so an
option set to the model's answer changes the answer. Its scoring is proven on hand-made answers
(tests/test_tasks.py); the demo's VideoBench answers name no option.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict

PLANTED_ALL = ("34606", "34607")
PLANTED_ONE = ("34605",)
EXPECTED_TEXTVQA_SCORE = (len(PLANTED_ALL) * 1.0 + len(PLANTED_ONE) * 0.3) / 8


def demo_answers(model: Path, jsonl: Path) -> Dict[str, str]:
    """question id -> the tiny model's normalised TextVQA answer, as `modeltest demo` computes it."""
    from ..config import load_config
    from ..runner import Evaluator
    from ..tasks import TASKS

    with tempfile.TemporaryDirectory(prefix="modeltest-demo-plant-") as out:
        cfg = load_config(
            TASKS,
            "textvqa",
            "qwen2_vl",
            [
                f"model.model_path={model}",
                f"task.local_dataset_path={jsonl}",
                f"output_dir={out}",
                "device=cpu",
                "prep_workers=0",
                "media_cache=off",
            ],
        )
        records = Evaluator(cfg, show_progress=False).run().records
    return {r.id: r.extra["normalized"] for r in records if r.error is None}


def plant_textvqa(model: Path, jsonl: Path) -> None:
    answers = demo_answers(model, jsonl)
    path = jsonl.with_name(jsonl.stem + "_annotations.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    for entry in data["annotations"]:
        qid = str(entry["question_id"])
        if qid in PLANTED_ALL:
            planted = [answers[qid]] * 10
        elif qid in PLANTED_ONE:
            planted = [answers[qid]] + [a["answer"] for a in entry["answers"][1:]]
        else:
            continue
        entry["answers"] = [
            {"answer": a, "answer_id": k + 1, "answer_confidence": "yes"} for k, a in enumerate(planted)
        ]
        entry["planted"] = True  # the demo model's own answer, not a human's
    path.write_text(json.dumps(data), encoding="utf-8")
