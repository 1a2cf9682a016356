"""Both tasks end to end on the tiny demo model, through scripts/mm_run.sh as a user runs them."""

import json
from pathlib import Path

import pytest
from conftest import read_csv, read_debug, run_mm

from modeltest.metrics import extract_choice, vqa_accuracy

pytestmark = pytest.mark.subprocess

DEBUG_KEYS = {
    "id",
    "subject",
    "input",
    "output",
    "prediction",
    "gold",
    "score",
    "error",
    "e2e_time",
    "queue_time",
    "preprocess_time",
    "input_tokens",
    "output_tokens",
    "prefill_time",
    "key",
    "schema",
}


def test_textvqa_end_to_end(demo, tmp_path):
    out = tmp_path / "out"
    proc = run_mm(
        "textvqa",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.textvqa_jsonl}",
            f"output_dir={out}",
            "batch_size=3",
            "max_output_length=6",
        ],
    )
    assert "textvqa" in proc.stdout and "result csv" in proc.stdout
    rows, csv_path = read_csv(out, "textvqa")
    assert csv_path.name == "textvqa_qwen2_vl_fp32_batch3_tp1_result.csv"
    assert list(rows[0])[:6] == ["Tasks", "N-Shot", "Total", "Pass", "Metric", "Value"]
    records = read_debug(out, "textvqa")
    assert len(records) == 8 and all(DEBUG_KEYS <= set(r) for r in records)
    for r in records:
        assert r["error"] is None and r["input"]["images"][0].endswith(".jpg") and r["e2e_time"] > 0
        assert len(r["gold"]) == 10 and r["output_tokens"] <= 6
        assert r["score"] == pytest.approx(vqa_accuracy(r["output"], r["gold"]))
    overall = rows[0]
    assert overall["Tasks"] == "textvqa" and int(overall["Total"]) == 8 and overall["Errors"] == "0"
    assert float(overall["Value"]) == pytest.approx(sum(r["score"] for r in records) / 8, abs=1e-6)
    saved = json.loads(csv_path.with_name(csv_path.name.replace("_result.csv", "_config.json")).read_text())
    assert saved["run"]["batch_size"] == 3 and saved["model"]["data_type"] == "fp32"
    assert {"torch", "transformers", "qwen-vl-utils"} <= set(saved["versions"])


def test_videobench_end_to_end(demo, tmp_path):
    out = tmp_path / "out"
    run_mm(
        "videobench",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.videobench_qa}",
            "task.subject_mapping=null",
            f"output_dir={out}",
            "batch_size=4",
            "max_output_length=4",
        ],
    )
    rows, _ = read_csv(out, "videobench")
    records = read_debug(out, "videobench")
    assert len(records) == 11 and all(DEBUG_KEYS <= set(r) for r in records)
    for r in records:
        assert r["error"] is None and r["input"]["videos"][0].endswith(".mp4")
        assert r["prediction"] == extract_choice(r["output"], r["choices"])
        assert r["score"] == (1.0 if r["prediction"] == r["gold"] else 0.0)
    names = [row["Tasks"] for row in rows]
    assert names[0] == "videobench"
    assert names[1:7] == ["ActivityNet", "Driving-exam", "MOT", "MSVD", "NBA", "SQA3D"]
    # All three groups are represented in the demo, so the weighted score is reported.
    assert names[7:] == ["Video-Exclusive", "Prior-Knowledge", "Decision-making", "weighted_score"]
    assert int(rows[0]["Total"]) == 11
    assert int(rows[0]["Unparsed"]) == sum(1 for r in records if r["prediction"] is None)
    for row in rows[1:7]:
        recs = [r for r in records if r["subject"] == row["Tasks"]]
        assert int(row["Total"]) == len(recs)
        assert float(row["Value"]) == pytest.approx(sum(r["score"] for r in recs) / len(recs), abs=1e-6)


