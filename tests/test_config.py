"""Config loading: overrides, validation messages, data_type resolution."""
import json
import shutil
from pathlib import Path

import pytest

from modeltest.config import load_config
from modeltest.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg_dir(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return tmp_path / "configs"


@pytest.fixture
def weights(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "torch_dtype": "bfloat16"}))
    return d


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "textvqa_val.jsonl"
    p.write_text("")
    return p


def load(cfg_dir, overrides, check_paths=True, task="textvqa"):
    return load_config(task, "qwen2_vl", overrides, config_dir=cfg_dir, check_paths=check_paths)


def test_overrides_and_defaults(cfg_dir, weights, data):
    cfg = load(cfg_dir, [f"model.model_path={weights}", f"task.local_dataset_path={data}", "batch_size=8",
                         "limit=50", "output_dir=/tmp/x", "model.mm_model.infer_params.max_output_length=12"])
    assert cfg.run.batch_size == 8 and cfg.run.limit == 50 and cfg.run.output_dir == "/tmp/x"
    assert cfg.model.mm_model.infer_params.max_output_length == 12
    assert cfg.model.data_type == "bf16"  # from config.json torch_dtype
    assert cfg.model.mm_model.prompt_suffix is None   # the task's own
    assert cfg.task.prompt_suffix == " Answer the question using a single word or phrase."


def test_unprefixed_unique_key(cfg_dir, weights, data):
    cfg = load(cfg_dir, [f"model.model_path={weights}", f"task.local_dataset_path={data}", "data_type=fp16",
                         "max_output_length=7"])
    assert cfg.model.data_type == "fp16"
    assert cfg.model.mm_model.infer_params.max_output_length == 7


def test_data_type_follows_config_json(cfg_dir, weights, data):
    (weights / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert load(cfg_dir, [f"model.model_path={weights}", f"task.local_dataset_path={data}"]).model.data_type == "fp16"


def test_unknown_key_in_file_names_file_key_and_closest(cfg_dir):
    path = cfg_dir / "model" / "qwen2_vl.yaml"
    path.write_text(path.read_text().replace("block_size:", "blok_size:"))
    with pytest.raises(UserError) as e:
        load(cfg_dir, [], check_paths=False)
    msg = str(e.value)
    assert str(path) in msg and "'blok_size'" in msg and "did you mean 'block_size'" in msg


def test_unknown_nested_key_in_file(cfg_dir):
    path = cfg_dir / "model" / "qwen2_vl.yaml"
    path.write_text(path.read_text().replace("prompt_suffix:", "prompt_sufix:"))
    with pytest.raises(UserError, match=r"mm_model.prompt_sufix'.*did you mean 'mm_model.prompt_suffix'"):
        load(cfg_dir, [], check_paths=False)


def test_unknown_override_suggests(cfg_dir):
    with pytest.raises(UserError, match=r"unknown key 'batch_sise'; did you mean 'batch_size'"):
        load(cfg_dir, ["batch_sise=2"], check_paths=False)
    with pytest.raises(UserError, match=r"did you mean 'model.model_path'"):
        load(cfg_dir, ["model.model_pth=/x"], check_paths=False)


def test_wrong_type_names_expected(cfg_dir):
    with pytest.raises(UserError, match=r"'batch_size' must be integer, got 'eight'"):
        load(cfg_dir, ["batch_size=eight"], check_paths=False)
    with pytest.raises(UserError, match=r"'block_size' must be integer"):
        load(cfg_dir, ["model.block_size=1.5"], check_paths=False)
    with pytest.raises(UserError, match=r"'use_chat_template' must be true/false"):
        load(cfg_dir, ["model.use_chat_template=maybe"], check_paths=False)


def test_wrong_dtype(cfg_dir, weights, data):
    with pytest.raises(UserError, match=r"model.data_type: 'int4' is not one of bf16, fp16, fp32"):
        load(cfg_dir, [f"model.model_path={weights}", f"task.local_dataset_path={data}", "data_type=int4"])
    (weights / "config.json").write_text(json.dumps({"torch_dtype": "float64"}))
    with pytest.raises(UserError, match=r"config.json: torch_dtype 'float64'"):
        load(cfg_dir, [f"model.model_path={weights}", f"task.local_dataset_path={data}"])


def test_missing_paths(cfg_dir, weights, data, tmp_path):
    with pytest.raises(UserError, match=r"'model_path' is not set"):
        load(cfg_dir, [f"task.local_dataset_path={data}"])
    with pytest.raises(UserError, match=r"model.model_path: '/nonexistent/w' is not a folder"):
        load(cfg_dir, ["model.model_path=/nonexistent/w", f"task.local_dataset_path={data}"])
    with pytest.raises(UserError, match=r"has no config.json"):
        load(cfg_dir, [f"model.model_path={tmp_path}", f"task.local_dataset_path={data}"])
    with pytest.raises(UserError, match=r"task.local_dataset_path: '/nope.jsonl' does not exist"):
        load(cfg_dir, [f"model.model_path={weights}", "task.local_dataset_path=/nope.jsonl"])


def test_unknown_task_and_model_list_available(cfg_dir):
    with pytest.raises(UserError, match=r"unknown task 'textvq'; available: textvqa, videobench"):
        load_config("textvq", "qwen2_vl", [], config_dir=cfg_dir)
    with pytest.raises(UserError, match=r"unknown model 'qwen3'; available: qwen2_vl"):
        load_config("textvqa", "qwen3", [], config_dir=cfg_dir)


def test_yaml_syntax_error_names_file_and_line(cfg_dir):
    path = cfg_dir / "task" / "videobench.yaml"
    path.write_text("task_name: videobench\nfps: [0.5\n")
    with pytest.raises(UserError, match=r"videobench.yaml line \d+: not valid YAML"):
        load(cfg_dir, [], check_paths=False, task="videobench")


def test_bad_values(cfg_dir):
    with pytest.raises(UserError, match=r"batch_size: must be at least 1"):
        load(cfg_dir, ["batch_size=0"], check_paths=False)
    with pytest.raises(UserError, match=r"model.backend: 'vllm' is not one of"):
        load(cfg_dir, ["model.backend=vllm"], check_paths=False)
    with pytest.raises(UserError, match=r"not key=value"):
        load(cfg_dir, ["batch_size"], check_paths=False)
    with pytest.raises(UserError, match=r"prep_workers: '-1' must be auto or a number of processes >= 0"):
        load(cfg_dir, ["prep_workers=-1"], check_paths=False)
    with pytest.raises(UserError, match=r"prep_timeout_s: must be positive, got 0"):
        load(cfg_dir, ["prep_timeout_s=0"], check_paths=False)
    assert load(cfg_dir, ["prep_workers=3", "fast_processor=false"], check_paths=False).run.prep_workers == 3


def test_subject_mapping_override_and_task_specific_keys(cfg_dir):
    cfg = load(cfg_dir, ["task.subject_mapping=null", "task.fps=1", "task.video_root=/v"], check_paths=False,
               task="videobench")
    assert cfg.task.subject_mapping is None and cfg.task.fps == 1.0 and cfg.task.video_root == "/v"
    with pytest.raises(UserError, match=r"unknown key 'task.fps'"):
        load(cfg_dir, ["task.fps=1"], check_paths=False, task="textvqa")
