"""What both OpenAI endpoints share (chat_protocol.py: /v1/chat/completions; text_protocol.py:
/v1/completions): errors, which request fields are used, refused or unknown, the sampling fields
and their checks, the server's sampling defaults, usage and model cards. Imports nothing of the
engine.

Every problem with a request raises `RequestError`, which the app answers with its HTTP status and
an OpenAI-shaped body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .structured import FieldProblem, structured_output


class RequestError(Exception):
    """A request the server will not run: HTTP status, message, and the offending parameter."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {
            400: "invalid_request",
            401: "invalid_api_key",
            404: "model_not_found",
            413: "request_too_large",
            415: "unsupported_media_type",
            503: "unavailable",
        }.get(status, "error")


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


# ---- which fields a request may carry ----------------------------------------------------------
# Every request field, by what the server does with it (README "Serving" lists them). Anything a
# client sends is either used, refused by name (400), or — an extension we do not know — run
# without it and named once in the log: never silently ignored.
SAMPLING_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",  # an end-user id for the caller's own records: changes no output
    "top_k",
    "ignore_eos",
    "repetition_penalty",
    "min_tokens",
    "response_format",  # structured output (structured.py)
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",  # vLLM's extensions, implemented
}
# OpenAI API fields (and vLLM extensions) that change what is generated and are not implemented:
# refused unless at the value that means "off".
NOT_IMPLEMENTED = {
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),  # meaningless without tools, refused with them
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "best_of": (1,),
    "use_beam_search": (False,),
    "prompt_logprobs": (0,),
    "suffix": ("",),
}
# Fields about the caller's account or storage at OpenAI: no meaning here, accepted.
NO_EFFECT = {"metadata", "store", "service_tier"}
_warned: set = set()


def check_fields(body: Dict, used: set) -> None:
    """Refuse (400) a field that would change the output and is not implemented; log once each
    unknown field name (the request runs without it). `used`: the endpoint's implemented fields."""
    for key, value in body.items():
        if key in used or key in NO_EFFECT:
            continue
        if key in NOT_IMPLEMENTED:
            if value is None or value in NOT_IMPLEMENTED[key]:
                continue
            raise RequestError(
                400, f"'{key}' is not implemented by this server (README, Serving: what is supported)", key
            )
        warn_unknown(key)


def warn_unknown(name: str) -> None:
    """Name a request field this server does not know in its log, once per field name."""
    if name not in _warned:
        _warned.add(name)
        logging.getLogger("modeltest.serve").warning("request field '%s' is unknown to this server: not used", name)


# ---- the sampling fields both endpoints share -------------------------------------------------
MAX_CHOICES = 16  # n at most
MAX_LOGPROBS = 20  # top logprobs per token at most (vLLM's default max_logprobs)