def test_bad_media_in_the_middle_is_recorded_and_the_run_goes_on(demo, data_copy, tmp_path):
    # TextVQA: line 3's image is missing, line 5's image is not an image, line 7's is empty.
    jsonl = data_copy / "textvqa" / "textvqa_val.jsonl"
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    lines[2]["image"] = "images/does_not_exist.jpg"
    (data_copy / "textvqa" / "images" / "demo_004.jpg").write_bytes(b"this is not a jpeg")
    (data_copy / "textvqa" / "images" / "demo_006.jpg").write_bytes(b"")
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "tv"
    run_mm(
        "textvqa",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={jsonl}",
            f"output_dir={out}",
            "batch_size=2",
            "max_output_length=3",
        ],
    )
    records = {r["id"]: r for r in read_debug(out, "textvqa")}
    assert len(records) == 8
    assert "image not found" in records["34602"]["error"] and "does_not_exist.jpg" in records["34602"]["error"]
    assert "demo_004.jpg" in records["34604"]["error"]
    assert "image is empty (0 bytes)" in records["34606"]["error"]
    assert records["34602"]["score"] == 0.0 and records["34604"]["score"] == 0.0
    assert sum(1 for r in records.values() if r["error"] is None and r["output"] is not None) == 5
    rows, _ = read_csv(out, "textvqa")
    assert rows[0]["Errors"] == "3" and rows[0]["Total"] == "8"

    # VideoBench: a corrupt mp4, a zero-length mp4, and a "video" given as a list of frames.
    qa = data_copy / "videobench" / "Eval_QA"
    videos = data_copy / "videobench" / "Eval_video"
    (videos / "ActivityNet" / "v_demo_blue.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    (videos / "MSVD" / "msvd_yellow.mp4").write_bytes(b"")
    nba = json.loads((qa / "NBA_QA_new.json").read_text())
    nba["nba_red_1"]["vid_path"] = ["a.jpg", "b.jpg"]
    (qa / "NBA_QA_new.json").write_text(json.dumps(nba))
    # ... an unsupported container, and an entry whose choices are all null.
    sqa = json.loads((qa / "SQA3D_QA_new.json").read_text())
    sqa["sqa_blue_0"]["vid_path"] = "Eval_video/SQA3D/sqa_blue.mkv"
    sqa["sqa_green_1"]["choices"] = {"A": None, "B": None}
    (qa / "SQA3D_QA_new.json").write_text(json.dumps(sqa))
    out = tmp_path / "vb"
    proc = run_mm(
        "videobench",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={qa}",
            "task.subject_mapping=null",
            f"output_dir={out}",
            "batch_size=3",
            "max_output_length=3",
        ],
    )
    records = {r["id"]: r for r in read_debug(out, "videobench")}
    assert len(records) == 11
    # each failed sample is one line as it happens; the libraries' chatter stays out of sight
    for sid in ("v_demo_blue_1", "msvd_yellow_0", "nba_red_1", "sqa_blue_0", "sqa_green_1"):
        assert f"sample {sid}: {records[sid]['error']}" in proc.stdout
    assert "qwen-vl-utils using" not in proc.stderr and "moov atom" not in proc.stderr
    assert "corrupt or unreadable video" in records["v_demo_blue_1"]["error"]
    assert "empty" in records["msvd_yellow_0"]["error"]
    assert "list of frames" in records["nba_red_1"]["error"]
    assert "not a supported video type" in records["sqa_blue_0"]["error"]
    assert "no choices" in records["sqa_green_1"]["error"]
    assert sum(1 for r in records.values() if r["error"]) == 5
    rows, _ = read_csv(out, "videobench")
    assert rows[0]["Errors"] == "5"


def test_config_errors_are_one_line_without_traceback(demo, tmp_path):
    proc = run_mm(
        "textvqa", ["model.model_path=/no/such/weights", f"task.local_dataset_path={demo.textvqa_jsonl}"], check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "modeltest: error: model.model_path: '/no/such/weights' is not a folder; "
        "point it at the weights folder (holding config.json)"
    )
    proc = run_mm("textvq", [], check=False)
    assert proc.returncode == 2 and "available: textvqa, videobench" in proc.stderr


