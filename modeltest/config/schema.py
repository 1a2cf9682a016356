"""Config dataclasses, one per concern, and a strict dict -> dataclass validator.

Every YAML file and every command-line override goes through `build_dataclass`, which rejects
unknown keys (naming the closest valid one) and wrong types (naming the expected one), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..device import TORCH_DTYPES
from ..errors import UserError

DATA_TYPES = tuple(TORCH_DTYPES)  # bf16, fp16, fp32
OPENAI_MEDIA = ("data", "file")
SERVER_KINDS = ("auto", "vllm", "transformers", "plain")  # backends/server_kind.py


@dataclass
class InferParams:
    max_output_length: int = 100  # the reference evaluation's (engine/request.py says why the others differ)


@dataclass
class MMModelConfig:
    # Override the task's prompt prefix/suffix for this model (null: the task's own).
    prompt_prefix: Optional[str] = None
    prompt_suffix: Optional[str] = None
    infer_params: InferParams = field(default_factory=InferParams)


# The ModelConfig fields that are EngineConfig fields of the same name and meaning (the engine's
# KV and reuse settings): backends/engine.engine_config passes them on, `modeltest serve` fills
# them from its own options of the same names.
ENGINE_SETTINGS = ("block_size", "prefix_cache", "vision_cache", "vision_cache_mb", "max_num_batched_tokens")
# The ModelConfig fields only a served model reads (backend openai).
SERVER_SETTINGS = (
    "api_base",
    "api_key",
    "served_model_name",
    "concurrency",
    "timeout",
    "max_retries",
    "retry_backoff",
    "media",
    "server_kind",
    "send_preprocessing",
)


@dataclass
class ModelConfig:
    model_name: str = "qwen2_vl"
    model_path: Optional[str] = None
    model_type: str = "pa"
    # Inference backend: "engine" (our tensor-parallel core) or "hf" (transformers, the reference).
    backend: str = "engine"
    # bf16 / fp16 / fp32; null means the weights' config.json `torch_dtype`, as the reference does.
    data_type: Optional[str] = None
    block_size: int = 128
    # ---- backend "engine": reuse and scheduling (README "Engine settings") ----
    # Reuse the K/V of prompt blocks already computed (the system prompt and the medium before
    # each question): identical outputs, less prefill.
    prefix_cache: bool = True
    # Keep the vision tower's output per image/clip for the next question on it (in memory).
    vision_cache: bool = True
    vision_cache_mb: int = 1024
    # New tokens in one engine pass (decodes + prefill chunks); null: 1024 on CPU, 4096 on accelerators.
    max_num_batched_tokens: Optional[int] = None
    use_chat_template: bool = True
    mm_model: MMModelConfig = field(default_factory=MMModelConfig)
    # ---- backend "openai": a served deployment (modeltest serve, vLLM, SGLang, MindIE Service) ----
    api_base: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1
    # The key; null reads $OPENAI_API_KEY. Never written to the saved configuration or debug file.
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None  # null: the first model /v1/models lists
    concurrency: int = 8  # requests in flight
    timeout: float = 600.0  # seconds per request attempt
    max_retries: int = 5  # on connection errors, 429 and 5xx (never other 4xx)
    retry_backoff: float = 1.0  # seconds before the first retry; doubles, with jitter
    media: str = "data"  # data: base64 data URLs (any server); file: file:// paths
    # How the server takes a request's media options (backends/server_kind.py): auto (probed
    # before the run), vllm (mm_processor_kwargs: vLLM, SGLang, modeltest serve), transformers
    # (chat_template_kwargs: transformers serve), plain (none).
    server_kind: str = "auto"
    # Send the task's pixel/fps options to the server. A server that cannot take them (plain)
    # refuses to start the run unless this is false: then it runs on the server's own
    # preprocessing, and every record and the summary say so.
    send_preprocessing: bool = True


@dataclass
class MetricConfig:
    metric_type: str = "acc"


@dataclass
class TaskConfig:
    """What every task's config has; each task module (modeltest/tasks) subclasses it."""

    task_name: str = ""
    local_dataset_path: Optional[str] = None
    requested_max_input_length: int = 4096
    requested_max_output_length: int = 4096
    metric: MetricConfig = field(default_factory=MetricConfig)
    # Per-image pixel bounds handed to qwen-vl-utils (multiples of 28*28).
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28

    def media_options(self) -> Dict[str, Dict[str, Any]]:
        """What this task hands qwen-vl-utils with each medium, by kind (checked when the config
        loads: media/options.py)."""
        return {"image": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}}


@dataclass
class RunConfig:
    """Settings of one run, not of the model or the dataset."""

    # Default: output/<YYYY-MM-DD>/modeltest/<model_name>/precision_result/
    output_dir: Optional[str] = None
    batch_size: int = 1
    # First N samples per subject (all when null).
    limit: Optional[int] = None
    device: str = "auto"
    # Tensor-parallel size: devices per model replica (default: the number of visible devices
    # divided by dp; 1 on CPU). scripts/mm_run.sh starts dp x tp processes with torchrun.
    tp: Optional[int] = None
    # Data-parallel size: model replicas that split the samples between them.
    dp: Optional[int] = None
    # Reuse the finished samples recorded under output_dir by an earlier run of the same command.
    resume: bool = True
    # Exit non-zero when any sample failed (a run in which every sample failed always does).
    fail_on_errors: bool = False
    # Preprocessed images/videos kept on disk (media/cache.py): "default"
    # (~/.cache/modeltest/media or $MODELTEST_MEDIA_CACHE), a folder, or off (YAML reads `off`
    # as false, hence Any; config/loader.py checks it).
    media_cache: Any = "default"
    media_cache_gb: float = 50.0
    # Processes that decode this rank's images and videos (media/workers.py): "auto" (the cores
    # this rank may use: CPU affinity / LOCAL_WORLD_SIZE), a number, or 0 (the harness's threads).
    prep_workers: Any = "auto"
    # A decode running longer is stopped and recorded as that sample's error (retried on resume).
    prep_timeout_s: float = 300.0
    # The image processor's work by table lookup + one permute (media/fast_processor.py): bit-identical
    # to transformers' processor; false runs transformers' own.
    fast_processor: bool = True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin in (dict, Dict):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))


def _check_scalar(value: Any, tp: Any) -> Any:
    """Return the value coerced to `tp`, or raise TypeError."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric-looking prompt prefix
        raise TypeError
    if typing.get_origin(tp) in (dict, Dict):
        if isinstance(value, dict):
            return value
        raise TypeError
    raise TypeError


def build_dataclass(cls: type, data: Optional[dict], source: str, prefix: str = "") -> Any:
    """Build `cls` from `data`, raising a one-line UserError on unknown keys or wrong types.

    `source` names where the data came from (a file path or "command line"); `prefix` is the
    dotted path of this mapping, so messages show `model.mm_model.prompt_suffix`.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"{source}: unknown key '{prefix}{key}'{hint}")
        tp = hints[key]
        kwargs[key] = _coerce(value, tp, source, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    optional = origin is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, source, path + ".")
    try:
        return _check_scalar(value, tp)
    except TypeError:
        raise UserError(f"{source}: '{path}' must be {_type_name(tp)}, got {value!r}") from None


def field_paths(cls: type, prefix: str = "") -> list:
    """Every dotted key path a dataclass accepts (for 'did you mean' on overrides)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            out += field_paths(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out
