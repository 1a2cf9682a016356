"""A proxy in front of a server that misbehaves on purpose, per question: 429, 500, 400, a
dropped connection, a stall past the client's timeout, a 200 stream with an error event, a
malformed chunk, or an early end — a given number of times, then it forwards.
Counts the attempts it saw per question."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections import Counter
from typing import Dict, Tuple

import httpx

STALL_S = 20  # far past any client timeout a test sets (they set a few seconds)


def _chunk(content: str) -> bytes:
    body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    body["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return f"data: {json.dumps(body)}\n\n".encode()


STREAM_FAULTS = {
    # vLLM's and transformers serve's way of failing after the 200: an error event
    "error_event": _chunk("Hel") + b'data: {"error": {"message": "CUDA out of memory", "code": 500}}\n\n',
    "malformed": _chunk("Hel") + b"data: {not json\n\n",
    # the answer starts, then the stream ends: no finish_reason, no [DONE]
    "cut": _chunk("Hel"),
}


class FaultProxy:
    def __init__(self, upstream: str, faults: Dict[str, Tuple[str, int]], dialect: str = "vllm"):
        """faults: question substring -> (fault, how many first attempts get it). dialect: how the
        proxy takes media options — vllm (mm_processor_kwargs, as the server behind it),
        transformers (chat_template_kwargs, as `transformers serve`; mm_processor_kwargs is a
        422), plain (neither: both are a 422); not vllm, it does not say it is modeltest."""
        self.upstream, self.faults, self.attempts = upstream.rstrip("/"), faults, Counter()
        self.dialect = dialect
        self.bodies = []  # every chat request body it was sent
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                r = httpx.get(
                    proxy.upstream + self.path, headers={"Authorization": self.headers.get("Authorization", "")}
                )
                content = r.content
                if proxy.dialect != "vllm" and self.path.endswith("/models"):
                    listing = r.json()
                    for d in listing["data"]:
                        d["owned_by"] = "local"
                    content = json.dumps(listing).encode()
                self._reply(r.status_code, content, r.headers.get("content-type", "application/json"))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                parsed = json.loads(body)
                proxy.bodies.append(json.loads(body))  # as sent (parsed may be rewritten below)
                refused = {"vllm": (), "transformers": ("mm_processor_kwargs", "ignore_eos")}.get(
                    proxy.dialect, ("mm_processor_kwargs", "chat_template_kwargs", "ignore_eos")
                )
                unexpected = sorted(k for k in refused if k in parsed)
                if unexpected:  # transformers serve's answer to a field it does not know
                    detail = {"detail": f"Unexpected fields in the request: {set(unexpected)}"}
                    return self._reply(422, json.dumps(detail).encode())
                if proxy.dialect == "transformers" and "chat_template_kwargs" in parsed:
                    parsed["mm_processor_kwargs"] = parsed.pop("chat_template_kwargs")
                    body = json.dumps(parsed).encode()
                question = json.dumps(parsed.get("messages"))
                name = next((q for q in proxy.faults if q in question), None)
                n = proxy.attempts[name] = proxy.attempts[name] + 1 if name else 0
                if name and n <= proxy.faults[name][1]:
                    fault = proxy.faults[name][0]
                    if fault == "429":
                        return self._reply(
                            429,
                            json.dumps(
                                {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": 429}}
                            ).encode(),
                        )
                    if fault == "500":  # MindIE's error shape
                        return self._reply(500, json.dumps({"error": "engine overloaded", "error_type": "x"}).encode())
                    if fault == "400":  # older vLLM's flat shape
                        return self._reply(
                            400,
                            json.dumps(
                                {
                                    "object": "error",
                                    "message": "bad request: no",
                                    "type": "BadRequestError",
                                    "code": 400,
                                }
                            ).encode(),
                        )
                    if fault in STREAM_FAULTS:  # a 200 stream that goes wrong
                        return self._reply(200, STREAM_FAULTS[fault], "text/event-stream")
                    if fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if fault == "stall":
                        time.sleep(STALL_S)
                with httpx.stream(
                    "POST",
                    proxy.upstream + self.path,
                    content=body,
                    timeout=120,
                    headers={
                        "Content-Type": "application/json",
                        "Authorization": self.headers.get("Authorization", ""),
                    },
                ) as r:
                    self.send_response(r.status_code)
                    self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for chunk in r.iter_raw():
                            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                            self.wfile.flush()
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                        self.close_connection = True

            def _reply(self, status, content: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
