"""The (legacy) completions request, /v1/completions: raw text or token ids in, no chat template,
no media. What log-likelihood evaluation sends (`echo: true, logprobs: 1, max_tokens: 0 or 1`:
the logprob of every prompt token) and what benchmark tools send in completions mode. The
sampling fields are protocol.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Union

from .protocol import (
    MAX_LOGPROBS,
    SAMPLING_FIELDS,
    GenerationRequest,
    RequestError,
    check_fields,
    generation_fields,
    number,
)

COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) for completions, when a request names none
MAX_PROMPTS = 64  # prompts in one request at most


@dataclass
class CompletionRequest(GenerationRequest):
    prompts: List[Union[str, List[int]]] = field(default_factory=list)  # each: text, or token ids
    echo: bool = False  # the prompt before the completion (text, and its tokens' logprobs)


def _prompts(value: Any) -> List[Union[str, List[int]]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists."""

    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        prompts = [value]
    elif ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
        prompts = list(value)
    else:
        raise RequestError(
            400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of those", "prompt"
        )
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(400, f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}", "prompt")
    for i, p in enumerate(prompts):
        if p == "":
            raise RequestError(400, f"prompt[{i}] is empty", "prompt")
        if isinstance(p, list) and min(p) < 0:
            raise RequestError(400, f"prompt[{i}]: token ids are never negative", "prompt")
    return prompts


def parse_completion_request(body: Any) -> CompletionRequest:
    """A completions body (already JSON-decoded) -> CompletionRequest, or RequestError(400)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise RequestError(400, "'prompt' is required", "prompt")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError(400, f"'echo' must be true or false, got {echo!r}", "echo")
    max_tokens = number(body, "max_tokens", int, DEFAULT_MAX_TOKENS, low=0)
    if max_tokens == 0 and not echo:
        raise RequestError(400, "'max_tokens' 0 only with 'echo': true (scoring the prompt)", "max_tokens")
    logprobs = number(body, "logprobs", int, None, low=0, high=MAX_LOGPROBS)
    return CompletionRequest(
        **generation_fields(body),
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo else None,
        prompts=_prompts(body["prompt"]),
        echo=echo,
    )