@dataclass
class GenerationRequest:
    """What decides the tokens of a request and how they are sent, whichever endpoint it came by."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None  # None: the endpoint's default
    # None: the server's default (the model's generation_config.json, else OpenAI's 1.0 / 1.0 / off)
    temperature: Optional[float] = None  # 0 = greedy
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # 0 or -1: no top-k cut
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage in every chunk
    logprobs: Optional[int] = None  # this many top logprobs per generated token (0..20); None: off
    prompt_logprobs: Optional[int] = None  # the same for each prompt token (completions' echo)
    # logit adjustments (engine/logits.py), the SamplingParams fields of the same names
    adjust: Dict[str, Any] = field(default_factory=dict)
    n: int = 1  # choices; choice i of a sampled request draws with seed + i
    grammar: Optional[str] = None  # structured output: the llguidance grammar the answer follows

    def sampling(self, defaults: "SamplingDefaults", max_output_length: int) -> Dict[str, Any]:
        """The request's sampling parameters, with the server's defaults where it names none
        (the engine's SamplingParams fields; a seed drawn here for a sampled request without one),
        or RequestError(400). max_tokens 0 (a completions request that only scores its prompt)
        runs one token, which the answer leaves out."""
        max_tokens = self.max_tokens if self.max_tokens is not None else max_output_length
        if max_tokens > max_output_length:
            raise RequestError(
                400,
                f"max_tokens {max_tokens} is over this server's max_output_length {max_output_length}",
                "max_tokens",
            )
        temperature = defaults.temperature if self.temperature is None else self.temperature
        top_p = defaults.top_p if self.top_p is None else self.top_p
        top_k = defaults.top_k if self.top_k is None else max(self.top_k, 0)
        if top_p <= 0:
            raise RequestError(400, "'top_p' must be above 0", "top_p")
        seed = self.seed if self.seed is not None else (secrets.randbits(62) if temperature > 0 else None)
        if self.adjust.get("min_tokens", 0) > max_tokens:
            raise RequestError(400, f"'min_tokens' is over max_tokens {max_tokens}", "min_tokens")
        return dict(
            max_new_tokens=max(max_tokens, 1),
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            **self.adjust,
            ignore_eos=self.ignore_eos,
            grammar=self.grammar,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        )


def generation_fields(body: Dict) -> Dict[str, Any]:
    """The GenerationRequest fields both endpoints read the same way, checked (not max_tokens and
    logprobs, whose forms differ)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", "model")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of non-empty strings", "stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    unknown = sorted(set(stream_options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        where = f"stream_options.{unknown[0]}"
        raise RequestError(400, f"'{where}' is not implemented by this server", where)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    try:
        grammar = structured_output(body)
    except FieldProblem as e:
        raise RequestError(400, e.message, e.param) from None
    return dict(
        model=model,
        temperature=_optional_float(number(body, "temperature", (int, float), None, low=0, high=2)),
        top_p=_optional_float(number(body, "top_p", (int, float), None, low=0, high=1)),
        top_k=number(body, "top_k", int, None, low=-1),
        seed=seed,
        stop=stop,
        ignore_eos=bool(body.get("ignore_eos", False)),
        stream=bool(body.get("stream", False)),
        include_usage=bool(stream_options.get("include_usage", False)),
        continuous_usage=bool(stream_options.get("continuous_usage_stats", False)),
        adjust=_adjustments(body),
        n=number(body, "n", int, 1, low=1, high=MAX_CHOICES),
        grammar=grammar,
    )


def number(body: Dict, key: str, kind, default, low=None, high=None):
    """body[key] checked to be a number of `kind` within [low, high], or `default` when absent."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(400, f"'{key}' must be a {'number' if kind is not int else 'integer'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(400, f"'{key}' must be {bounds}, got {value!r}", key)
    return value


def _adjustments(body: Dict) -> Dict[str, Any]:
    """Penalties, logit_bias and min_tokens of a request, checked; only those it sets."""
    out: Dict[str, Any] = {}
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) is not None:
            out[key] = float(number(body, key, (int, float), 0, low=-2, high=2))
    rep = number(body, "repetition_penalty", (int, float), None, low=0)
    if rep is not None:
        if rep <= 0:
            raise RequestError(400, "'repetition_penalty' must be above 0", "repetition_penalty")
        out["repetition_penalty"] = float(rep)
    if body.get("min_tokens") is not None:
        out["min_tokens"] = number(body, "min_tokens", int, 0, low=0)
    bias = body.get("logit_bias")
    if bias:
        if not isinstance(bias, dict):
            raise RequestError(400, "'logit_bias' must be an object of token id -> bias", "logit_bias")
        try:
            parsed = {int(k): float(v) for k, v in bias.items() if not isinstance(v, bool)}
        except (TypeError, ValueError):
            parsed = {}
        if len(parsed) != len(bias) or any(not -100 <= v <= 100 for v in parsed.values()):
            raise RequestError(400, "'logit_bias' maps token ids to biases in -100..100", "logit_bias")
        out["logit_bias"] = parsed
    return out


def _optional_float(x) -> Optional[float]:
    return None if x is None else float(x)


@dataclass
class SamplingDefaults:
    """What a request that names no temperature / top_p / top_k gets: the model's
    generation_config.json where it has one (as vLLM does), else OpenAI's defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_model(cls, model_path: str) -> "SamplingDefaults":
        try:
            g = json.loads((Path(model_path) / "generation_config.json").read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(g, dict):
            return cls()
        if g.get("do_sample") is False:
            return cls(temperature=0.0)
        return cls(
            temperature=float(g.get("temperature", 1.0)),
            top_p=float(g.get("top_p", 1.0)),
            top_k=int(g.get("top_k") or 0),
        )


# ---- bodies both endpoints answer with ---------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, max_model_len: int, root: str) -> Dict:
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "modeltest",
        "root": root,
        "max_model_len": max_model_len,
    }


def models_body(name: str, max_model_len: int, root: str) -> Dict:
    return {"object": "list", "data": [model_card(name, max_model_len, root)]}
