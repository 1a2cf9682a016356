"""Load `configs/model/NAME.yaml` + `configs/task/NAME.yaml`, apply `key=value` overrides, validate.

Override grammar (values are parsed as YAML scalars, so `8` is an integer and `null` is None):
    model.model_path=/w/Qwen2-VL-7B-Instruct    task.local_dataset_path=/d/textvqa_val.jsonl
    output_dir=/tmp/out  batch_size=8  limit=50  device=cpu        (run settings)
    data_type=fp16                                                  (a unique model/task key may
                                                                     drop its prefix)
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional

import yaml

from ..backends.traits import BACKENDS, traits
from ..engine.config import read_checkpoint_config
from ..engine.scheduler import batched_tokens_problem
from ..errors import UserError
from ..media.options import option_problem
from .schema import (
    DATA_TYPES,
    ENGINE_SETTINGS,
    OPENAI_MEDIA,
    SERVER_KINDS,
    SERVER_SETTINGS,
    ModelConfig,
    RunConfig,
    TaskConfig,
    build_dataclass,
    field_paths,
)

TORCH_DTYPE_TO_DATA_TYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def default_config_dir() -> Path:
    env = os.environ.get("MODELTEST_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


@dataclass
class EvalConfig:
    model: ModelConfig
    task: TaskConfig
    run: RunConfig
    # Where each part came from, for the saved configuration.
    model_file: str = ""
    task_file: str = ""
    overrides: tuple = ()


def available(config_dir: Path, kind: str) -> List[str]:
    return sorted(p.stem for p in (config_dir / kind).glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _parse_override(text: str):
    if "=" not in text:
        raise UserError(f"command line: '{text}' is not key=value (e.g. batch_size=8, model.model_path=/w)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw
    return key, value


def _set_path(d: dict, path: List[str], value) -> None:
    for part in path[:-1]:
        nxt = d.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            d[part] = nxt
        d = nxt
    d[path[-1]] = value


def apply_overrides(
    model_raw: dict, task_raw: dict, run_raw: dict, overrides: List[str], task_config_cls: type
) -> None:
    run_keys = field_paths(RunConfig)
    every = (
        run_keys
        + ["model." + k for k in field_paths(ModelConfig)]
        + ["task." + k for k in field_paths(task_config_cls)]
    )
    for text in overrides:
        key, value = _parse_override(text)
        if key not in every and not key.startswith("task.subject_mapping."):
            # A model/task key may drop its prefix when its last part names exactly one key.
            matches = [k for k in every if k.rsplit(".", 1)[-1] == key]
            if len(matches) != 1:
                close = difflib.get_close_matches(key, every, n=1, cutoff=0.5)
                hint = (
                    f"; did you mean '{close[0]}'?"
                    if close
                    else "; use model.KEY=, task.KEY= or one of " + ", ".join(run_keys)
                )
                raise UserError(f"command line: unknown key '{key}'{hint}")
            key = matches[0]
        scope, _, rest = key.partition(".")
        if scope == "model":
            _set_path(model_raw, rest.split("."), value)
        elif scope == "task":
            _set_path(task_raw, rest.split("."), value)
        else:
            run_raw[key] = value


def resolve_data_type(model: ModelConfig) -> str:
    """bf16/fp16/fp32 from the config, else from the weights' config.json `torch_dtype`."""
    if model.data_type is not None:
        if model.data_type not in DATA_TYPES:
            raise UserError(f"model.data_type: '{model.data_type}' is not one of {', '.join(DATA_TYPES)}")
        return model.data_type
    cfg_path = Path(model.model_path) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path}: cannot read torch_dtype ({e}); fix the file or set model.data_type") from None
    # transformers 5 writes `dtype` where 4.x wrote `torch_dtype`.
    key = "torch_dtype" if raw.get("torch_dtype") else "dtype"
    torch_dtype = raw.get(key) or "bfloat16"
    if torch_dtype not in TORCH_DTYPE_TO_DATA_TYPE:
        raise UserError(
            f"{cfg_path}: {key} '{torch_dtype}' is not one of "
            f"{', '.join(TORCH_DTYPE_TO_DATA_TYPE)}; fix it or set model.data_type=bf16|fp16|fp32"
        )
    return TORCH_DTYPE_TO_DATA_TYPE[torch_dtype]