def test_a_tensor_parallel_size_the_model_cannot_use(demo, tmp_path):
    proc = run_mm(
        "textvqa",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.textvqa_jsonl}",
            f"output_dir={tmp_path}",
            "tp=3",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "modeltest: error: tensor parallel size 3 cannot split 2 KV heads (4 query heads): "
        "one of them must divide the other; use a world size that divides or is a "
        "multiple of 2"
    )


def test_corrupt_weights_are_one_line_naming_the_file(demo, tmp_path):
    """A truncated model.safetensors: both backends (mm_run.sh) and run_pa.sh say which file, in
    one line, with no traceback."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    broken = tmp_path / "weights"
    shutil.copytree(demo.model, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    for backend in ("engine", "hf"):
        proc = run_mm(
            "textvqa",
            [
                f"model.model_path={broken}",
                f"task.local_dataset_path={demo.textvqa_jsonl}",
                f"output_dir={tmp_path / backend}",
                f"model.backend={backend}",
            ],
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert (
            err[0].startswith(f"modeltest: error: {weights}: not a readable safetensors file")
            and "truncated or corrupt" in err[0]
        )
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "run_pa.sh"), "--model_path", str(broken)],
        capture_output=True,
        text=True,
        env=dict(__import__("os").environ, MODELTEST_PYTHON=sys.executable),
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"run_pa: error: {weights}: not a readable safetensors file")


def test_loading_says_what_and_where(demo, tmp_path):
    proc = run_mm(
        "textvqa",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.textvqa_jsonl}",
            f"output_dir={tmp_path}",
            "limit=1",
            "max_output_length=2",
        ],
    )
    assert f"loading {demo.model} (engine backend, fp32) on cpu ..." in proc.stdout
    assert "loaded in" in proc.stdout
    # Loading is reported on its own: the run's time and speed are its evaluation only.
    summary = json.loads(next((tmp_path / "results").rglob("*_summary.json")).read_text())
    assert summary["load_s"] > 0 and summary["elapsed_s"] > 0
    loaded = float(proc.stdout.split("loaded in ")[1].split("s")[0])
    assert abs(summary["load_s"] - loaded) < 0.15
    assert f"(+ {summary['load_s']:.1f}s loading the model)" in proc.stdout


def test_an_empty_dataset_is_one_line_and_a_failure(demo, tmp_path):
    empty = tmp_path / "textvqa_val.jsonl"
    empty.write_text("")
    (tmp_path / "textvqa_val_annotations.json").write_text('{"annotations": []}')
    proc = run_mm(
        "textvqa",
        [f"model.model_path={demo.model}", f"task.local_dataset_path={empty}", f"output_dir={tmp_path / 'out'}"],
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"modeltest: error: task.local_dataset_path: '{empty}' has no textvqa questions "
        "(an empty file, or every subject empty); nothing to evaluate"
    )


def test_e2e_time_is_the_requests_own_time_and_queue_time_is_separate(demo, tmp_path):
    """batch_size=1 keeps a second sample waiting behind the running one: its waiting is
    queue_time, not e2e_time, so the e2e times add up to no more than the run's wall time."""
    out = tmp_path / "out"
    run_mm(
        "textvqa",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.textvqa_jsonl}",
            f"output_dir={out}",
            "batch_size=1",
            "max_output_length=6",
        ],
    )
    records = read_debug(out, "textvqa")
    summary = json.loads(next((out / "results").rglob("*_summary.json")).read_text())
    assert all(r["queue_time"] >= 0 and r["e2e_time"] > 0 and r["schema"] == 2 for r in records)
    assert sum(r["e2e_time"] for r in records) <= summary["elapsed_s"]
    assert sum(r["queue_time"] for r in records) > 0.3 * sum(r["e2e_time"] for r in records)
    assert all(r["prefill_time"] <= r["e2e_time"] for r in records)


