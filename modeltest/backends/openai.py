"""Backend `openai`: evaluate a served deployment — `modeltest serve`, vLLM, SGLang, MindIE
Service, any OpenAI-compatible chat-completions endpoint.

Each sample becomes one chat request: its images, then its videos, then its prompt, as the
in-process harness builds the conversation; media go as base64 data URLs (`media=data`, what
every server accepts) or `file://` paths (`media=file`, when the server shares the filesystem),
with the task's pixel/fps options as `mm_processor_kwargs`. Greedy (temperature 0). Requests
stream, so each sample gets its time to first token; output tokens come from `usage` in
whichever chunk carries it (else the content chunks are counted).

Up to `concurrency` requests are in flight (a thread pool). A request that fails on a
connection error, a timeout, 429 or a 5xx is retried with exponential back-off and jitter, up
to `max_retries` times; any other 4xx is not retried. A request that still fails becomes that
sample's `error` (never answer text that gets scored).
"""

from __future__ import annotations

import base64
import mimetypes
import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..core import Sample
from ..errors import SampleError, UserError, first_line
from ..inputs import sample_messages
from ..media.decode import media_parts
from .base import Backend, BackendSettings, Completed, GenerationOutput, Prepared
from .server_kind import options_field, probe_server_kind
from .traits import TRAITS

if TYPE_CHECKING:  # annotations only: the config layer imports backends' traits, not the reverse
    from ..config.schema import ModelConfig

API_KEY_ENV = "OPENAI_API_KEY"
# What records and the summary say when the task's media options did not reach the server.
SERVER_SIDE = "server-side preprocessing: options not applied"
MIME = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".bmp": "image/bmp",
    ".mp4": "video/mp4",
    ".avi": "video/x-msvideo",
    ".wmv": "video/x-ms-wmv",
}


def api_key(m: ModelConfig) -> str:
    # Servers started without a key accept any string; the openai client insists on one.
    return m.api_key or os.environ.get(API_KEY_ENV) or "EMPTY"


