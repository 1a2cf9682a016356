"""transformers' Qwen2-VL processor (tokenizer, chat template, image processor), loaded once and
lent to threads."""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any, List

from ..errors import UserError, first_line
from . import fast_processor


def load_processor(model_path: str, fast: bool = False):
    """The processor from the weights folder; fast=True gives it fast_processor's bit-identical
    image processor."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path)
        return fast_processor.install(processor) if fast else processor
    except Exception as e:
        raise UserError(
            f"model.model_path: cannot load the processor/tokenizer from '{model_path}' "
            f"({first_line(e, 200, with_type=False)}); the folder needs the tokenizer and "
            "preprocessor_config.json of a Qwen2-VL checkpoint"
        ) from None


class ProcessorCopies:
    """Copies of a processor, each lent to one thread at a time: preprocessing runs in background
    threads, and a fast tokenizer shared between threads can fail ("Already borrowed").

    A copy costs about a second (the tokenizer), so copies are kept and lent again — across the
    thread pools of successive runs too — rather than made per thread. They are made from a
    master that is never lent (copying a tokenizer while another thread encodes with it can fail
    the same way)."""

    def __init__(self, processor):
        self.processor = processor
        self._free: List[Any] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self):
        with self._lock:
            proc = self._free.pop() if self._free else copy.deepcopy(self.processor)
        try:
            yield proc
        finally:
            with self._lock:
                self._free.append(proc)