def validate_paths(cfg: EvalConfig) -> None:
    """Fail before anything loads when a path is wrong."""
    m, t = cfg.model, cfg.task
    if traits(m.backend).served:  # the model is on a server: only the dataset is local
        if not m.api_base:
            raise UserError(
                f"{cfg.model_file}: backend openai needs 'api_base'; pass model.api_base=http://HOST:PORT/v1"
            )
        if not t.local_dataset_path:
            raise UserError(f"{cfg.task_file}: 'local_dataset_path' is not set; pass task.local_dataset_path=/path")
        if not Path(t.local_dataset_path).exists():
            raise UserError(f"task.local_dataset_path: '{t.local_dataset_path}' does not exist; fix the path")
        return
    if not m.model_path:
        raise UserError(
            f"{cfg.model_file}: 'model_path' is not set; set it in the file or pass model.model_path=/path/to/Qwen2-VL"
        )
    mp = Path(m.model_path)
    if not mp.is_dir():
        raise UserError(
            f"model.model_path: '{mp}' is not a folder; point it at the weights folder (holding config.json)"
        )
    if not (mp / "config.json").is_file():
        raise UserError(
            f"model.model_path: '{mp}' has no config.json; point it at a Hugging Face Qwen2-VL weights folder"
        )
    read_checkpoint_config(mp, expect=m.model_name)  # another family than the config: one line, before anything loads
    if not t.local_dataset_path:
        raise UserError(f"{cfg.task_file}: 'local_dataset_path' is not set; pass task.local_dataset_path=/path")
    if not Path(t.local_dataset_path).exists():
        raise UserError(f"task.local_dataset_path: '{t.local_dataset_path}' does not exist; fix the path")


def _changed(m: ModelConfig, keys) -> Optional[str]:
    """The first of `keys` set to other than its default (None: none)."""
    default = ModelConfig()
    return next((k for k in keys if getattr(m, k) != getattr(default, k)), None)


def unused_engine_setting(m: ModelConfig) -> Optional[str]:
    """An engine setting (config.schema.ENGINE_SETTINGS) changed from its default for a backend
    that would not use it (None: none). block_size, which every saved config carries, is left
    out: it changes nothing off the engine and was accepted before these settings existed."""
    if traits(m.backend).engine_settings:
        return None
    return _changed(m, [k for k in ENGINE_SETTINGS if k != "block_size"])


def unused_server_setting(m: ModelConfig) -> Optional[str]:
    """A setting only a served model reads (config.schema.SERVER_SETTINGS) changed from its
    default for a backend that runs the model here (None: none)."""
    return None if traits(m.backend).served else _changed(m, SERVER_SETTINGS)


