"""ASGI middleware in front of the app: the API key and the request body's size limit."""

from __future__ import annotations

import hmac
import json
from typing import Optional

from .protocol import error_body


class Gatekeeper:
    """ASGI middleware in front of the app: the API key (every path but /health) and the body
    size limit (413, checked on Content-Length and again while reading), both answered in the
    OpenAI error shape before the app sees the request."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") != "/health":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                why = "a wrong API key" if token else "no API key (send 'Authorization: Bearer KEY')"
                return await _send_error(send, 401, f"unauthorized: {why}")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                declared = int(headers.get("content-length", "0") or 0)
            except ValueError:
                declared = 0
            if declared > self.limit:
                return await _send_error(send, 413, self._too_large(declared))
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.limit:
                    return await _send_error(send, 413, self._too_large(len(body)))
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    def _too_large(self, size: int) -> str:
        return (
            f"the request body is {size} bytes, over this server's limit of {self.limit} "
            "(--max-body-mb); send media as file URLs or raise the limit"
        )


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message, code={401: "invalid_api_key", 413: "request_too_large"}.get(status)))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
