"""Structured output: a request's grammar turned into a token mask at every step it samples.

The grammars are llguidance's (the library vLLM and SGLang use for guided decoding; not
hand-written here): a JSON schema, a regular expression or a Lark grammar is compiled by
`grammar_from_*` into one string that travels in SamplingParams.grammar (plain text, so it crosses
the tensor-parallel broadcast like any parameter). Each rank keeps a matcher per request, fed the
same tokens, so every rank masks alike.

The mask is applied to a request's own logits row only (inside the batched step), after the logit
adjustments and before temperature / top-k / top-p; logprobs stay the model's raw log-softmax.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:  # a dependency of modeltest; only structured output needs it
        raise UserError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


def json_schema_grammar(schema: dict) -> str:
    """A JSON schema -> grammar. Compact JSON (no free whitespace between tokens): what
    OpenAI's structured outputs return, and a model cannot pad an answer with blanks forever."""
    return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def regex_grammar(pattern: str) -> str:
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def grammar_problem(grammar: str) -> Optional[str]:
    """Why the library cannot compile a grammar (one line), or None."""
    message = _llguidance().LLMatcher.validate_grammar(grammar)
    return message.strip().splitlines()[0] if message else None


class GrammarMasks:
    """Matchers for one engine's requests over its tokenizer (built on first use: ~1-2 s for
    Qwen2's 151k tokens). `stop_token_ids` end a grammar's output: once the grammar is complete
    they are all it allows."""

    def __init__(self, model_path: str, vocab_size: int, stop_token_ids: Sequence[int]):
        self.model_path, self.vocab_size, self.stop_token_ids = model_path, vocab_size, list(stop_token_ids)
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            lib = _llguidance()
            hf = AutoTokenizer.from_pretrained(self.model_path)
            self._tokenizer = lib.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=self.stop_token_ids)
        return self._tokenizer

    def matcher(self, grammar: str):
        m = _llguidance().LLMatcher(self.tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"grammar: {m.get_error()}")
        return m

    def allowed(self, matcher) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next."""
        words = (self.vocab_size + 31) // 32
        bits = np.zeros(words, dtype=np.int32)  # bit i of word w: token 32 w + i
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, words * 4)
        # numpy's unpackbits: ~50x faster than shifts in torch at 152k tokens
        return torch.from_numpy(np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(np.bool_))
