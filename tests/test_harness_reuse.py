"""The harness with the engine's reuse on: several questions per clip (as VideoBench asks them),
answers equal to reuse off, what was saved reported — and a resumed run reuses too."""

import json

import pytest

from modeltest.config import load_config
from modeltest.outputs import read_json
from modeltest.runner import Evaluator
from modeltest.tasks import TASKS

pytestmark = pytest.mark.slow

EXTRA = {"msvd_red_2": ("Does the shape change colour?", "A"), "msvd_red_3": ("Is there one shape?", "B")}


@pytest.fixture
def clip_questions(data_copy):
    """The demo's VideoBench with three questions on one clip (two added on MSVD's red clip)."""
    qa = data_copy / "videobench" / "Eval_QA"
    questions = json.loads((qa / "MSVD_QA_new.json").read_text())
    answers = json.loads((qa / "answer" / "ANSWER.json").read_text())
    for qid, (question, answer) in EXTRA.items():
        questions[qid] = dict(questions["msvd_red_1"], question=question)
        answers["MSVD"][qid] = answer
    (qa / "MSVD_QA_new.json").write_text(json.dumps(questions))
    (qa / "answer" / "ANSWER.json").write_text(json.dumps(answers))
    return qa


def run(demo, qa, out, *extra):
    overrides = [
        f"model.model_path={demo.model}",
        f"task.local_dataset_path={qa}",
        "task.subject_mapping=null",
        "batch_size=4",
        "max_output_length=6",
        f"output_dir={out}",
        "model.block_size=16",  # the demo's prompts are short: small blocks give the cache something to share
        *extra,
    ]
    result = Evaluator(load_config(TASKS, "videobench", "qwen2_vl", overrides), show_progress=False).run()
    return {r.id: r.output for r in result.records}, read_json(result.paths.summary_json)


def test_questions_on_one_clip_reuse_it_with_the_answers_unchanged(demo, clip_questions, tmp_path):
    off, off_summary = run(
        demo, clip_questions, tmp_path / "off", "model.prefix_cache=false", "model.vision_cache=false"
    )
    on, summary = run(demo, clip_questions, tmp_path / "on")
    assert on == off and len(on) == 13
    # the clip's three questions: two find its blocks in the prefix cache (its ~150 video tokens each)
    assert summary["engine_reuse"]["cached_prompt_tokens"] > 2 * 128
    assert off_summary["engine_reuse"]["cached_prompt_tokens"] == off_summary["engine_reuse"]["vision_cache_hits"] == 0
    # the vision cache alone: two of the clip's three questions run no vision tower
    vision_only, vision_summary = run(demo, clip_questions, tmp_path / "vision", "model.prefix_cache=false")
    assert vision_only == off and vision_summary["engine_reuse"]["vision_cache_hits"] == 2

    # resumed: the first run computes one question per subject, the second the rest (the clip's
    # three among them) — and reuses across them
    part, _ = run(demo, clip_questions, tmp_path / "resumed", "limit=1")
    assert "msvd_red_1" not in part
    rest, resumed = run(demo, clip_questions, tmp_path / "resumed")
    assert rest == on and resumed["computed"] == 13 - len(part)
    assert resumed["engine_reuse"]["cached_prompt_tokens"] > 2 * 128
