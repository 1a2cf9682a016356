"""Token ids -> the text a client reads, incrementally, by the engine's stop-token rule
(engine/request.visible_ids)."""

from __future__ import annotations

from typing import List, Sequence

from ..engine.request import RequestStatus, visible_ids


class Detokenizer:
    """Token ids -> text for one request: the stop token left out (as in-process runs decode),
    `stop` strings cut, and in streaming only text that can no longer change is emitted (an
    incomplete UTF-8 character or a possible start of a stop string is held back).

    Decoding is incremental (each step decodes its new tokens with the few before them, as vLLM
    does), so a long answer costs the event loop linear, not quadratic, work; the final text is
    one full decode, exactly what the in-process engine returns."""

    def __init__(self, tokenizer, stop: List[str], stop_token_ids: Sequence[int], ignore_eos: bool):
        self.tokenizer, self.stop, self.ignore_eos = tokenizer, stop, ignore_eos
        self.stop_token_ids = tuple(stop_token_ids)
        self.ids: List[int] = []
        self.sent = ""
        self.stopped_by_string = False
        self._text = ""
        self._decoded = ""  # text of the visible ids[:_read]
        self._prefix = self._read = 0
        self._longest_stop = max((len(s) for s in stop), default=0)

    def _visible(self) -> List[int]:
        return visible_ids(self.ids, self.stop_token_ids, self.ignore_eos)

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _decode_new(self) -> None:
        ids = self._visible()
        before = self._decode(ids[self._prefix : self._read])
        now = self._decode(ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # a whole new character
            self._decoded += now[len(before) :]
            self._prefix, self._read = self._read, len(ids)

    def _cut_at_stop(self, text: str, start: int) -> str:
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped_by_string = True
            return text[:cut]
        return text

    def add(self, token_ids: List[int]) -> str:
        """Take new tokens; return the text delta safe to send now (nothing once a stop string
        has ended the text: tokens the engine made before it heard are dropped)."""
        if self.stopped_by_string:
            return ""
        self.ids += token_ids
        searched = max(0, len(self._decoded) - self._longest_stop + 1)
        self._decode_new()
        text = self._text = self._cut_at_stop(self._decoded, searched)
        if self.stopped_by_string:
            return self._delta(text)
        safe = text[: len(text) - (self._longest_stop - 1)] if self._longest_stop > 1 else text
        return self._delta(safe)

    def finish(self) -> str:
        """The rest of the text once the request has ended (the final text: one full decode)."""
        if not self.stopped_by_string:
            self._text = self._cut_at_stop(self._decode(self._visible()), 0)
        return self._delta(self._text)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def kept_tokens(self) -> int:
        """How many generated tokens the answer holds: the visible ones, or — a stop string having
        cut the text — those up to the one that completes it."""
        ids = self._visible()
        if not self.stopped_by_string:
            return len(ids)
        return next((k for k in range(len(ids) + 1) if len(self._decode(ids[:k])) >= len(self._text)), len(ids))

    @property
    def text(self) -> str:
        return self._text

    def finish_reason(self, status: RequestStatus, max_tokens: int) -> str:
        if self.stopped_by_string:
            return "stop"
        if status is RequestStatus.ABORTED:
            return "abort"
        if len(self._visible()) < len(self.ids):  # ended on a stop token
            return "stop"
        return "length" if len(self.ids) >= max_tokens else "stop"
