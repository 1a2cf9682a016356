"""Both harness tasks give the same outputs and scores on the engine backend as on hf."""
import pytest

from modeltest.config import load_config
from modeltest.runner import Evaluator


def run(demo, tmp_path, task, backend):
    data = demo.textvqa_jsonl if task == "textvqa" else demo.videobench_qa
    overrides = [f"model.model_path={demo.model}", f"task.local_dataset_path={data}", "batch_size=3",
                 f"output_dir={tmp_path / backend}", "max_output_length=6", f"model.backend={backend}"]
    if task == "videobench":
        overrides.append("task.subject_mapping=null")
    result = Evaluator(load_config(task, "qwen2_vl", overrides), show_progress=False).run()
    return result


@pytest.mark.parametrize("task", ["textvqa", "videobench"])
def test_engine_and_hf_agree(demo, tmp_path, task):
    hf = run(demo, tmp_path, task, "hf")
    engine = run(demo, tmp_path, task, "engine")
    assert [(r["id"], r["output"], r["score"]) for r in engine.records] == \
        [(r["id"], r["output"], r["score"]) for r in hf.records]
    assert [(r.tasks, r.total, r.passed, r.value) for r in engine.rows] == \
        [(r.tasks, r.total, r.passed, r.value) for r in hf.rows]
    assert all(r["prefill_time"] is not None for r in engine.records)
    assert engine.paths.result_csv.read_text() == hf.paths.result_csv.read_text()
