"""Config loading: overrides, validation messages, data_type resolution."""

import json
import shutil
from pathlib import Path

import pytest

from modeltest.config import load_config
from modeltest.errors import UserError
from modeltest.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg_dir(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return tmp_path / "configs"


@pytest.fixture
def weights(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "qwen2_vl", "torch_dtype": "bfloat16", "vision_config": {}})
    )
    return d


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "textvqa_val.jsonl"
    p.write_text("")
    return p


def load(cfg_dir, overrides, check_paths=True, task="textvqa"):
    return load_config(TASKS, task, "qwen2_vl", overrides, config_dir=cfg_dir, check_paths=check_paths)


def test_overrides_and_defaults(cfg_dir, weights, data):
    cfg = load(
        cfg_dir,
        [
            f"model.model_path={weights}",
            f"task.local_dataset_path={data}",
            "batch_size=8",
            "limit=50",
            "output_dir=/tmp/x",
            "model.mm_model.infer_params.max_output_length=12",
        ],
    )
    assert cfg.run.batch_size == 8 and cfg.run.limit == 50 and cfg.run.output_dir == "/tmp/x"
    assert cfg.model.mm_model.infer_params.max_output_length == 12
    assert cfg.model.data_type == "bf16"  # from config.json torch_dtype
    assert cfg.model.mm_model.prompt_suffix is None  # the task's own
    assert cfg.task.prompt_suffix == " Answer the question using a single word or phrase."


def test_unprefixed_unique_key(cfg_dir, weights, data):
    cfg = load(
        cfg_dir,
        [f"model.model_path={weights}", f"task.local_dataset_path={data}", "data_type=fp16", "max_output_length=7"],
    )
    assert cfg.model.data_type == "fp16"
    assert cfg.model.mm_model.infer_params.max_output_length == 7


def test_data_type_follows_config_json(cfg_dir, weights, data):
    (weights / "config.json").write_text(
        json.dumps({"model_type": "qwen2_vl", "vision_config": {}, "torch_dtype": "float16"})
    )
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


def test_engine_settings_with_another_backend_are_refused_by_name(cfg_dir):
    for key in ("prefix_cache=false", "vision_cache_mb=64", "max_num_batched_tokens=4096"):
        with pytest.raises(UserError, match=rf"model.{key.split('=')[0]}: an engine setting, and model.backend is hf"):
            load(cfg_dir, ["model.backend=hf", f"model.{key}"], check_paths=False)
    load(cfg_dir, ["model.backend=hf", "model.prefix_cache=true"], check_paths=False)  # the default: nothing unused
    with pytest.raises(UserError, match=r"max_num_batched_tokens 100 must be at least max_batch_size \+ block_size"):
        load(cfg_dir, ["model.max_num_batched_tokens=100"], check_paths=False)


def test_wrong_dtype(cfg_dir, weights, data):
    with pytest.raises(UserError, match=r"model.data_type: 'int4' is not one of bf16, fp16, fp32"):
        load(cfg_dir, [f"model.model_path={weights}", f"task.local_dataset_path={data}", "data_type=int4"])
    (weights / "config.json").write_text(
        json.dumps({"model_type": "qwen2_vl", "vision_config": {}, "torch_dtype": "float64"})
    )
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
        load_config(TASKS, "textvq", "qwen2_vl", [], config_dir=cfg_dir)
    with pytest.raises(UserError, match=r"unknown model 'qwen3'; available: qwen2_5_vl, qwen2_vl"):
        load_config(TASKS, "textvqa", "qwen3", [], config_dir=cfg_dir)


def test_yaml_syntax_error_names_file_and_line(cfg_dir):
    path = cfg_dir / "task" / "videobench.yaml"
    path.write_text("task_name: videobench\nfps: [0.5\n")
    with pytest.raises(UserError, match=r"videobench.yaml line \d+: not valid YAML"):
        load(cfg_dir, [], check_paths=False, task="videobench")


def test_bad_values(cfg_dir):
    with pytest.raises(UserError, match=r"batch_size: must be at least 1"):
        load(cfg_dir, ["batch_size=0"], check_paths=False)
    for key in ("task.requested_max_output_length", "task.requested_max_input_length", "max_output_length"):
        with pytest.raises(UserError, match=r"max_(output|input)_length: must be at least 1, got 0"):
            load(cfg_dir, [f"{key}=0"], check_paths=False)
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
    cfg = load(
        cfg_dir, ["task.subject_mapping=null", "task.fps=1", "task.video_root=/v"], check_paths=False, task="videobench"
    )
    assert cfg.task.subject_mapping is None and cfg.task.fps == 1.0 and cfg.task.video_root == "/v"
    with pytest.raises(UserError, match=r"unknown key 'task.fps'"):
        load(cfg_dir, ["task.fps=1"], check_paths=False, task="textvqa")


