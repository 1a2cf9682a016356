"""Both harness tasks give the same outputs and scores on the engine backend as on hf."""

import json

import pytest

from modeltest.config import load_config
from modeltest.runner import Evaluator
from modeltest.tasks import TASKS

pytestmark = pytest.mark.subprocess


def run(demo, tmp_path, task, backend):
    data = demo.textvqa_jsonl if task == "textvqa" else demo.videobench_qa
    overrides = [
        f"model.model_path={demo.model}",
        f"task.local_dataset_path={data}",
        "batch_size=3",
        f"output_dir={tmp_path}",
        "max_output_length=6",
        f"model.backend={backend}",
    ]
    if task == "videobench":
        overrides.append("task.subject_mapping=null")
    result = Evaluator(load_config(TASKS, task, "qwen2_vl", overrides), show_progress=False).run()
    return result


@pytest.mark.parametrize("task", ["textvqa", "videobench"])
def test_engine_and_hf_agree(demo, tmp_path, task):
    hf = run(demo, tmp_path, task, "hf")
    engine = run(demo, tmp_path, task, "engine")
    assert [(r.id, r.output, r.score) for r in engine.records] == [(r.id, r.output, r.score) for r in hf.records]
    assert [(r.tasks, r.total, r.passed, r.value) for r in engine.rows] == [
        (r.tasks, r.total, r.passed, r.value) for r in hf.rows
    ]
    assert all(r.prefill_time is not None for r in engine.records)
    assert engine.paths.result_csv.read_text() == hf.paths.result_csv.read_text()
    # One output_dir for both: each backend has its own files and records, and neither reused
    # the other's samples.
    assert hf.paths.result_csv.name == f"{task}_qwen2_vl_fp32_hf_batch3_tp1_result.csv"
    assert engine.paths.result_csv.name == f"{task}_qwen2_vl_fp32_batch3_tp1_result.csv"
    assert hf.paths.records_dir != engine.paths.records_dir and hf.paths.result_csv.is_file()
    for name, result in (("hf", hf), ("engine", engine)):
        saved = json.loads(result.paths.summary_json.read_text())
        assert saved["backend"] == name and saved["computed"] == len(result.records)


def test_tensor_parallel_harness_run_matches_single_process(demo, tmp_path):
    """bash scripts/mm_run.sh ... tp=2 (two gloo processes, streaming continuous batching)."""
    from conftest import read_csv, read_debug, run_mm

    common = [
        f"model.model_path={demo.model}",
        f"task.local_dataset_path={demo.videobench_qa}",
        "task.subject_mapping=null",
        "batch_size=3",
        "max_output_length=6",
    ]
    run_mm("videobench", common + [f"output_dir={tmp_path / 'tp1'}"])
    run_mm("videobench", common + [f"output_dir={tmp_path / 'tp2'}", "tp=2"])
    one, two = read_csv(tmp_path / "tp1", "videobench"), read_csv(tmp_path / "tp2", "videobench")
    assert two[1].name.endswith("_tp2_result.csv") and one[0] == two[0]
    assert [(r["id"], r["output"]) for r in read_debug(tmp_path / "tp2", "videobench")] == [
        (r["id"], r["output"]) for r in read_debug(tmp_path / "tp1", "videobench")
    ]
