"""Response bodies of the two endpoints, from what each choice produced (`Piece`s): the chat shape
(`chat.completion`, `message` / `delta`, logprobs as `logprobs.content`) and the legacy text shape
(`text_completion`, `text`, logprobs as `tokens` / `token_logprobs` / `top_logprobs` /
`text_offset`). responses.py runs the choices; this file only says what their answers look like.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .protocol import usage
from .tools import OPEN, ToolSpec, safe_content, tool_calls_in

# What the engine gives per token with logprobs on: (its logprob, [(token id, logprob)] most
# likely first); None for a prompt's first token, which nothing comes before.
TokenLogprob = Optional[Tuple[float, List[Tuple[int, float]]]]


@functools.lru_cache(maxsize=1 << 18)
def token_text(tokenizer, tid: int) -> str:
    """One token's text (logprobs name every token and its alternatives: decoded once each)."""
    return tokenizer.decode([tid], skip_special_tokens=False)


@dataclass
class Piece:
    """What one choice adds to its answer at one point: text, the tokens behind it with their
    logprobs (when the request asked for logprobs), and, at its end, why it ended."""

    text: str = ""
    ids: List[int] = field(default_factory=list)
    logprobs: List[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None

    def __add__(self, other: "Piece") -> "Piece":
        return Piece(
            self.text + other.text,
            self.ids + other.ids,
            self.logprobs + other.logprobs,
            other.finish_reason or self.finish_reason,
        )

    @property
    def empty(self) -> bool:
        return not self.text and not self.ids and self.finish_reason is None


class Shape(ABC):
    """How one endpoint's bodies look. `logprobs`: whether the request asked for them."""

    object: str
    chunk_object: str

    def __init__(self, tokenizer, logprobs: bool):
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def token_text(self, tid: int) -> str:
        return token_text(self.tokenizer, tid)

    def body(self, rid: str, model: str, fingerprint: str, choices: List[Dict], tokens: Tuple[int, int]) -> Dict:
        return {
            "id": rid,
            "object": self.object,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": choices,
            "usage": usage(*tokens),
        }

    def chunk(self, rid: str, model: str, created: int, fingerprint: str, choices: List[Dict], tokens=None) -> Dict:
        """A stream chunk; `tokens` (prompt, completion): usage in it (continuous_usage_stats, or
        the last chunk of include_usage, whose choices are empty)."""
        body = {
            "id": rid,
            "object": self.chunk_object,
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": choices,
        }
        if tokens is not None:
            body["usage"] = usage(*tokens)
        return body

    # what differs between the endpoints
    @abstractmethod
    def opening(self, index: int, echo: Optional[Piece]) -> List[Dict]:
        """The choices (one chunk each) that open a choice's stream, before its first token."""

    @abstractmethod
    def chunk_choices(self, index: int, piece: Piece) -> List[Dict]:
        """The choices (one chunk each) that carry a piece of a choice's answer."""

    @abstractmethod
    def choice(self, index: int, piece: Piece, echo: Optional[Piece]) -> Dict:
        """A whole choice of a non-streamed answer."""


class ChatShape(Shape):
    """The chat shape. With tools to read (tools.ToolSpec.parses), an answer's <tool_call> blocks
    become `tool_calls` (finish_reason "tool_calls"); streamed, text that may begin a call is held
    back, and the calls come as one delta when the answer ends."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, logprobs: bool, tools: Optional[ToolSpec] = None):
        super().__init__(tokenizer, logprobs)
        self.tools = tools if tools is not None and tools.parses else None
        self.texts: Dict[int, str] = {}  # streamed with tools: each choice's text so far
        self.sent: Dict[int, int] = {}  # and how much of it went out as content

    def content(self, piece: Piece) -> Optional[List[Dict]]:
        """OpenAI's `logprobs.content`: per token its text, logprob, UTF-8 bytes and top_logprobs."""
        if not self.logprobs:
            return None

        def entry(tid: int, lp: float) -> Dict:
            text = self.token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return [
            dict(entry(t, lp), top_logprobs=[entry(i, v) for i, v in top])
            for t, (lp, top) in zip(piece.ids, piece.logprobs)
        ]

    def _logprobs(self, piece: Piece) -> Optional[Dict]:
        entries = self.content(piece)
        return None if entries is None else {"content": entries}

    def opening(self, index: int, echo: Optional[Piece]) -> List[Dict]:
        return [
            {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        ]

    def chunk_choices(self, index: int, piece: Piece) -> List[Dict]:
        text, calls, reason = piece.text, [], piece.finish_reason
        if self.tools is not None:
            text, calls = self._stream_tools(index, piece)
            reason = "tool_calls" if calls and reason == "stop" else reason
        out = []
        if text or piece.ids:
            out.append(
                {"index": index, "delta": {"content": text}, "finish_reason": None, "logprobs": self._logprobs(piece)}
            )
        if calls:
            deltas = [dict(call, index=k) for k, call in enumerate(calls)]
            out.append({"index": index, "delta": {"tool_calls": deltas}, "finish_reason": None, "logprobs": None})
        if reason:  # OpenAI ends a choice with an empty delta carrying the reason
            out.append({"index": index, "delta": {}, "finish_reason": reason, "logprobs": None})
        return out

    def _stream_tools(self, index: int, piece: Piece) -> Tuple[str, List[Dict]]:
        """(content to send now, the calls once the answer has ended)."""
        text = self.texts[index] = self.texts.get(index, "") + piece.text
        calls: List[Dict] = []
        if piece.finish_reason is None:
            content = safe_content(text)
        else:
            _, calls = tool_calls_in(text)
            content = text if not calls else text[: text.find(OPEN)]
        delta = content[self.sent.get(index, 0) :]
        self.sent[index] = len(content)
        return delta, calls

    def choice(self, index: int, piece: Piece, echo: Optional[Piece]) -> Dict:
        message: Dict = {"role": "assistant", "content": piece.text}
        reason = piece.finish_reason
        if self.tools is not None:
            content, calls = tool_calls_in(piece.text)
            if calls:  # ("length" stays: an answer cut short may have lost a call)
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": self._logprobs(piece)}


class TextShape(Shape):
    """The legacy completions shape. text_offset counts characters of the choice's text (echoed
    prompt included), token by token, as vLLM does; the per-choice offset carries across chunks."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, tokenizer, logprobs: bool):
        super().__init__(tokenizer, logprobs)
        self.offsets: Dict[int, int] = {}

    def legacy(self, index: int, piece: Piece) -> Optional[Dict]:
        if not self.logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self.offsets.get(index, 0)
        for tid, entry in zip(piece.ids, piece.logprobs):
            token = self.token_text(tid)
            out["tokens"].append(token)
            out["text_offset"].append(offset)
            offset += len(token)
            if entry is None:  # a prompt's first token: nothing before it to predict it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp, top = entry
            out["token_logprobs"].append(lp)
            best = {self.token_text(i): v for i, v in top}
            best.setdefault(token, lp)  # the chosen token always, as OpenAI: up to logprobs + 1
            out["top_logprobs"].append(best)
        self.offsets[index] = offset
        return out

    def _choice(self, index: int, piece: Piece) -> Dict:
        return {
            "index": index,
            "text": piece.text,
            "logprobs": self.legacy(index, piece),
            "finish_reason": piece.finish_reason,
        }

    def opening(self, index: int, echo: Optional[Piece]) -> List[Dict]:
        return [self._choice(index, echo)] if echo is not None else []

    def chunk_choices(self, index: int, piece: Piece) -> List[Dict]:
        return [] if piece.empty else [self._choice(index, piece)]

    def choice(self, index: int, piece: Piece, echo: Optional[Piece]) -> Dict:
        return self._choice(index, echo + piece if echo is not None else piece)
