"""Planted answers, so the demo's TextVQA score is not 0 and is known in advance.

Random weights answer nonsense, so every human answer misses and every score is 0: a run then
shows neither that scoring works nor what a score looks like. After building the datasets, the
demo runs the tiny model once through the harness itself (CPU, the model config's defaults —
what `modeltest demo` runs) and writes its own normalised answers into the annotations of a few
questions: all ten human answers for PLANTED_ALL (VQA accuracy 1 each), one of ten for
PLANTED_ONE (0.3: the match counts in 9 of the 10 leave-one-out subsets, min(1/3, 1) each). The
demo's TextVQA score is then EXPECTED_TEXTVQA_SCORE on the machine that built it.

VideoBench cannot be planted the same way: a question's options are part of its prompt, so an
option set to the model's answer changes the answer. But a random model's answers fall into a few
attractors (a token repeated to the output limit), so the demo adds such an answer as a new option
to differently worded copies of a question and keeps a copy whose answer is then that option word
for word — which the extractor reads as the option's letter (metrics/choice.py) — with that
letter as its answer key (plant_videobench). The demo's VideoBench scores are then
EXPECTED_VIDEOBENCH: one of the two questions of MSVD, NBA and SQA3D right, every other question
wrong, through the groups' weights (MOT and Driving-exam count half).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, Tuple

PLANTED_ALL = ("34606", "34607")
PLANTED_ONE = ("34605",)
EXPECTED_TEXTVQA_SCORE = (len(PLANTED_ALL) * 1.0 + len(PLANTED_ONE) * 0.3) / 8

# Subjects (two questions each) where one question's answer key becomes the model's own option.
PLANTED_VIDEOBENCH = ("MSVD", "NBA", "SQA3D")
# By hand, from the groups' weights (README "Metrics"): subject accuracies ActivityNet 0, MSVD 1/2,
# MOT 0 (weight 1/2) -> Video-Exclusive (0 + 1/2 + 0) / 2.5 = 0.2; Prior-Knowledge: NBA 1/2 = 0.5;
# Decision-making: Driving-exam 0 (weight 1/2), SQA3D 1/2 -> (0 + 1/2) / 1.5 = 1/3; the weighted
# score is their mean.
EXPECTED_VIDEOBENCH = {
    "MSVD": 0.5,
    "NBA": 0.5,
    "SQA3D": 0.5,
    "Video-Exclusive": 0.2,
    "Prior-Knowledge": 0.5,
    "Decision-making": 1 / 3,
    "weighted_score": (0.2 + 0.5 + 1 / 3) / 3,
}
LAST_OPTION = "F"  # VideoBench prompts take 2 to 6 options


def demo_records(task: str, model: Path, dataset: Path, extra=()) -> list:
    """The records of a harness run of `task` on `dataset`, as `modeltest demo` runs it (CPU, the
    model config's defaults)."""
    from ..config import load_config
    from ..runner import Evaluator
    from ..tasks import TASKS

    with tempfile.TemporaryDirectory(prefix="modeltest-demo-plant-") as out:
        overrides = [f"model.model_path={model}", f"task.local_dataset_path={dataset}", f"output_dir={out}"]
        overrides += ["device=cpu", "prep_workers=0", "media_cache=off", *extra]
        return Evaluator(load_config(TASKS, task, "qwen2_vl", overrides), show_progress=False).run().records


def demo_answers(model: Path, jsonl: Path) -> Dict[str, str]:
    """question id -> the tiny model's normalised TextVQA answer, as `modeltest demo` computes it."""
    return {r.id: r.extra["normalized"] for r in demo_records("textvqa", model, jsonl) if r.error is None}


def _periodic(text: str, longest_unit: int = 24) -> bool:
    """Whether text is one short unit repeated (an attractor: "绿城绿城绿城…")."""
    return any(
        len(text) >= 3 * n and text == (text[:n] * (len(text) // n + 1))[: len(text)]
        for n in range(1, longest_unit + 1)
    )


def plant_videobench(model: Path, qa_dir: Path) -> Dict[str, str]:
    """Plant one question of each PLANTED_VIDEOBENCH subject (module docstring): returns question
    id -> its planted letter, having rewritten that question (wording, options) and its answer key.

    1. The dataset as built, through the harness: the answers. A random model's answers fall
       into attractors, some of them one unit repeated to the output limit ("绿城绿城…").
    2. Candidates: each question of a planted subject, its wording with each of SUFFIXES, and
       one repeated answer of step 1 added as its next option. One harness run answers them all;
       a candidate whose answer repeats that option word for word reads as its letter.
    3. The first such candidate of each subject replaces its question; its letter is the key.
    Every other question keeps step 1's answer, which must name no option (checked), so the
    scores are EXPECTED_VIDEOBENCH. The runs use a larger batch: the engine's answers do not
    depend on it (tests/test_batch_invariance.py), so `modeltest demo` gets these same answers.
    Raises RuntimeError when a subject finds no candidate."""
    fast = ["task.subject_mapping=null", "batch_size=16"]
    first = {r.id: r for r in demo_records("videobench", model, qa_dir, fast)}
    hit = [r.id for r in first.values() if r.error is not None or r.prediction is not None]
    if hit:
        raise RuntimeError(
            f"planting VideoBench: {hit} already name an option or failed; the expected scores would not hold"
        )
    repeated = sorted({r.output.strip() for r in first.values() if _periodic(r.output.strip())}, key=len)[:2]
    if not repeated:
        raise RuntimeError("planting VideoBench: no answer of the demo model repeats one unit")
    entries = {s: json.loads((qa_dir / f"{s}_QA_new.json").read_text(encoding="utf-8")) for s in PLANTED_VIDEOBENCH}
    planted: Dict[str, Tuple[str, str]] = {}  # question id -> (subject, its planted letter)
    with tempfile.TemporaryDirectory(prefix="modeltest-demo-plant-vb-") as tmp:
        folder = Path(tmp) / "Eval_QA"
        (folder / "answer").mkdir(parents=True)
        candidates: Dict[str, tuple] = {}  # candidate id -> (subject, question id, entry)
        key: Dict[str, Dict[str, str]] = {}
        for subject, questions in entries.items():
            out = {}
            for qid, entry in questions.items():
                choices = {k: v for k, v in entry["choices"].items() if v is not None}
                letter = chr(ord(max(entry["choices"])) + 1)
                if letter > LAST_OPTION:
                    continue
                for i, suffix in enumerate(SUFFIXES):
                    for j, answer in enumerate(repeated):
                        cid = f"{qid}__{i}_{j}"
                        candidate = {
                            **entry,
                            "question": entry["question"] + suffix,
                            "choices": {**choices, letter: answer},
                        }
                        out[cid], candidates[cid] = candidate, (subject, qid, candidate)
            (folder / f"{subject}_QA_new.json").write_text(json.dumps(out), encoding="utf-8")
            key[subject] = {cid: "A" for cid in out}  # any letter: only the predictions are read
        (folder / "answer" / "ANSWER.json").write_text(json.dumps(key), encoding="utf-8")
        answered = demo_records("videobench", model, folder, [*fast, f"task.video_root={qa_dir.parent}"])
        for r in sorted(answered, key=lambda r: r.id):
            subject, qid, candidate = candidates[r.id]
            if r.error is None and r.prediction is not None and subject not in {s for s, _ in planted.values()}:
                entries[subject][qid] = candidate
                planted[qid] = (subject, r.prediction)
    missing = set(PLANTED_VIDEOBENCH) - {s for s, _ in planted.values()}
    if missing:
        raise RuntimeError(f"planting VideoBench: no candidate of {sorted(missing)} repeated its added option")
    for subject, questions in entries.items():
        (qa_dir / f"{subject}_QA_new.json").write_text(json.dumps(questions, indent=1), encoding="utf-8")
    key_path = qa_dir / "answer" / "ANSWER.json"
    answer_key = json.loads(key_path.read_text(encoding="utf-8"))
    for qid, (subject, letter) in planted.items():
        old = answer_key[subject][qid]
        answer_key[subject][qid] = {**old, "answer": letter} if isinstance(old, dict) else letter
    key_path.write_text(json.dumps(answer_key, indent=1), encoding="utf-8")
    return {qid: letter for qid, (_, letter) in planted.items()}


# Wordings tried per question (step 2 of plant_videobench).
SUFFIXES = ("", " Answer.", " Look closely.", " Think.", " Be brief.", " Watch it.", " Tell me.", " Again.")


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