def validate_values(cfg: EvalConfig) -> None:
    if cfg.model.backend not in BACKENDS:
        raise UserError(f"model.backend: '{cfg.model.backend}' is not one of {', '.join(BACKENDS)}")
    if cfg.run.batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {cfg.run.batch_size}")
    if cfg.run.limit is not None and cfg.run.limit < 1:
        raise UserError(f"limit: must be at least 1 (or null for all), got {cfg.run.limit}")
    # every length and count at least 1 (0 would run nothing, or fail every sample the same way)
    for key, value in (
        ("model.mm_model.infer_params.max_output_length", cfg.model.mm_model.infer_params.max_output_length),
        ("task.requested_max_output_length", cfg.task.requested_max_output_length),
        ("task.requested_max_input_length", cfg.task.requested_max_input_length),
    ):
        if value < 1:
            raise UserError(f"{key}: must be at least 1, got {value}")
    mc = cfg.run.media_cache
    if not (mc is None or mc is False or isinstance(mc, str)):
        raise UserError(f"media_cache: '{mc}' must be default, off or a folder")
    if cfg.run.media_cache_gb <= 0:
        raise UserError(f"media_cache_gb: must be positive, got {cfg.run.media_cache_gb}")
    pw = cfg.run.prep_workers
    if pw != "auto" and not (isinstance(pw, int) and not isinstance(pw, bool) and pw >= 0):
        raise UserError(
            f"prep_workers: '{pw}' must be auto or a number of processes >= 0 (0: decode in the harness's threads)"
        )
    if cfg.run.prep_timeout_s <= 0:
        raise UserError(f"prep_timeout_s: must be positive, got {cfg.run.prep_timeout_s}")
    m = cfg.model
    unused = unused_engine_setting(m)
    if unused:
        raise UserError(
            f"model.{unused}: an engine setting, and model.backend is {m.backend}; remove it or use "
            "model.backend=engine"
        )
    unused = unused_server_setting(m)
    if unused:
        raise UserError(
            f"model.{unused}: a setting of a served model, and model.backend is {m.backend}; remove it or "
            "use model.backend=openai"
        )
    problem = batched_tokens_problem(m.max_num_batched_tokens, cfg.run.batch_size, m.block_size)
    if problem:
        raise UserError(f"model.{problem}")
    if m.vision_cache_mb < 0:
        raise UserError(f"model.vision_cache_mb: must be >= 0, got {m.vision_cache_mb}")
    if traits(m.backend).served:
        if m.media not in OPENAI_MEDIA:
            raise UserError(f"model.media: '{m.media}' is not one of {', '.join(OPENAI_MEDIA)}")
        if m.server_kind not in SERVER_KINDS:
            raise UserError(f"model.server_kind: '{m.server_kind}' is not one of {', '.join(SERVER_KINDS)}")
        if m.concurrency < 1 or m.max_retries < 0 or m.timeout <= 0:
            raise UserError(
                "model.concurrency must be at least 1, model.max_retries at least 0 and model.timeout positive"
            )
        if not m.use_chat_template:
            raise UserError(
                "model.use_chat_template=false cannot be sent to a server: the chat API applies "
                "the server's chat template"
            )
    for kind, options in cfg.task.media_options().items():
        problem = option_problem(options, kind)
        if problem:
            raise UserError(f"task.{problem}")
    if cfg.task.metric.metric_type != "acc":
        raise UserError(f"task.metric.metric_type: '{cfg.task.metric.metric_type}' is not supported; use acc")


def load_config(
    tasks: Mapping[str, Any],
    task_name: str,
    model_name: str,
    overrides: Optional[List[str]] = None,
    config_dir: Optional[Path] = None,
    check_paths: bool = True,
) -> EvalConfig:
    """tasks: the task registry (modeltest.tasks.TASKS: name -> Task class, whose config_class
    the task's YAML is read into), handed in so that config imports no task."""
    TASKS = tasks

    config_dir = Path(config_dir) if config_dir else default_config_dir()
    overrides = list(overrides or [])
    task_file = config_dir / "task" / f"{task_name}.yaml"
    model_file = config_dir / "model" / f"{model_name}.yaml"
    if not task_file.is_file():
        raise UserError(
            f"unknown task '{task_name}'; available: {', '.join(available(config_dir, 'task')) or 'none'} "
            f"(files in {config_dir / 'task'})"
        )
    if not model_file.is_file():
        raise UserError(
            f"unknown model '{model_name}'; available: {', '.join(available(config_dir, 'model')) or 'none'} "
            f"(files in {config_dir / 'model'})"
        )
    model_raw, task_raw, run_raw = _read_yaml(model_file), _read_yaml(task_file), {}
    declared = task_raw.get("task_name", task_name)
    if declared not in TASKS:
        raise UserError(f"{task_file}: task_name '{declared}' has no implementation; known: {', '.join(sorted(TASKS))}")
    task_cls = TASKS[declared].config_class
    apply_overrides(model_raw, task_raw, run_raw, overrides, task_cls)
    cfg = EvalConfig(
        model=build_dataclass(ModelConfig, model_raw, str(model_file)),
        task=build_dataclass(task_cls, task_raw, str(task_file)),
        run=build_dataclass(RunConfig, run_raw, "command line"),
        model_file=str(model_file),
        task_file=str(task_file),
        overrides=tuple(overrides),
    )
    validate_values(cfg)
    if check_paths:
        validate_paths(cfg)
        if traits(cfg.model.backend).local_weights:  # a served model's data type is the server's business
            cfg.model.data_type = resolve_data_type(cfg.model)
    return cfg
