"""The chat-completions request (/v1/chat/completions): messages of text, images and videos,
the per-request preprocessing options (vLLM's mm_processor_kwargs), and chat logprobs
(`logprobs: true` + `top_logprobs`). The sampling fields are protocol.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..media.options import VIDEO_OPTIONS, option_problem
from .protocol import (
    MAX_LOGPROBS,
    SAMPLING_FIELDS,
    GenerationRequest,
    RequestError,
    check_fields,
    generation_fields,
    number,
    warn_unknown,
)
from .structured import FieldProblem
from .tools import ToolSpec, history_calls, parse_tools


@dataclass
class MediaPart:
    kind: str  # "image" | "video"
    url: str  # data:..., file://..., /abs/path, http(s)://..., or raw base64
    param: str  # where it was in the body, for error messages


@dataclass
class ChatMessage:
    role: str  # system | user | assistant | tool
    parts: List[Union[str, MediaPart]]  # text strings and media, in order
    tool_calls: List[Dict[str, Any]] = field(default_factory=list)  # an assistant's earlier calls (tools.py)


@dataclass
class ChatRequest(GenerationRequest):
    messages: List[ChatMessage] = field(default_factory=list)
    mm_processor_kwargs: Dict[str, Any] = field(default_factory=dict)
    tools: Optional[ToolSpec] = None

    @property
    def uses_tools(self) -> bool:
        """Whether the prompt needs a template that renders tools (tools, or tool turns)."""
        return self.tools is not None or any(m.role == "tool" or m.tool_calls for m in self.messages)

    @property
    def media(self) -> List[MediaPart]:
        return [p for m in self.messages for p in m.parts if isinstance(p, MediaPart)]


ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "mm_processor_kwargs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}

# A message's fields. `name` (a participant's name) and `tool_call_id` (which call a tool turn
# answers) are accepted and not rendered: Qwen's templates have no place for them.
MESSAGE_FIELDS = {"role", "content", "tool_calls", "tool_call_id", "name"}

MEDIA_TYPES = {"image_url": "image", "video_url": "video", "image": "image", "video": "video"}
# Per-request preprocessing a client may set (vLLM's mm_processor_kwargs names).
MM_KWARGS = {
    k: VIDEO_OPTIONS[k] for k in ("fps", "min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames")
}


def _media_url(part: Dict, key: str, param: str) -> str:
    value = part.get(key)
    if isinstance(value, dict):  # {"url": "..."} (OpenAI)
        value = value.get("url")
    if not isinstance(value, str) or not value:  # or the bare string MindIE accepts
        raise RequestError(400, f"{param}: '{key}' needs a 'url' string", param)
    return value


def _parts(content: Any, param: str) -> List[Union[str, MediaPart]]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise RequestError(400, f"{param}: 'content' must be a string or a list of parts", param)
    out: List[Union[str, MediaPart]] = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(400, f"{where}: a content part must be an object with a 'type'", where)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(400, f"{where}: a text part needs a 'text' string", where)
            out.append(part["text"])
        elif kind in MEDIA_TYPES:
            out.append(MediaPart(MEDIA_TYPES[kind], _media_url(part, kind, where), where))
        else:
            raise RequestError(
                400, f"{where}: unsupported content type '{kind}' (use text, image_url or video_url)", where
            )
    return out


def parse_chat_request(body: Any) -> ChatRequest:
    """A chat-completions body (already JSON-decoded) -> ChatRequest, or RequestError(400)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    parsed = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"{where}: needs a 'role' of {', '.join(ROLES)}", where)
        calls = []
        if m.get("tool_calls") and m["role"] != "assistant":
            raise RequestError(400, f"{where}: only an assistant turn has 'tool_calls'", where)
        if m.get("tool_calls"):
            try:
                calls = history_calls(m["tool_calls"], where)
            except FieldProblem as e:
                raise RequestError(400, e.message, e.param) from None
        elif m.get("content") is None:  # (an assistant turn of tool calls may have none)
            raise RequestError(400, f"{where}: 'content' is required", where)
        for key in sorted(set(m) - MESSAGE_FIELDS):
            warn_unknown(f"messages[].{key}")
        role = "system" if m["role"] == "developer" else m["role"]
        parsed.append(ChatMessage(role, _parts(m.get("content") or "", where), calls))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, int, None, low=1)
    mm = body.get("mm_processor_kwargs") or {}
    if not isinstance(mm, dict):
        raise RequestError(400, "'mm_processor_kwargs' must be an object", "mm_processor_kwargs")
    problem = option_problem(mm, "video", MM_KWARGS)
    if problem:
        raise RequestError(400, f"mm_processor_kwargs.{problem}", "mm_processor_kwargs")
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise RequestError(400, f"'logprobs' must be true or false, got {want!r}", "logprobs")
    top = number(body, "top_logprobs", int, None, low=0, high=MAX_LOGPROBS)
    if top is not None and not want:
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    fields = generation_fields(body)
    try:
        tools = parse_tools(body)
    except FieldProblem as e:
        raise RequestError(400, e.message, e.param) from None
    forced = tools.grammar() if tools is not None else None
    if forced is not None:
        if fields["grammar"] is not None:
            raise RequestError(400, "a forced tool call and a response format at once", "tool_choice")
        if fields["ignore_eos"] or fields["adjust"].get("min_tokens"):
            raise RequestError(400, "a forced tool call with ignore_eos or min_tokens", "tool_choice")
        fields["grammar"] = forced
    return ChatRequest(
        **fields,
        tools=tools,
        max_tokens=max_tokens,
        logprobs=(top or 0) if want else None,
        messages=parsed,
        mm_processor_kwargs=dict(mm),
    )
