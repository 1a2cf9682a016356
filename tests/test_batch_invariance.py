"""Outputs must not depend on the batch size (left padding, mixed lengths, mixed media sizes)."""

import pytest

from modeltest.backends.base import BackendSettings
from modeltest.backends.hf import HFBackend
from modeltest.config import load_config
from modeltest.runner import Evaluator
from modeltest.tasks import TASKS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backends(demo):
    """batch size -> an fp32 hf backend that runs batches of that size."""
    cfg = load_config(
        TASKS,
        "textvqa",
        "qwen2_vl",
        [f"model.model_path={demo.model}", f"task.local_dataset_path={demo.textvqa_jsonl}"],
    )
    cfg.model.data_type = "fp32"
    made = {}

    def get(batch_size):
        if batch_size not in made:
            made[batch_size] = HFBackend(BackendSettings(model=cfg.model, device="cpu", max_batch_size=batch_size))
        return made[batch_size]

    return get


def outputs(demo, backends, tmp_path, task, batch_size):
    backend = backends(batch_size)
    data = demo.textvqa_jsonl if task == "textvqa" else demo.videobench_qa
    overrides = [
        f"model.model_path={demo.model}",
        f"task.local_dataset_path={data}",
        f"batch_size={batch_size}",
        f"output_dir={tmp_path / f'{task}_{batch_size}'}",
        "max_output_length=8",
    ]
    if task == "videobench":
        overrides.append("task.subject_mapping=null")
    cfg = load_config(TASKS, task, "qwen2_vl", overrides)
    result = Evaluator(cfg, backend=backend, show_progress=False).run()
    return {r.id: (r.output, r.score) for r in result.records}, result.rows


@pytest.mark.parametrize("task,sizes", [("textvqa", (1, 3, 8)), ("videobench", (1, 4))])
def test_same_outputs_whatever_the_batch_size(demo, backends, tmp_path, task, sizes):
    base, base_rows = outputs(demo, backends, tmp_path, task, sizes[0])
    assert len({o for o, _ in base.values()}) > 1 or task == "videobench"  # outputs differ between prompts
    for bs in sizes[1:]:
        other, rows = outputs(demo, backends, tmp_path, task, bs)
        assert other == base, f"batch_size={bs} changed outputs"
        assert [(r.tasks, r.value) for r in rows] == [(r.tasks, r.value) for r in base_rows]


@pytest.mark.parametrize("task,sizes", [("textvqa", (1, 3, 8)), ("videobench", (1, 4))])
def test_engine_answers_do_not_depend_on_the_batch_size(demo, tmp_path, task, sizes):
    """The default backend, through the harness: continuous batching at batch sizes 1..8 gives
    every sample the answer (and token counts) it gets alone."""
    data = demo.textvqa_jsonl if task == "textvqa" else demo.videobench_qa

    def run(batch_size):
        overrides = [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={data}",
            f"batch_size={batch_size}",
            f"output_dir={tmp_path / f'engine_{task}_{batch_size}'}",
            "max_output_length=8",
            "prep_workers=0",
        ]
        if task == "videobench":
            overrides.append("task.subject_mapping=null")
        result = Evaluator(load_config(TASKS, task, "qwen2_vl", overrides), show_progress=False).run()
        return {r.id: (r.output, r.input_tokens, r.output_tokens) for r in result.records}

    base = run(sizes[0])
    assert len({o for o, _, _ in base.values()}) > 1  # outputs differ between prompts
    for bs in sizes[1:]:
        assert run(bs) == base, f"batch_size={bs} changed the engine's answers"