@pytest.mark.parametrize(
    "content,expected",
    [
        (
            {"model_type": "llama", "vision_config": {}},
            "model_type 'llama'; modeltest runs Qwen2-VL and Qwen2.5-VL checkpoints",
        ),
        ({"model_type": "qwen2"}, "model_type 'qwen2'; modeltest runs Qwen2-VL and Qwen2.5-VL checkpoints"),
        ({}, "no model_type; modeltest runs Qwen2-VL and Qwen2.5-VL checkpoints"),
        ({"model_type": "qwen2_vl"}, "model_type 'qwen2_vl' but no vision_config"),
    ],
)
def test_a_checkpoint_of_neither_family_is_refused_in_one_line(cfg_dir, weights, data, content, expected):
    """Before anything loads, for the harness, the server and run_pa alike."""
    from modeltest.cli import build_parser
    from modeltest.serve.config import serve_config_from_args

    (weights / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", **content}))
    with pytest.raises(UserError) as e:
        load(cfg_dir, [f"model.model_path={weights}", f"task.local_dataset_path={data}"])
    assert str(e.value).startswith(f"{weights / 'config.json'}: ") and expected in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="modeltest runs Qwen2-VL|no vision_config"):
        serve_config_from_args(build_parser().parse_args(["serve", "--model_path", str(weights)]))


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--port", "99999"], "--port 99999: a TCP port is 1..65535"),
        (["--port", "0"], "--port 0: a TCP port is 1..65535"),
        (["--video-options", '{"fsp": 1}'], "--video-options: fsp: unknown video option (known: fps,"),
        (
            ["--image-options", '{"max_pixel": 1}'],
            "--image-options: max_pixel: unknown image option (known: min_pixels,",
        ),
    ],
)
def test_serve_settings_are_checked_at_start(weights, argv, expected):
    from modeltest.cli import build_parser
    from modeltest.serve.config import serve_config_from_args

    with pytest.raises(UserError) as e:
        serve_config_from_args(build_parser().parse_args(["serve", "--model_path", str(weights), *argv]))
    assert str(e.value).startswith(expected)
    ok = serve_config_from_args(
        build_parser().parse_args(
            ["serve", "--model_path", str(weights), "--port", "8001", "--video-options", '{"fps": 1.0}']
        )
    )
    assert ok.port == 8001 and ok.video_options["fps"] == 1.0


def test_bench_serve_arguments_name_the_mistake():
    from modeltest.bench.serve_metrics import parse_goodput

    with pytest.raises(UserError, match="expected NAME:MILLISECONDS"):
        parse_goodput(["ttft=500"])
    with pytest.raises(UserError, match="the SLO name must be ttft, tpot or e2el"):
        parse_goodput(["ttf:500"])
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}


def test_version():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "modeltest", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "modeltest 0.1.0"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("fps=0", "task.fps: must be positive, got 0.0"),
        ("fps=-1", "task.fps: must be positive, got -1.0"),
        ("max_frames=2", "task.min_frames: 4 is above max_frames 2"),
        ("task.max_pixels=100", "task.min_pixels: 100352 is above max_pixels 100"),
    ],
)
def test_media_options_are_checked_once_for_the_harness_and_the_server(cfg_dir, override, expected):
    """The task's options, the server's --video-options and a request's mm_processor_kwargs go
    through one check (media/options.py)."""
    with pytest.raises(UserError) as e:
        load(cfg_dir, [override], check_paths=False, task="videobench")
    assert str(e.value) == expected
    from modeltest.serve.chat_protocol import parse_chat_request
    from modeltest.serve.protocol import RequestError

    with pytest.raises(RequestError, match="mm_processor_kwargs.fps: must be positive"):
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "mm_processor_kwargs": {"fps": 0}})


def test_bench_serve_refuses_zero_prompts_before_anything_runs(capsys):
    from modeltest.cli import main

    assert main(["bench-serve", "textvqa", "qwen2_vl", "--num-prompts", "0"]) == 2
    assert "--num-prompts 0: must be at least 1" in capsys.readouterr().err


def test_a_served_models_setting_with_a_local_backend_is_refused_by_name(cfg_dir):
    for key, value in (
        ("model.server_kind", "plain"),
        ("model.send_preprocessing", "false"),
        ("model.concurrency", "32"),
    ):
        with pytest.raises(UserError, match=rf"{key}: a setting of a served model, and model.backend is engine"):
            load(cfg_dir, [f"{key}={value}"], check_paths=False)
    load(
        cfg_dir, ["model.backend=openai", "model.api_base=http://h:1/v1", "model.server_kind=plain"], check_paths=False
    )