def server_error_message(body: Any, fallback: str = "") -> str:
    """The message of an error body in any of the shapes servers send:
    {"error": {"message": ...}} (OpenAI, current vLLM), {"object": "error", "message": ...} (older
    vLLM, SGLang), {"error": "<text>", "error_type": ...} (MindIE) — the openai client hands over
    the inner "error" value when there is one."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("detail") or fallback)
        if isinstance(inner, str):
            return inner
        return str(body.get("message") or fallback)
    if isinstance(body, str) and body:
        return body
    return fallback


def served_model_identity(m: ModelConfig) -> Dict[str, Any]:
    """What the server says it serves (GET /v1/models), for the resume key: resuming against
    another model recomputes. A server that does not answer is a one-line error, before any
    sample runs."""
    import httpx

    url = m.api_base.rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {api_key(m)}"}, timeout=min(m.timeout, 30))
    except httpx.HTTPError as e:
        raise UserError(
            f"model.api_base: no server answers at {url} ({type(e).__name__}); start it, or fix "
            "model.api_base (e.g. http://127.0.0.1:8000/v1)"
        ) from None
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if r.status_code == 401:
        raise UserError(
            f"{url}: 401 unauthorized ({server_error_message(body)}); set {API_KEY_ENV} (or "
            "model.api_key) to the server's key"
        )
    if r.status_code != 200 or not isinstance(body, dict) or not body.get("data"):
        raise UserError(
            f"{url}: HTTP {r.status_code}, not a model list ({server_error_message(body, str(body)[:120])});"
            " is model.api_base the server's /v1 address?"
        )
    models = [d for d in body["data"] if isinstance(d, dict) and "id" in d]
    names = [d["id"] for d in models]
    if m.served_model_name and m.served_model_name not in names:
        raise UserError(
            f"model.served_model_name: '{m.served_model_name}' is not served at {m.api_base} "
            f"(it serves: {', '.join(names)})"
        )
    chosen = next(d for d in models if d["id"] == (m.served_model_name or names[0]))
    kind = m.server_kind
    if kind == "auto":
        headers = {"Authorization": f"Bearer {api_key(m)}"}
        kind = probe_server_kind(m.api_base, headers, chosen["id"], chosen.get("owned_by"), min(m.timeout, 60))
    # `created` changes with every restart of some servers: not part of the identity. The server's
    # kind is: it decides whether the task's media options reach the model.
    return {
        "served": {k: chosen.get(k) for k in ("id", "root", "max_model_len", "owned_by") if k in chosen},
        "server_kind": kind,
    }


class _Retryable(Exception):
    """A failed attempt worth another; `answer`: the server answered it (a 5xx, an error event, a
    malformed or cut stream), as opposed to a failed connection or a rate limit."""

    def __init__(self, message: str, answer: bool = False):
        super().__init__(message)
        self.answer = answer


class OpenAIBackend(Backend):
    name = "openai"
    traits = TRAITS["openai"]

    def __init__(self, settings: BackendSettings):
        super().__init__(settings)
        from openai import OpenAI

        m = self.model_cfg
        self.identity = served_model_identity(m)
        self.served_name = self.identity["served"]["id"]
        self.server_kind = self.identity["server_kind"]
        if options_field(self.server_kind) is None and m.send_preprocessing:
            raise UserError(
                f"model.api_base: the server at {m.api_base} takes no per-request media options (server "
                "kind: plain — neither mm_processor_kwargs nor chat_template_kwargs), so the task's pixel "
                "and fps options would not be applied; start the server with them, or set "
                "model.send_preprocessing=false to run on the server's own preprocessing (every record "
                "and the summary then say so)"
            )
        # Retries are ours (which statuses, back-off with jitter, recorded errors), not the client's.
        self.client = OpenAI(base_url=m.api_base, api_key=api_key(m), max_retries=0, timeout=m.timeout)
        self.pool = ThreadPoolExecutor(max_workers=m.concurrency, thread_name_prefix="request")
        self._inflight: Dict[Future, Prepared] = {}

    # ---- the contract -----------------------------------------------------------------------
    def prepare(self, sample: Sample) -> Prepared:
        start = time.perf_counter()
        conversation = sample_messages(sample)  # what an in-process backend hands the processor
        messages = [{"role": m["role"], "content": [self._part(p) for p in m["content"]]} for m in conversation]
        return Prepared(
            sample=sample,
            text=sample.prompt,
            preprocess_time=time.perf_counter() - start,
            request={"messages": messages, "extra": self._hints(conversation)},
        )

    def submit(self, prepared: Prepared, max_new_tokens: int, ignore_eos: bool = False) -> None:
        fut = self.pool.submit(self._call, prepared, max_new_tokens, ignore_eos, time.perf_counter())
        self._inflight[fut] = prepared

    def step(self) -> List[Completed]:
        if not self._inflight:
            return []
        done, _ = wait(list(self._inflight), return_when=FIRST_COMPLETED)
        return [(self._inflight.pop(f), f.result()) for f in done]

    def pending(self) -> int:
        return len(self._inflight)

    def queue_depth(self, batch_size: int) -> int:
        return self.model_cfg.concurrency

    def describe(self) -> Dict[str, Any]:
        m = self.model_cfg
        return {
            "backend": self.name,
            "api_base": m.api_base,
            "served_model": self.identity["served"],
            "server_kind": self.server_kind,
            "preprocessing": self.preprocessing,
            "media": m.media,
            "concurrency": m.concurrency,
            "max_retries": m.max_retries,
            "timeout": m.timeout,
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- one request ------------------------------------------------------------------------
    def _media_url(self, path: str, kind: str) -> str:
        p = Path(path)
        if not p.is_file():
            raise SampleError(f"{kind} not found: {path}")
        if p.stat().st_size == 0:
            raise SampleError(f"{kind} is empty (0 bytes): {path}")
        if self.model_cfg.media == "file":
            return p.resolve().as_uri()
        mime = MIME.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or f"{kind}/octet-stream"
        return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")

    def _part(self, part: Dict[str, Any]) -> Dict[str, Any]:
        """A conversation part in the OpenAI chat format: text as it is, a local medium as an
        image_url / video_url (its options travel once per request, as mm_processor_kwargs)."""
        kind = part["type"]
        if kind == "text":
            return {"type": "text", "text": part["text"]}
        return {"type": f"{kind}_url", f"{kind}_url": {"url": self._media_url(str(part[kind]), kind)}}

    @property
    def preprocessing(self) -> str:
        """Whose preprocessing the model's input follows (records and summary say it)."""
        if self.model_cfg.send_preprocessing:
            return f"task options via {options_field(self.server_kind)}"
        return SERVER_SIDE

    def _hints(self, conversation: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The media parts' preprocessing options (videos' where there are videos: they carry the
        pixel bounds too), in the field the server's kind reads them from."""
        field = options_field(self.server_kind)
        if not self.model_cfg.send_preprocessing or field is None:
            return {}
        parts = media_parts(conversation)
        part = next((p for p in parts if p["type"] == "video"), parts[0] if parts else None)
        opts = {k: v for k, v in (part or {}).items() if k not in ("type", "image", "video") and v is not None}
        return {field: opts} if opts else {}

    def _call(self, prepared: Prepared, max_new_tokens: int, ignore_eos: bool, submitted: float) -> GenerationOutput:
        """Attempts with back-off. When every attempt got the same failing answer from the server
        (a 5xx with the same body, the same error event, the same broken stream), the server is
        answering this sample, not having a bad moment: the error is permanent, and a rerun keeps
        it. Connection failures, 429 and answers that changed stay transient (a rerun retries)."""
        m = self.model_cfg
        failures: List[_Retryable] = []
        for attempt in range(m.max_retries + 1):
            if attempt:
                time.sleep(m.retry_backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                return self._stream_once(prepared, max_new_tokens, ignore_eos, submitted)
            except _Retryable as e:
                failures.append(e)
            except _Final as e:
                return GenerationOutput(text="", error=str(e))
        last = str(failures[-1])
        if len(failures) > 1 and all(f.answer and str(f) == last for f in failures):
            return GenerationOutput(text="", error=f"{last} (the same answer {len(failures)} times)")
        return GenerationOutput(text="", error=f"{last} (after {m.max_retries} retries)", transient=True)

    def _stream_once(
        self, prepared: Prepared, max_new_tokens: int, ignore_eos: bool, submitted: float
    ) -> GenerationOutput:
        import httpx
        import openai

        extra = dict(prepared.request["extra"])
        if ignore_eos:
            extra["ignore_eos"] = True
        start = time.perf_counter()
        first: Optional[float] = None
        parts: List[str] = []
        usage = None
        chunks = 0
        finished = False
        try:
            stream = self.client.chat.completions.create(
                model=self.served_name,
                messages=prepared.request["messages"],
                max_tokens=max_new_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra or None,
            )
            for chunk in stream:
                if getattr(chunk, "usage", None):
                    usage = chunk.usage
                for choice in chunk.choices or []:
                    finished = finished or bool(choice.finish_reason)
                    text = getattr(choice.delta, "content", None) if choice.delta else None
                    if text:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(text)
                        chunks += 1
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise _Retryable(f"request failed: {first_line(e)}") from None
        except httpx.TransportError as e:  # mid-stream: a reset, a connection the server dropped
            raise _Retryable(f"the connection broke mid-answer: {first_line(e)}") from None
        except openai.APIStatusError as e:
            message = f"HTTP {e.status_code} from the server: {server_error_message(e.body, e.message)}"
            if e.status_code == 429:
                raise _Retryable(message) from None
            if e.status_code >= 500:
                raise _Retryable(message, answer=True) from None
            raise _Final(message) from None
        except openai.APIError as e:  # an error event inside a 200 stream
            raise _Retryable(
                f"the server sent an error mid-answer: {server_error_message(e.body, e.message)}", answer=True
            ) from None
        except ValueError as e:  # a chunk that is not JSON (or not a chunk)
            raise _Retryable(f"the server sent a malformed stream chunk: {first_line(e, 160)}", answer=True) from None
        if not finished:
            raise _Retryable("the stream ended before the answer did (no finish_reason)", answer=True)
        end = time.perf_counter()
        return GenerationOutput(
            text="".join(parts),
            input_length=(usage.prompt_tokens if usage else 0) or 0,
            num_tokens=usage.completion_tokens if usage and usage.completion_tokens is not None else chunks,
            e2e_time=end - start,
            queue_time=start - submitted,
            prefill_time=(first - start) if first is not None else None,
            decode_time=(end - first) if first is not None else None,
            preprocessing=None if self.model_cfg.send_preprocessing else SERVER_SIDE,
        )


class _Final(Exception):
    """A request error that retrying cannot fix (a 4xx other than 429)."""
