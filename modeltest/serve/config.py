"""Every setting of `modeltest serve`, in one dataclass built from the command line."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

from ..device import TORCH_DTYPES
from ..tasks.textvqa import TextVQATaskConfig
from ..tasks.videobench import VideoBenchTaskConfig

API_KEY_ENV = "MODELTEST_API_KEY"


def default_image_options() -> Dict[str, Any]:
    """The TextVQA task's image bounds (the reference's), so a served image is preprocessed as in
    an evaluation run."""
    t = TextVQATaskConfig()
    return {"min_pixels": t.min_pixels, "max_pixels": t.max_pixels}


def default_video_options() -> Dict[str, Any]:
    """The VideoBench task's frame sampling (fps 0.5) and pixel bounds."""
    t = VideoBenchTaskConfig()
    return {"fps": t.fps, "min_frames": t.min_frames, "max_frames": t.max_frames, "min_pixels": t.min_pixels,
            "max_pixels": t.max_pixels, "total_pixels": t.total_pixels}


@dataclass
class ServeConfig:
    model_path: str
    host: str = "127.0.0.1"                 # loopback unless told otherwise
    port: int = 8000
    served_model_name: Optional[str] = None  # default: the weights folder's name
    max_batch_size: int = 8
    max_input_length: int = 32768            # prompt tokens, vision placeholders expanded
    max_output_length: int = 2048
    data_type: Optional[str] = None          # bf16 | fp16 | fp32; null: config.json's torch_dtype
    block_size: int = 128
    device: str = "auto"
    api_key: Optional[str] = None            # or $MODELTEST_API_KEY
    allowed_local_media_path: Optional[str] = None
    allow_remote_media: bool = False
    remote_media_timeout_s: float = 10.0
    max_remote_media_mb: float = 256.0
    max_body_mb: float = 256.0               # base64 videos are large; 413 above this
    max_images_per_request: int = 16
    max_videos_per_request: int = 2
    preprocess_workers: int = 2              # threads decoding media and running the processor
    fast_processor: bool = True              # fast_processor.py's bit-identical image processor
    drain_timeout_s: float = 30.0            # SIGTERM: in-flight requests get this long, then are aborted
    image_options: Dict[str, Any] = field(default_factory=default_image_options)
    video_options: Dict[str, Any] = field(default_factory=default_video_options)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path).resolve().name

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2 ** 20)


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a Qwen2-VL model over an OpenAI-compatible HTTP API")
    s.add_argument("--model_path", "--model-path", required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", "--served_model_name", default=None,
                   help="the name clients send as 'model' (default: the weights folder's name)")
    s.add_argument("--max_batch_size", "--max-batch-size", type=int, default=8)
    s.add_argument("--max_input_length", "--max-input-length", type=int, default=32768)
    s.add_argument("--max_output_length", "--max-output-length", type=int, default=2048)
    s.add_argument("--data_type", "--data-type", choices=list(TORCH_DTYPES), default=None)
    s.add_argument("--block_size", "--block-size", type=int, default=128)
    s.add_argument("--device", default="auto", choices=("auto", "npu", "cuda", "cpu"))
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: visible devices)")
    s.add_argument("--api-key", "--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (or ${API_KEY_ENV})")
    s.add_argument("--allowed-local-media-path", "--allowed_local_media_path", default=None,
                   help="serve file:// and absolute-path media only from under this folder")
    s.add_argument("--allow-remote-media", action="store_true", help="fetch http(s):// media URLs")
    s.add_argument("--remote-media-timeout", type=float, default=10.0, help="seconds (default 10)")
    s.add_argument("--max-remote-media-mb", type=float, default=256.0)
    s.add_argument("--max-body-mb", type=float, default=256.0, help="larger request bodies get 413")
    s.add_argument("--max-images-per-request", type=int, default=16)
    s.add_argument("--max-videos-per-request", type=int, default=2)
    s.add_argument("--preprocess-workers", type=int, default=2)
    s.add_argument("--reference-processor", action="store_true",
                   help="run transformers' image processor itself (the default fast one is bit-identical)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take before they are aborted")
    s.add_argument("--image-options", default=None, help='JSON, e.g. {"max_pixels": 1003520} (default: TextVQA\'s)')
    s.add_argument("--video-options", default=None, help='JSON, e.g. {"fps": 1.0} (default: VideoBench\'s, fps 0.5)')


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    from ..errors import UserError
    cfg = ServeConfig(
        model_path=args.model_path, host=args.host, port=args.port, served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size, max_input_length=args.max_input_length,
        max_output_length=args.max_output_length, data_type=args.data_type, block_size=args.block_size,
        device=args.device, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allowed_local_media_path=args.allowed_local_media_path, allow_remote_media=args.allow_remote_media,
        remote_media_timeout_s=args.remote_media_timeout, max_remote_media_mb=args.max_remote_media_mb,
        max_body_mb=args.max_body_mb, max_images_per_request=args.max_images_per_request,
        max_videos_per_request=args.max_videos_per_request, preprocess_workers=args.preprocess_workers,
        drain_timeout_s=args.drain_timeout, fast_processor=not args.reference_processor)
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
    if cfg.allowed_local_media_path and not Path(cfg.allowed_local_media_path).is_dir():
        raise UserError(f"--allowed-local-media-path: '{cfg.allowed_local_media_path}' is not a folder")
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name.startswith("max_") and isinstance(v, (int, float)) and v <= 0:
            raise UserError(f"--{f.name.replace('_', '-')}: must be positive, got {v}")
    return cfg
