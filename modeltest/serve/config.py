"""Every setting of `modeltest serve`, in one dataclass built from the command line."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..device import TORCH_DTYPES
from ..engine.config import read_checkpoint_config
from ..engine.scheduler import batched_tokens_problem
from ..media.options import option_problem
from ..tasks.textvqa import TextVQATaskConfig
from ..tasks.videobench import VideoBenchTaskConfig

API_KEY_ENV = "MODELTEST_API_KEY"


def default_image_options() -> Dict[str, Any]:
    """The TextVQA task's image bounds (the reference's), so a served image is preprocessed as in
    an evaluation run."""
    return TextVQATaskConfig().media_options()["image"]


def default_video_options() -> Dict[str, Any]:
    """The VideoBench task's frame sampling (fps 0.5) and pixel bounds."""
    return VideoBenchTaskConfig().media_options()["video"]


def opt(default: Any, help: str = "", flag: Optional[str] = None, choices=None, **kw):
    """A ServeConfig field with what its command-line option needs: help, the option's name where
    it is not the field's (--name-with-dashes, and --name_with_underscores for the reference's
    spelling), choices."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if "default_factory" in kw:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ServeConfig:
    """Every setting of `modeltest serve`; the command line is generated from these fields
    (add_serve_parser), so a default is written once."""

    model_path: str = opt(None, "the Qwen2-VL weights folder (config.json, safetensors, tokenizer)")
    host: str = opt("127.0.0.1", "address to listen on (loopback unless told otherwise)")
    port: int = opt(8000, "TCP port")
    served_model_name: Optional[str] = opt(
        None, "the name clients send as 'model' (default: the weights folder's name)"
    )
    max_batch_size: int = opt(8, "sequences decoding together")
    max_input_length: int = opt(32768, "prompt tokens at most, vision placeholders expanded")
    max_output_length: int = opt(2048, "max_tokens at most (and its default)")
    data_type: Optional[str] = opt(None, "default: config.json's torch_dtype", choices=tuple(TORCH_DTYPES))
    block_size: int = opt(128, "KV cache block size, in tokens")
    max_num_batched_tokens: Optional[int] = opt(
        None,
        "new tokens per engine pass: long prompts prefill in chunks of this beside running streams "
        "(default: 1024 on CPU, 4096 on accelerators)",
    )
    prefix_cache: bool = opt(
        True, "prefill every prompt whole (no reuse of prompt blocks computed before)", flag="--no-prefix-cache"
    )
    vision_cache: bool = opt(
        True, "run the vision tower for every request (no reuse of a medium's embeddings)", flag="--no-vision-cache"
    )
    vision_cache_mb: int = opt(1024, "the vision cache's bound")
    device: str = opt("auto", "where the model runs", choices=("auto", "npu", "cuda", "cpu"))
    api_key: Optional[str] = opt(
        None, f"require 'Authorization: Bearer KEY' on every endpoint but /health (or ${API_KEY_ENV})"
    )
    allowed_local_media_path: Optional[str] = opt(
        None, "serve file:// and absolute-path media only from under this folder"
    )
    allow_remote_media: bool = opt(False, "fetch http(s):// media URLs")
    remote_media_timeout_s: float = opt(10.0, "seconds", flag="--remote-media-timeout")
    max_remote_media_mb: float = opt(256.0, "a remote medium larger than this is refused")
    max_body_mb: float = opt(256.0, "larger request bodies get 413 (base64 videos are large)")
    max_images_per_request: int = opt(16, "")
    max_videos_per_request: int = opt(2, "")
    preprocess_workers: int = opt(2, "threads decoding media and running the processor")
    fast_processor: bool = opt(
        True,
        "run transformers' image processor itself (the default fast one is bit-identical)",
        flag="--reference-processor",
    )
    chat_template: Optional[str] = opt(
        None,
        "a Jinja chat template file for every request (default: the checkpoint's; requests with "
        "tools get Qwen2.5's tool rendering over Qwen2-VL's template, serve/templates/)",
    )
    media_cache: str = opt(
        "default",
        "decoded images/videos kept on disk across requests (lossless): default "
        "(~/.cache/modeltest/media or $MODELTEST_MEDIA_CACHE), a folder, or off",
    )
    media_cache_gb: float = opt(50.0, "the media cache's size bound")
    decode_workers: str = opt(
        "auto",
        "processes decoding images and videos, as an evaluation run's prep_workers: auto (the cores "
        "this process may use), a number, or 0 (decode in the preprocessing threads)",
    )
    decode_timeout_s: float = opt(
        300.0, "a decode running longer is stopped and its request answered 400", flag="--decode-timeout"
    )
    drain_timeout_s: float = opt(
        30.0, "on SIGTERM, seconds in-flight requests may take before they are aborted", flag="--drain-timeout"
    )
    image_options: Dict[str, Any] = opt(
        None, 'JSON, e.g. {"max_pixels": 1003520}, over TextVQA\'s', default_factory=default_image_options
    )
    video_options: Dict[str, Any] = opt(
        None, 'JSON, e.g. {"fps": 1.0}, over VideoBench\'s (fps 0.5)', default_factory=default_video_options
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path).resolve().name

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def _flags(f) -> List[str]:
    if f.metadata.get("flag"):
        return [f.metadata["flag"]]
    dashed = "--" + f.name.replace("_", "-")
    return [dashed, "--" + f.name] if "_" in f.name else [dashed]


def add_serve_parser(sub) -> None:
    """`modeltest serve`'s options, one per ServeConfig field (plus --tp, the launcher's)."""
    s = sub.add_parser("serve", help="serve a Qwen2-VL model over an OpenAI-compatible HTTP API")
    for f in fields(ServeConfig):
        flags, help_ = _flags(f), f.metadata.get("help") or None
        if f.name in ("image_options", "video_options"):
            s.add_argument(*flags, dest=f.name, default=None, help=help_)
        elif f.type == "bool" or isinstance(f.default, bool):
            # a flag that turns the default around (--allow-remote-media, --reference-processor)
            s.add_argument(*flags, dest=f.name, action="store_false" if f.default else "store_true", help=help_)
        else:
            kind = {"int": int, "float": float}.get(f.type.replace("Optional[", "").rstrip("]"), str)
            default = f.default
            s.add_argument(
                *flags,
                dest=f.name,
                type=kind,
                default=default,
                choices=f.metadata.get("choices"),
                required=f.name == "model_path",
                help=(f"{help_ or ''} (default: {default})".strip() if default is not None else help_),
            )
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: visible devices)")


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    from ..errors import UserError

    values = {
        f.name: getattr(args, f.name) for f in fields(ServeConfig) if f.name not in ("image_options", "video_options")
    }
    values["api_key"] = values["api_key"] or os.environ.get(API_KEY_ENV) or None
    cfg = ServeConfig(**values)
    for name in ("image_options", "video_options"):
        raw = getattr(args, name)
        if raw:
            try:
                extra = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"--{name.replace('_', '-')}: not JSON ({e.msg})") from None
            if not isinstance(extra, dict):
                raise UserError(f"--{name.replace('_', '-')}: expected a JSON object")
            getattr(cfg, name).update(extra)
    if not (Path(cfg.model_path) / "config.json").is_file():
        raise UserError(f"--model_path: '{cfg.model_path}' has no config.json; point it at a Qwen2-VL weights folder")
    read_checkpoint_config(cfg.model_path)
    if not 0 < cfg.port < 65536:
        raise UserError(f"--port {cfg.port}: a TCP port is 1..65535")
    for name, kind in (("image_options", "image"), ("video_options", "video")):
        problem = option_problem(getattr(cfg, name), kind)
        if problem:
            raise UserError(f"--{name.replace('_', '-')}: {problem}")
    if not (cfg.decode_workers == "auto" or (cfg.decode_workers.isdigit())):
        raise UserError(f"--decode-workers {cfg.decode_workers}: auto, or a number of processes >= 0")
    if cfg.decode_timeout_s <= 0:
        raise UserError(f"--decode-timeout {cfg.decode_timeout_s}: must be positive")
    if cfg.chat_template and not Path(cfg.chat_template).is_file():
        raise UserError(f"--chat-template: '{cfg.chat_template}' is not a file (a Jinja chat template)")
    if cfg.chat_template:
        try:
            import jinja2

            jinja2.Environment().parse(Path(cfg.chat_template).read_text())
        except (jinja2.TemplateSyntaxError, UnicodeDecodeError) as e:
            raise UserError(f"--chat-template: '{cfg.chat_template}' is not a Jinja template ({e})") from None
    if cfg.allowed_local_media_path and not Path(cfg.allowed_local_media_path).is_dir():
        raise UserError(f"--allowed-local-media-path: '{cfg.allowed_local_media_path}' is not a folder")
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name.startswith("max_") and isinstance(v, (int, float)) and v <= 0:
            raise UserError(f"--{f.name.replace('_', '-')}: must be positive, got {v}")
    problem = batched_tokens_problem(cfg.max_num_batched_tokens, cfg.max_batch_size, cfg.block_size)
    if problem:
        raise UserError(f"--{problem.replace('_', '-')}")
    return cfg
