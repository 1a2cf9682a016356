"""How a served deployment takes a request's media options (pixel bounds, fps) — its dialect.

    vllm          `mm_processor_kwargs` (vLLM, SGLang, `modeltest serve`)
    transformers  `chat_template_kwargs` (`transformers serve`: it hands them to the processor)
    plain         neither: the server preprocesses media its own way

`model.server_kind=auto` settles it before the run: a server whose /v1/models says it is vLLM or
modeltest is `vllm`; any other is sent one tiny request (one token) with the options in
`mm_processor_kwargs`, then in `chat_template_kwargs`, and the first it accepts is its dialect.
A server that accepts a field it then ignores cannot be told apart this way: name its kind.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

OPTIONS_FIELD = {"vllm": "mm_processor_kwargs", "transformers": "chat_template_kwargs", "plain": None}
KNOWN_OWNERS = {"vllm": "vllm", "modeltest": "vllm", "sglang": "vllm"}
PROBE_OPTIONS = {"max_pixels": 50176}  # harmless: the probe has no media


def options_field(kind: str) -> Optional[str]:
    """The request field that carries media options for a dialect (None: the server has none)."""
    return OPTIONS_FIELD[kind]


_probed: Dict[Tuple[str, str], str] = {}  # (api_base, model) -> kind, once per process


def probe_server_kind(api_base: str, headers: Dict[str, str], model: str, owned_by: Any, timeout: float) -> str:
    """The dialect of the server at api_base (see the module's docstring). Probed once per
    process: the run's resume keys and its backend both ask."""
    if isinstance(owned_by, str) and owned_by.lower() in KNOWN_OWNERS:
        return KNOWN_OWNERS[owned_by.lower()]
    if (api_base, model) not in _probed:
        _probed[(api_base, model)] = _probe(api_base, headers, model, timeout)
    return _probed[(api_base, model)]


def _probe(api_base: str, headers: Dict[str, str], model: str, timeout: float) -> str:
    import httpx

    from ..errors import UserError

    url = api_base.rstrip("/") + "/chat/completions"
    base = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    answers = []
    for kind in ("vllm", "transformers", "plain"):
        field = options_field(kind)
        body = dict(base, **{field: PROBE_OPTIONS}) if field else base
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as e:
            answers.append(type(e).__name__)
            continue
        if r.status_code == 200:
            return kind
        answers.append(f"HTTP {r.status_code}")
    raise UserError(
        f"{url}: the server answers no one-token chat request ({', '.join(answers)}); check it serves "
        f"'{model}', or set model.server_kind (vllm, transformers, plain) to skip this probe"
    )
