"""Does `modeltest serve`'s memory level off? Start a server, send it a mix of requests for a
while (chat text, an image, a video, streamed and not, completions with echo and logprobs,
JSON-schema output; concurrency 8), and sample the server's resident memory (its process and
children) every few seconds. Prints one line per sample and writes JSON.

    python docs/perf/serve_soak.py MODEL_DIR MEDIA_DIR --minutes 10 --json out.json

MEDIA_DIR must hold demo_000.jpg and clip.mp4 (the demo's image and a video).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def requests(media: Path):
    img = {"type": "image_url", "image_url": {"url": f"file://{media / 'demo_000.jpg'}"}}
    vid = {"type": "video_url", "video_url": {"url": f"file://{media / 'clip.mp4'}"}}
    q = {"type": "text", "text": "What is shown?"}
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    chat = "/v1/chat/completions"
    return [
        (chat, {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32}),
        (chat, {"messages": [{"role": "user", "content": [img, q]}], "max_tokens": 16, "stream": True}),
        (chat, {"messages": [{"role": "user", "content": [vid, q]}], "max_tokens": 16}),
        (
            chat,
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "logprobs": True, "top_logprobs": 5},
        ),
        (
            chat,
            {
                "messages": [{"role": "user", "content": "JSON please"}],
                "max_tokens": 32,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
            },
        ),
        ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 0, "echo": True, "logprobs": 1}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("media")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--port", type=int, default=8611)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    media = Path(args.media).resolve()
    cmd = [sys.executable, "-m", "modeltest", "serve", "--model_path", args.model, "--port", str(args.port)]
    cmd += ["--allowed-local-media-path", str(media), "--max_batch_size", "8"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    kinds = requests(media)
    stop = time.time() + args.minutes * 60
    counts = {"sent": 0, "5xx": 0, "failed": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=300) as http:
            while time.time() < stop:
                path, body = rng.choice(kinds)
                try:
                    r = http.post(url + path, json={"model": Path(args.model).name, **body})
                    code = r.status_code
                except httpx.HTTPError:
                    code = 0
                with lock:
                    counts["sent"] += 1
                    counts["5xx"] += code >= 500
                    counts["failed"] += code != 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    samples, start = [], time.time()
    while time.time() < stop:
        samples.append({"s": round(time.time() - start, 1), "rss_mb": round(rss_mb(server.pid), 1), **counts})
        print(samples[-1], flush=True)
        time.sleep(15)
    for t in threads:
        t.join()
    server.terminate()
    server.wait(60)
    out = {"minutes": args.minutes, "model": args.model, "requests": counts, "samples": samples}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
