"""Start a real `modeltest serve` process on 127.0.0.1 and compute what the in-process engine
answers to the same messages (the harness's preprocessing path)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("choose another --port", "address already in use", "EADDRINUSE", "DistNetworkError")


class ServerProcess:
    """A `modeltest serve` process on free ports. A free port can be taken by another process
    between finding it and binding it: a server that exits saying so is started again on new
    ports (a few times), instead of failing the test."""

    def __init__(self, model: Path, *args: str, env: Optional[dict] = None, wait: bool = True, attempts: int = 3):
        self.model, self.args, self.extra_env, self.attempts = model, args, env, attempts
        self.log = open(os.devnull, "w")
        self._start()
        if wait:
            self.wait_healthy()

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, MASTER_PORT=str(free_port()), **(self.extra_env or {}))
        cmd = [sys.executable, "-m", "modeltest", "serve", "--model_path", str(self.model), "--port", str(self.port)]
        # Files, not pipes: a server's log (a line per request) must never fill a pipe nobody reads
        # until the end, and a test can read what it logged so far.
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [*cmd, *self.args],
            stdout=self.out,
            stderr=self.err,
            text=True,
            env=env,
            start_new_session=True,
        )

    def output(self):
        """(stdout, stderr) written so far."""
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read())
        return tuple(texts)

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                out, err = self.output()
                if self.attempts > 1 and any(t.lower() in err.lower() for t in PORT_TAKEN):
                    self.attempts -= 1
                    self._start()
                    continue
                raise AssertionError(f"server exited {self.proc.returncode}:\n{out}\n{err}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become healthy")

    def stop(self, sig=signal.SIGTERM, timeout: float = 120):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGINT else self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        out, err = self.output()
        return self.proc.returncode, out, err


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def in_process_answer(engine, processor, content: List[dict], max_tokens: int):
    """(text, prompt_tokens, completion_tokens) the in-process engine gives for one user turn
    whose parts are qwen-vl-utils elements (local paths + options), greedily."""
    from modeltest.engine.request import SamplingParams
    from modeltest.inputs import engine_request, model_input

    mi = model_input(processor, [{"role": "user", "content": content}])
    req = engine.generate([engine_request("x", mi, SamplingParams(max_new_tokens=max_tokens))])[0]
    ids = req.generated_ids()
    return processor.tokenizer.decode(ids, skip_special_tokens=False), mi.prompt_tokens, len(req.output_ids)


class StreamingRequest:
    """A long streamed chat request in a thread: `first_token` is set once text has arrived (so a
    test acts on a request that is really in flight, not after a guessed sleep); afterwards
    `status`, `finish_reason`, `done` (the [DONE] line came) and `text` say how it ended."""

    def __init__(self, url: str, max_tokens: int = 2000):
        import threading

        self.url, self.max_tokens = url, max_tokens
        self.first_token = threading.Event()
        self.status = self.finish_reason = self.error = None
        self.done, self.text = False, ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import json

        body = {
            "messages": [{"role": "user", "content": "A long story"}],
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        break
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        self.text += (choice.get("delta") or {}).get("content") or ""
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if self.text:
                        self.first_token.set()
        except httpx.HTTPError as e:
            self.error = type(e).__name__
        finally:
            self.first_token.set()  # never leave a waiter hanging: the checks below say what happened

    def join(self, timeout: float = 60) -> None:
        self.thread.join(timeout)
