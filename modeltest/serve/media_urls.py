"""Turn the media URLs of a request into local files qwen-vl-utils reads, refusing what the
server must not read (README "Serving": media).

    data:<mime>;base64,...      decoded into a temporary file (removed after preprocessing)
    raw base64 (no data: prefix, as MindIE accepts)   the same
    file:///abs/path, /abs/path read only under --allowed-local-media-path (symlinks and ".."
                                resolved first, so neither escapes it); refused without it
    http(s)://...               only with --allow-remote-media: fetched with a timeout and a size cap

A video given as a list of frames (`data:video/jpeg;base64,<f1>,<f2>,...`) is refused, as in the
reference. Every refusal is a RequestError naming the part of the body at fault.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

from .chat_protocol import MediaPart
from .protocol import RequestError

EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/png": ".png",
    "image/bmp": ".bmp",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "video/mp4": ".mp4",
    "video/avi": ".avi",
    "video/x-msvideo": ".avi",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-ms-wmv": ".wmv",
}
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")


class MediaResolver:
    def __init__(
        self, allowed_local_path: Optional[str], allow_remote: bool, remote_timeout_s: float, max_remote_bytes: int
    ):
        self.allowed = Path(allowed_local_path).resolve() if allowed_local_path else None
        self.allow_remote = allow_remote
        self.remote_timeout_s = remote_timeout_s
        self.max_remote_bytes = max_remote_bytes

    def resolve(self, part: MediaPart, workdir: Path) -> str:
        """A local file path holding the media of `part` (written under `workdir` if it had to be
        decoded or downloaded)."""
        url = part.url.strip()
        if url.startswith("data:"):
            return self._data_url(part, url, workdir)
        if url.startswith(("http://", "https://")):
            return self._remote(part, url, workdir)
        if url.startswith("file://"):
            return self._local(part, url[len("file://") :])
        if url.startswith("/"):
            return self._local(part, url)
        if len(url) > 64 and _BASE64.match(url[:4096]):
            return self._write(part, self._b64decode(part, url), "", workdir)
        raise RequestError(
            400,
            f"{part.param}: unsupported {part.kind} URL '{url[:60]}' (use a data: URL, "
            "file:///absolute/path, an absolute path or http(s)://)",
            part.param,
        )

    # ---- forms ------------------------------------------------------------------------------
    def _data_url(self, part: MediaPart, url: str, workdir: Path) -> str:
        header, comma, data = url[len("data:") :].partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(400, f"{part.param}: a data URL must be data:<mime>;base64,<data>", part.param)
        mime = header[: -len(";base64")].split(";")[0].strip().lower()
        if part.kind == "video" and "," in data:
            raise RequestError(
                400,
                f"{part.param}: a video given as a list of frames is not supported (as in "
                "the reference); send one video file (data:video/mp4;base64,... or a file URL)",
                part.param,
            )
        if mime and not mime.startswith(part.kind + "/"):
            raise RequestError(400, f"{part.param}: a {mime} data URL in a {part.kind} part", part.param)
        return self._write(part, self._b64decode(part, data), EXTENSIONS.get(mime, ""), workdir)

    def _b64decode(self, part: MediaPart, data: str) -> bytes:
        try:
            raw = base64.b64decode(data, validate=True) if "\n" not in data else base64.b64decode(data)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{part.param}: the base64 data cannot be decoded", part.param) from None
        if not raw:
            raise RequestError(400, f"{part.param}: the base64 data is empty", part.param)
        return raw

    def _local(self, part: MediaPart, path: str) -> str:
        if self.allowed is None:
            raise RequestError(
                400,
                f"{part.param}: local files are not served; start the server with "
                "--allowed-local-media-path DIR to allow files under DIR",
                part.param,
            )
        real = Path(os.path.realpath(path))  # resolves "..", and symlinks anywhere on the way
        if real != self.allowed and self.allowed not in real.parents:
            raise RequestError(
                400,
                f"{part.param}: '{path}' is outside --allowed-local-media-path ({self.allowed})",
                part.param,
                code="forbidden_path",
            )
        if not real.is_file():
            raise RequestError(400, f"{part.param}: {part.kind} file not found: {path}", part.param)
        return str(real)

    def _remote(self, part: MediaPart, url: str, workdir: Path) -> str:
        if not self.allow_remote:
            raise RequestError(
                400,
                f"{part.param}: remote media is off; send a data: URL, or start the server with --allow-remote-media",
                part.param,
            )
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.remote_timeout_s, follow_redirects=True) as r:
                r.raise_for_status()
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > self.max_remote_bytes:
                        raise RequestError(
                            400,
                            f"{part.param}: {url} is over the {self.max_remote_bytes} byte limit for remote media",
                            part.param,
                        )
                    chunks.append(chunk)
                mime = r.headers.get("content-type", "").split(";")[0].strip().lower()
        except httpx.HTTPError as e:
            raise RequestError(400, f"{part.param}: cannot fetch {url} ({type(e).__name__})", part.param) from None
        suffix = EXTENSIONS.get(mime) or Path(url.split("?")[0]).suffix
        return self._write(part, b"".join(chunks), suffix, workdir)

    @staticmethod
    def _write(part: MediaPart, data: bytes, suffix: str, workdir: Path) -> str:
        fd, name = tempfile.mkstemp(prefix=part.kind + "-", suffix=suffix, dir=workdir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return name
