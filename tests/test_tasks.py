"""Dataset loading and prompts for TextVQA and VideoBench, on the demo-format files."""

import json

import pytest

from modeltest.config.schema import ModelConfig
from modeltest.errors import UserError
from modeltest.tasks.textvqa import TextVQATask, TextVQATaskConfig
from modeltest.tasks.videobench import VideoBenchTask, VideoBenchTaskConfig, build_prompt


def textvqa(path, **kw):
    return TextVQATask(TextVQATaskConfig(local_dataset_path=str(path), **kw), ModelConfig())


def videobench(path, **kw):
    return VideoBenchTask(VideoBenchTaskConfig(local_dataset_path=str(path), **kw), ModelConfig())


def test_textvqa_join_prompt_and_relative_paths(data_copy):
    jsonl = data_copy / "textvqa" / "textvqa_val.jsonl"
    samples = textvqa(jsonl).load_samples()
    assert len(samples) == 8
    s = samples[0]
    assert s.id == "34600" and len(s.gold) == 10 and s.gold[0] == "stop"
    assert s.prompt == "what does the sign say? Answer the question using a single word or phrase."
    assert s.images == [str(data_copy / "textvqa" / "images" / "demo_000.jpg")]
    assert textvqa(jsonl.parent).load_samples()[0].id == "34600"  # a folder with one jsonl works too
    assert len(textvqa(jsonl).load_samples(limit=3)) == 3


def test_textvqa_malformed_line_names_file_and_line(data_copy):
    jsonl = data_copy / "textvqa" / "textvqa_val.jsonl"
    lines = jsonl.read_text().splitlines()
    lines[2] = lines[2][:-5]
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"textvqa_val.jsonl:3: not valid JSON"):
        textvqa(jsonl).load_samples()


def test_textvqa_question_without_annotation(data_copy):
    jsonl = data_copy / "textvqa" / "textvqa_val.jsonl"
    with open(jsonl, "a") as f:
        f.write(json.dumps({"image": "images/demo_000.jpg", "question": "q?", "question_id": 999}) + "\n")
    with pytest.raises(
        UserError,
        match=r"textvqa_val.jsonl:9: question_id 999 has no entry in "
        r"textvqa_val_annotations.json",
    ):
        textvqa(jsonl).load_samples()


def test_textvqa_missing_annotations_file(data_copy):
    (data_copy / "textvqa" / "textvqa_val_annotations.json").unlink()
    with pytest.raises(UserError, match=r"annotations file not found"):
        textvqa(data_copy / "textvqa" / "textvqa_val.jsonl").load_samples()


def test_textvqa_missing_key(data_copy):
    jsonl = data_copy / "textvqa" / "textvqa_val.jsonl"
    jsonl.write_text(json.dumps({"image": "x.jpg", "question_id": 1}) + "\n")
    with pytest.raises(UserError, match=r":1: missing key\(s\) question"):
        textvqa(jsonl).load_samples()


EXPECTED_PROMPTS = {
    2: "Q? A.yes B.no \n Among the two options A, B above, the one closest to the correct answer is: ",
    3: "Q? A.x B.y C.z \n Among the three options A, B, C above, the one closest to the correct answer is: ",
    4: "Q? A.x B.y C.z D.w \n Among the four options A, B, C, D above, the one closest to the correct answer is:",
    5: "Q? A.1 B.2 C.3 D.4 E.5 \n Among the five options A, B, C, D, E above, the one closest to the correct "
    "answer is: ",
    6: "Q?Choices: A.1 B.2 C.3 D.4 E.5 F.6 \n Among the six options A, B, C, D, E, F above, the one closest to "
    "the correct answer is:",
}
INSTR = (
    " Please respond with only the corresponding options and do not provide any explanations or additional "
    "information. ASSISTANT:"
)


@pytest.mark.parametrize(
    "n,choices",
    [
        (2, {"A": "yes", "B": "no"}),
        (3, {"A": "x", "B": "y", "C": "z"}),
        (4, {"A": "x", "B": "y", "C": "z", "D": "w"}),
        (5, {k: str(i + 1) for i, k in enumerate("ABCDE")}),
        (6, {k: str(i + 1) for i, k in enumerate("ABCDEF")}),
    ],
)
def test_videobench_reference_prompt(n, choices):
    assert build_prompt("Q?", choices) == EXPECTED_PROMPTS[n] + INSTR