def test_unwritable_output_dir(demo, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_mm(
        "textvqa",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.textvqa_jsonl}",
            f"output_dir={blocker}/out",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "output_dir: cannot write to" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_command_builds_and_runs_both_tasks(tmp_path):
    """`modeltest demo` (what scripts/demo.sh runs) end to end, into a temporary folder."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeltest",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mm_run.sh textvqa qwen2_vl" in proc.stdout and "mm_run.sh videobench qwen2_vl" in proc.stdout
    # The planted answers score as planned: known in advance, not 0 (demo/planted.py).
    from modeltest.demo.planted import EXPECTED_TEXTVQA_SCORE, PLANTED_ALL, PLANTED_ONE

    textvqa = read_csv(out, "textvqa")[0][0]
    assert textvqa["Total"] == "8" and float(textvqa["Value"]) == pytest.approx(EXPECTED_TEXTVQA_SCORE)
    scores = {r["id"]: r["score"] for r in read_debug(out, "textvqa")}
    assert {i for i, v in scores.items() if v == 1.0} == set(PLANTED_ALL)
    assert all(scores[i] == pytest.approx(0.3) for i in PLANTED_ONE)
    assert f"{EXPECTED_TEXTVQA_SCORE:.4f} on a CPU run" in proc.stdout
    # VideoBench: the planted questions read as their planted letter, every other question misses,
    # and subjects, groups and the weighted score come out as computed by hand (planted.py).
    from modeltest.demo.planted import EXPECTED_VIDEOBENCH, PLANTED_VIDEOBENCH

    rows = {r["Tasks"]: r for r in read_csv(out, "videobench")[0]}
    assert rows["videobench"]["Total"] == "11" and rows["videobench"]["Pass"] == "3"
    for name, value in EXPECTED_VIDEOBENCH.items():
        assert float(rows[name]["Value"]) == pytest.approx(value, abs=1e-6), name  # the CSV keeps 6 digits
    right = [r for r in read_debug(out, "videobench") if r["score"] == 1.0]
    assert sorted(r["subject"] for r in right) == sorted(PLANTED_VIDEOBENCH)
    assert all(r["prediction"] == r["gold"] for r in right)
    assert f"weighted score {EXPECTED_VIDEOBENCH['weighted_score']:.4f}" in proc.stdout
    for task in ("textvqa", "videobench"):  # and says where each run's report is
        assert f"report: {out / 'report' / task / 'report.html'}" in proc.stdout
        assert (out / "report" / task / "report.csv").is_file()
    # and ends with the next commands to try, each one that works as printed
    assert "Next, try:" in proc.stdout and f"report {out}" in proc.stdout
    assert f"serve --model_path {tmp_path / 'demo' / 'Qwen2-VL-tiny-random'}" in proc.stdout
    exe = Path(sys.executable).parent / "modeltest"
    if exe.is_file():  # the console script the printed commands name
        assert subprocess.run([str(exe), "--version"], capture_output=True, text=True).returncode == 0


def test_a_crashed_rank_is_one_line_and_the_others_are_stopped(demo, tmp_path):
    """A rank that dies (here rank 1 aborts as it starts: a test-only sitecustomize on the
    PYTHONPATH, nothing in modeltest) ends the run with one line naming it and how it died —
    no traceback from the launcher."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n    os.abort()\n")
    env = dict(os.environ, MODELTEST_PYTHON=sys.executable, PYTHONPATH=f"{hook}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "mm_run.sh"),
            "textvqa",
            "qwen2_vl",
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.textvqa_jsonl}",
            f"output_dir={tmp_path / 'out'}",
            "tp=2",
            "prep_workers=0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("modeltest: error: ") and "rank 1 was killed by SIGABRT" in last, last
    assert "run the same command again to resume" in last
