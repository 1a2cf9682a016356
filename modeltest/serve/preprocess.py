"""A chat request -> model input, by the one path every sender uses (modeltest/inputs.py): the
request's media resolved to local files, qwen-vl-utils (decord for video) with the task configs'
pixel and fps options through the server's media source (the media cache), the chat template,
then transformers' Qwen2-VL processor. The same single-turn request therefore hands the engine
bit-identical pixels and tokens to an evaluation run.

Runs in worker threads (never on the event loop): each call borrows its own processor copy
(media.processor.ProcessorCopies), since a fast tokenizer shared between threads can fail
("Already borrowed").
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import SampleError
from ..inputs import ModelInput, model_input
from ..media import open_media_source
from ..media.decode import require_qwen_vl_utils
from ..media.processor import ProcessorCopies, load_processor
from .chat_protocol import ChatRequest, MediaPart
from .config import ServeConfig
from .media_urls import MediaResolver
from .protocol import RequestError
from .text_protocol import CompletionRequest
from .tools import TEMPLATE as TOOL_TEMPLATE

IMAGE_KWARGS = ("min_pixels", "max_pixels")  # mm_processor_kwargs that apply to images


def media_error(message: str, local: Dict[str, MediaPart], work: str) -> RequestError:
    """A decode failure as the client sees it: `param` names the part (messages[i].content[j]),
    and the message says what the client sent, never the server's file for it."""
    param = "messages"
    for path, part in sorted(local.items(), key=lambda kv: -len(kv[0])):
        if path in message:
            param = part.param
            sent = part.url if not part.url.startswith("data:") and "://" in part.url else f"the {part.kind} data"
            message = message.replace(path, sent)
    return RequestError(400, f"media: {message.replace(work, '<upload>')}", param)


class Preprocessor:
    def __init__(self, cfg: ServeConfig):
        require_qwen_vl_utils()
        self.cfg = cfg
        self.processor = load_processor(cfg.model_path, fast=cfg.fast_processor)
        self.tokenizer = self.processor.tokenizer
        self.resolver = MediaResolver(
            cfg.allowed_local_media_path,
            cfg.allow_remote_media,
            cfg.remote_media_timeout_s,
            int(cfg.max_remote_media_mb * 2**20),
        )
        # the harness's media path whole: the cache, and decodes in worker processes (a hung
        # decode stopped after --decode-timeout), so a served evaluation decodes each clip once
        self.media = open_media_source(
            cfg.media_cache, cfg.media_cache_gb, cfg.decode_workers, cfg.decode_timeout_s, setting="--media-cache"
        )
        self._processors = ProcessorCopies(self.processor)
        self.tool_template = TOOL_TEMPLATE.read_text()
        self.chat_template = Path(cfg.chat_template).read_text() if cfg.chat_template else None

    def check_counts(self, req: ChatRequest) -> None:
        media = req.media
        for kind, limit, flag in (
            ("image", self.cfg.max_images_per_request, "--max-images-per-request"),
            ("video", self.cfg.max_videos_per_request, "--max-videos-per-request"),
        ):
            n = sum(1 for m in media if m.kind == kind)
            if n > limit:
                raise RequestError(
                    400, f"{n} {kind}s in one request; this server takes at most {limit} ({flag})", "messages"
                )

    def options(self, part: MediaPart, req: ChatRequest) -> Dict[str, Any]:
        opts = dict(self.cfg.image_options if part.kind == "image" else self.cfg.video_options)
        for k, v in req.mm_processor_kwargs.items():
            if part.kind == "video" or k in IMAGE_KWARGS:
                opts[k] = v
        return opts

    def __call__(self, req: ChatRequest) -> ModelInput:
        self.check_counts(req)
        with self._processors.borrow() as proc:
            return self._inputs(req, proc)

    def conversation(self, req: ChatRequest, work: Path, local: Dict[str, MediaPart] = None) -> List[Dict[str, Any]]:
        """The request's messages in qwen-vl-utils' form, each medium a local file under `work`
        (or an allowed local path) with this server's options and the request's
        mm_processor_kwargs; `local` collects which part each file is."""
        messages: List[Dict[str, Any]] = []
        for m in req.messages:
            content = []
            for part in m.parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                else:
                    path = self.resolver.resolve(part, work)
                    if local is not None:
                        local[str(path)] = part
                    content.append({"type": part.kind, part.kind: path, **self.options(part, req)})
            message = {"role": m.role, "content": content}
            if m.tool_calls:
                message["tool_calls"] = m.tool_calls
            messages.append(message)
        return messages

    def template(self, req: ChatRequest) -> Optional[str]:
        """The chat template for a request: --chat-template when given; the tool template
        (tools.TEMPLATE) for a request with tools or tool turns; else the checkpoint's (None)."""
        if self.chat_template is not None:
            return self.chat_template
        return self.tool_template if req.uses_tools else None

    def _inputs(self, req: ChatRequest, proc) -> ModelInput:
        with tempfile.TemporaryDirectory(prefix="modeltest-serve-") as work:
            local: Dict[str, MediaPart] = {}
            messages = self.conversation(req, Path(work), local)
            try:
                tools = req.tools.tools if req.tools is not None else None
                mi = model_input(proc, messages, self.media, chat_template=self.template(req), tools=tools)
            except SampleError as e:
                raise media_error(str(e), local, work) from None
        mi.media_keys()  # hash the pixels here, in a worker thread, never on the event loop
        n = mi.prompt_tokens
        if n > self.cfg.max_input_length:
            raise RequestError(
                400,
                f"the prompt is {n} tokens (vision tokens included), over this server's "
                f"max_input_length {self.cfg.max_input_length}; send smaller or fewer media "
                "(mm_processor_kwargs max_pixels / fps) or a shorter text",
                "messages",
                code="context_length_exceeded",
            )
        return mi

    def text_prompts(self, req: CompletionRequest) -> List[Tuple[List[int], str]]:
        """A completions request's prompts as (token ids, text): text tokenized as it is (no chat
        template; the tokenizer's own special tokens, as vLLM), token ids decoded for echo."""
        out = []
        with self._processors.borrow() as proc:
            tok = proc.tokenizer
            for i, p in enumerate(req.prompts):
                ids = tok(p)["input_ids"] if isinstance(p, str) else list(p)
                text = p if isinstance(p, str) else tok.decode(ids, skip_special_tokens=False)
                if len(ids) > self.cfg.max_input_length:
                    raise RequestError(
                        400,
                        f"prompt[{i}] is {len(ids)} tokens, over this server's max_input_length "
                        f"{self.cfg.max_input_length}",
                        "prompt",
                        code="context_length_exceeded",
                    )
                out.append((ids, text))
        return out

    def close(self) -> None:
        self.media.close()