def test_videobench_loading(data_copy):
    qa = data_copy / "videobench" / "Eval_QA"
    samples = videobench(qa).load_samples()
    assert len(samples) == 11 and all(s.load_error is None for s in samples)
    by_id = {s.id: s for s in samples}
    # null choice dropped: three options left, prompt says three.
    s = by_id["msvd_red_1"]
    assert s.choices == {"A": "circle", "B": "square", "C": "triangle"} and "Among the three options" in s.prompt
    # vid_path "Eval_video/..." resolves against the Eval_QA folder's parent.
    assert s.videos == [str(data_copy / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4")]
    # Both ANSWER.json forms: MSVD uses bare letters, ActivityNet {"answer": ...}.
    assert s.gold == "B" and by_id["v_demo_red_0"].gold == "A"
    assert s.video_options["fps"] == 0.5


def test_videobench_subject_selection_and_limit(data_copy):
    qa = data_copy / "videobench" / "Eval_QA"
    samples = videobench(qa, subject_mapping={"MSVD": {"name": "MSVD"}, "NBA": None}).load_samples(limit=1)
    assert [(s.subject, s.id) for s in samples] == [("MSVD", "msvd_yellow_0"), ("NBA", "nba_green_0")]
    with pytest.raises(
        UserError,
        match=r"subject\(s\) TVQA have no \{Subject\}_QA_new.json in .* \(there: ActivityNet, "
        r"Driving-exam.*\); run every subject on disk with task.subject_mapping=null",
    ):
        videobench(qa, subject_mapping={"TVQA": {"name": "TVQA"}}).load_samples()


def test_videobench_video_root(data_copy, tmp_path):
    qa = data_copy / "videobench" / "Eval_QA"
    s = videobench(qa, video_root=str(tmp_path / "elsewhere")).load_samples()[0]
    assert s.videos[0].startswith(str(tmp_path / "elsewhere"))


def test_videobench_bad_entries_become_sample_errors(data_copy):
    qa = data_copy / "videobench" / "Eval_QA"
    path = qa / "MSVD_QA_new.json"
    entries = json.loads(path.read_text())
    entries["msvd_yellow_0"]["choices"] = {"A": None, "B": None}
    entries["msvd_red_1"]["vid_path"] = ["f1.jpg", "f2.jpg"]
    path.write_text(json.dumps(entries))
    by_id = {s.id: s for s in videobench(qa).load_samples()}
    assert "no choices" in by_id["msvd_yellow_0"].load_error
    assert "list of frames" in by_id["msvd_red_1"].load_error and "not supported" in by_id["msvd_red_1"].load_error


def test_videobench_missing_answer(data_copy):
    qa = data_copy / "videobench" / "Eval_QA"
    key_path = qa / "answer" / "ANSWER.json"
    key = json.loads(key_path.read_text())
    del key["NBA"]["nba_red_1"]
    key_path.write_text(json.dumps(key))
    with pytest.raises(UserError, match=r"subject 'NBA' has no answer for qid 'nba_red_1'"):
        videobench(qa).load_samples()


def test_videobench_scores_parsed_answers_and_weights_groups_by_value():
    """A hand-computed case through the task's own scoring and aggregation: answers the extractor
    reads (a letter, a cued letter, an option's text, a sentence naming a letter), wrong ones, an
    unparsed one and an error; MOT and Driving-exam count half in their groups.

    subject accuracies: ActivityNet 1/2, MOT 1, MSVD 0, NBA 1, Driving-exam 1, SQA3D 0
    Video-Exclusive  = (0.5*1 + 1*0.5 + 0*1) / (1 + 0.5 + 1) = 0.4
    Prior-Knowledge  = 1
    Decision-making  = (1*0.5 + 0*1) / (0.5 + 1)           = 1/3
    weighted_score   = (0.4 + 1 + 1/3) / 3                  = 26/45
    """
    from modeltest.core import Sample, SampleRecord

    task = VideoBenchTask(VideoBenchTaskConfig(), ModelConfig())
    abcd = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
    cases = [  # subject, gold, output (None: the sample failed)
        ("ActivityNet", "B", "B"),
        ("ActivityNet", "C", "The answer is (A)."),  # parsed, wrong
        ("MOT", "D", "yellow"),  # an option's text
        ("MSVD", "A", "A dog is running"),  # "A" is the article: unparsed
        ("NBA", "C", "Answer: c"),
        ("NBA", "C", "I think C fits best."),
        ("Driving-exam", "D", "(D)"),
        ("SQA3D", "B", None),
        ("SQA3D", "B", "B or C"),  # two options named: unparsed
    ]
    records = []
    for i, (subject, gold, output) in enumerate(cases):
        sample = Sample(id=str(i), subject=subject, prompt="q", gold=gold, choices=abcd)
        record = SampleRecord(
            id=str(i),
            subject=subject,
            input={},
            output=output,
            error=None if output is not None else "corrupt or unreadable video: x.mp4",
        )
        records.append(task.score_record(sample, record))
    assert [r.prediction for r in records] == ["B", "A", "D", None, "C", "C", "D", None, None]
    assert [r.score for r in records] == [1, 0, 1, 0, 1, 1, 1, 0, 0]
    rows = {r.tasks: r for r in task.aggregate(records)}
    assert rows["videobench"].total == 9 and rows["videobench"].passed == 5
    assert (rows["videobench"].errors, rows["videobench"].unparsed) == (1, 2)
    expected = {"ActivityNet": 0.5, "MOT": 1.0, "MSVD": 0.0, "NBA": 1.0, "Driving-exam": 1.0, "SQA3D": 0.0}
    assert {s: rows[s].value for s in expected} == expected
    assert rows["Video-Exclusive"].value == pytest.approx(0.4)
    assert rows["Prior-Knowledge"].value == pytest.approx(1.0)
    assert rows["Decision-making"].value == pytest.approx(1 / 3)
    assert rows["weighted_score"].value == pytest.approx(26 / 45)
    assert all(rows[g].metric == "weighted_acc" for g in ("Video-Exclusive", "Prior-Knowledge", "Decision-making"))
