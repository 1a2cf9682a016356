"""`modeltest serve`: a real server process on 127.0.0.1 with the tiny model, driven by the
official `openai` client and by raw HTTP (httpx)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import ServerProcess, StreamingRequest, data_url, in_process_answer

pytestmark = pytest.mark.subprocess

KEY = "test-key-123"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def media(demo, tmp_path_factory):
    """The allowed media folder: demo images and a video, a corrupt video, a file outside it and
    a symlink that points there."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    for name in ("demo_000.jpg", "demo_001.jpg", "demo_002.jpg"):
        shutil.copy(demo.root / "textvqa" / "images" / name, allowed / name)
    shutil.copy(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4", allowed / "clip.mp4")
    (allowed / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    secret = root / "secret.jpg"
    shutil.copy(allowed / "demo_000.jpg", secret)
    os.symlink(secret, allowed / "link.jpg")
    return allowed


@pytest.fixture(scope="module")
def server(demo, media):
    s = ServerProcess(
        demo.model,
        "--api-key",
        KEY,
        "--allowed-local-media-path",
        str(media),
        "--max_batch_size",
        "4",
        "--max_input_length",
        "4096",
        # small blocks and passes: every image or video prompt is prefilled in several chunks
        # beside the running streams, and prompts share blocks through the prefix cache
        "--block-size",
        "16",
        "--max-num-batched-tokens",
        "48",
        "--max-body-mb",
        "4",
        "--max-images-per-request",
        "3",
        "--allow-remote-media",
        "--max-remote-media-mb",
        "1",
    )
    yield s
    rc, out, err = s.stop()
    assert rc == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(demo):
    """The in-process engine on the same weights (fp32, as the demo's config.json says)."""
    import torch
    from transformers import AutoProcessor

    from modeltest.engine.engine import EngineConfig, LLMEngine
    from modeltest.engine.parallel import TPContext

    engine = LLMEngine(
        EngineConfig(
            model_path=str(demo.model),
            dtype=torch.float32,
            max_batch_size=4,
            max_input_length=4096,
            max_output_length=64,
        ),
        TPContext(),
    )
    return engine, AutoProcessor.from_pretrained(demo.model)


def cases(media):
    """name -> (OpenAI content parts, the same as qwen-vl-utils elements with the server's defaults)."""
    from modeltest.serve.config import default_image_options, default_video_options

    img, vid = default_image_options(), default_video_options()
    q = {"type": "text", "text": "What is shown here?"}
    return {
        "text": ([{"type": "text", "text": "Hello, who are you?"}], [{"type": "text", "text": "Hello, who are you?"}]),
        "image": (
            [{"type": "image_url", "image_url": {"url": data_url(media / "demo_000.jpg", "image/jpeg")}}, q],
            [{"type": "image", "image": str(media / "demo_000.jpg"), **img}, q],
        ),
        "two_images": (
            [
                {"type": "image_url", "image_url": {"url": f"file://{media / 'demo_001.jpg'}"}},
                {"type": "image_url", "image_url": str(media / "demo_002.jpg")},
                q,
            ],
            [
                {"type": "image", "image": str(media / "demo_001.jpg"), **img},
                {"type": "image", "image": str(media / "demo_002.jpg"), **img},
                q,
            ],
        ),
        "video": (
            [{"type": "video_url", "video_url": {"url": data_url(media / "clip.mp4", "video/mp4")}}, q],
            [{"type": "video", "video": str(media / "clip.mp4"), **vid}, q],
        ),
        "video_file": (
            [{"type": "video_url", "video_url": {"url": f"file://{media / 'clip.mp4'}"}}, q],
            [{"type": "video", "video": str(media / "clip.mp4"), **vid}, q],
        ),
    }


def test_greedy_answers_equal_the_in_process_engine(client, media, reference):
    engine, processor = reference
    for name, (parts, elements) in cases(media).items():
        want_text, prompt_tokens, completion_tokens = in_process_answer(engine, processor, elements, MAX_TOKENS)
        r = client.chat.completions.create(
            model="Qwen2-VL-tiny-random",
            messages=[{"role": "user", "content": parts}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert r.choices[0].message.content == want_text, name
        assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == completion_tokens, name
        assert r.choices[0].finish_reason in ("stop", "length")
        # Streaming: the deltas join to the same text, one chunk carries finish_reason, usage last.
        chunks = list(
            client.chat.completions.create(
                model="Qwen2-VL-tiny-random",
                messages=[{"role": "user", "content": parts}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want_text, name
        assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
        assert chunks[-1].usage.prompt_tokens == prompt_tokens and chunks[-1].choices == []


def test_models_health_and_metrics(server):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    models = httpx.get(server.url + "/v1/models", headers=h).json()
    assert models["data"][0]["id"] == "Qwen2-VL-tiny-random"
    text = httpx.get(server.url + "/metrics", headers=h).text
    for name in (
        "modeltest_requests_total",
        "modeltest_prompt_tokens_total",
        "modeltest_generation_tokens_total",
        "modeltest_time_to_first_token_seconds_bucket",
        "modeltest_e2e_request_latency_seconds_bucket",
        "modeltest_num_requests_running",
        "modeltest_num_requests_waiting",
        "modeltest_kv_cache_blocks_used",
        "modeltest_kv_cache_blocks_free",
        "modeltest_prefix_cache_queries_total",
        "modeltest_prefix_cache_hits_total",
        "modeltest_vision_cache_hits_total",
        "modeltest_vision_cache_misses_total",
        "modeltest_num_preemptions_total",
    ):
        assert name in text, name


def test_sixteen_concurrent_streams_get_what_they_get_alone(client):
    prompts = [f"Count to {i} please, item {i * 7}." for i in range(16)]

    def ask(p, stream):
        kw = dict(model="Qwen2-VL-tiny-random", messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices
        )

    alone = [ask(p, False) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: ask(p, True), prompts))
    assert together == alone


def test_long_prompts_interleaved_with_streams_get_what_they_get_alone(server, client, media):
    """Chunked prefills of image and video prompts next to decoding streams, and questions that
    share a medium (prefix and vision cache): every answer as when it ran alone."""
    parts = {name: p for name, (p, _) in cases(media).items()}
    asks = [[*parts["video"][:1], {"type": "text", "text": f"Question {i}?"}] for i in range(3)]
    asks += [parts["two_images"], parts["image"]] + [f"Say {i} things." for i in range(6)]

    def ask(content):
        r = client.chat.completions.create(
            model="Qwen2-VL-tiny-random",
            messages=[{"role": "user", "content": content}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        return r.choices[0].message.content

    alone = [ask(c) for c in asks]
    hits = metric(server, "modeltest_prefix_cache_hits_total")
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    assert together == alone
    assert metric(server, "modeltest_prefix_cache_hits_total") > hits


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_client_that_disconnects_frees_its_blocks(server, client):
    body = {
        "model": "Qwen2-VL-tiny-random",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    generated_before = metric(server, "modeltest_generation_tokens_total")
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
            assert any("content" in line for line in got)
            assert metric(server, "modeltest_kv_cache_blocks_used") > 0
    # Polled, with a generous bound: what proves the abort is that the request never ran to its
    # end (2000 tokens: the tokens it did generate are counted, far fewer), not how fast the
    # blocks came back.
    deadline = time.time() + 60
    while metric(server, "modeltest_kv_cache_blocks_used") > 0 or metric(server, "modeltest_num_requests_running") > 0:
        assert time.time() < deadline, "the abandoned request kept its KV blocks"
        time.sleep(0.1)
    assert metric(server, "modeltest_generation_tokens_total") - generated_before < 2000  # never ran to the end
    r = client.chat.completions.create(
        model="Qwen2-VL-tiny-random", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens >= 1


def bad_requests(media):
    """(description, request kwargs for httpx.post, status, text the message must contain)."""
    good = {"model": "Qwen2-VL-tiny-random", "max_tokens": 2, "temperature": 0}

    def chat(content, **extra):
        return {"json": {**good, "messages": [{"role": "user", "content": content}], **extra}}

    img = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    return [
        (
            "malformed JSON",
            {"content": b'{"messages": [', "headers": {"Content-Type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("missing messages", {"json": {"model": "Qwen2-VL-tiny-random"}}, 400, "'messages' is required"),
        ("unknown model", {"json": {**chat("hi")["json"], "model": "gpt-4"}}, 404, "model 'gpt-4' does not exist"),
        (
            "wrong content type",
            {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
            415,
            "Content-Type must be application/json",
        ),
        ("undecodable base64", chat([img("data:image/png;base64,@@@not-base64@@@")]), 400, "cannot be decoded"),
        ("missing file", chat([img(f"file://{media / 'nope.jpg'}")]), 400, "image file not found"),
        (
            "undecodable video",
            chat([{"type": "video_url", "video_url": {"url": f"file://{media / 'broken.mp4'}"}}]),
            400,
            "corrupt or unreadable video",
        ),
        (
            "undecodable video sent as data",
            chat([{"type": "video_url", "video_url": {"url": data_url(media / "broken.mp4", "video/mp4")}}]),
            400,
            "corrupt or unreadable video",
        ),
        (
            "frame-list video",
            chat([{"type": "video_url", "video_url": {"url": "data:video/jpeg;base64,/9j/AA,/9j/AB"}}]),
            400,
            "list of frames is not supported",
        ),
        ("too many images", chat([img(f"file://{media / 'demo_000.jpg'}")] * 4), 400, "at most 3"),
        ("prompt over max_input_length", chat("hello " * 5000), 400, "over this server's max_input_length 4096"),
        (
            "body over the limit",
            {
                "content": b'{"messages": "' + b"x" * (5 * 2**20) + b'"}',
                "headers": {"Content-Type": "application/json"},
            },
            413,
            "over this server's limit",
        ),
        (
            "outside the allowed folder",
            chat([img(f"file://{media.parent / 'secret.jpg'}")]),
            400,
            "outside --allowed-local-media-path",
        ),
        ("escape by ..", chat([img(f"file://{media}/../secret.jpg")]), 400, "outside --allowed-local-media-path"),
        ("escape by symlink", chat([img(f"file://{media / 'link.jpg'}")]), 400, "outside --allowed-local-media-path"),
        (
            "max_tokens over the limit",
            {"json": {**chat("hi")["json"], "max_tokens": 10**6}},
            400,
            "over this server's max_output_length",
        ),
    ]


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, client, media):
    before = (
        client.chat.completions.create(
            model="Qwen2-VL-tiny-random", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert before
    for what, kwargs, status, message in bad_requests(media):
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60, **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert message in err["message"], (what, err)
        assert set(err) == {"message", "type", "param", "code"}, what
        assert "modeltest-serve-" not in err["message"], (what, err)  # never the server's own file
        if "undecodable" in what:  # a medium's failure names its part
            assert err["param"] == "messages[0].content[0]", (what, err)
    r = client.chat.completions.create(
        model="Qwen2-VL-tiny-random", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    assert r.choices[0].message.content == before  # still serving, and serving the same answer
    # The official client raises the matching exception classes with our message.
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


@pytest.fixture(scope="module")
def web(media, tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving a demo image and a 2 MB file."""
    import functools
    import http.server

    root = tmp_path_factory.mktemp("web")
    shutil.copy(media / "demo_000.jpg", root / "photo.jpg")
    (root / "huge.jpg").write_bytes(b"\xff" * (2 * 2**20))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_media_when_enabled_with_a_size_cap(client, media, web):
    q = {"type": "text", "text": "What is shown here?"}

    def ask(url):
        return client.chat.completions.create(
            model="Qwen2-VL-tiny-random",
            max_tokens=MAX_TOKENS,
            temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, q]}],
        )

    assert (
        ask(f"{web}/photo.jpg").choices[0].message.content
        == ask(data_url(media / "demo_000.jpg", "image/jpeg")).choices[0].message.content
    )
    import openai

    with pytest.raises(openai.BadRequestError, match="over the 1048576 byte limit for remote media"):
        ask(f"{web}/huge.jpg")
    with pytest.raises(openai.BadRequestError, match="cannot fetch"):
        ask(f"{web}/missing.jpg")


def test_api_key_is_required_except_for_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server.url + path, headers=headers, json={"messages": []})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200


def test_sampling_with_a_seed_is_reproducible(client):
    kw = dict(
        model="Qwen2-VL-tiny-random",
        messages=[{"role": "user", "content": "Say something"}],
        max_tokens=10,
        temperature=1.2,
        top_p=0.95,
        seed=1234,
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    c = client.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    assert a == b and a != c


def test_stop_strings_cut_the_answer(client):
    kw = dict(
        model="Qwen2-VL-tiny-random", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.chat.completions.create(**kw, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kw, stop=[stop], stream=True)
        if c.choices
    )
    assert streamed == full[: full.find(stop)]


def test_tensor_parallel_server_serves_the_tp1_tokens_and_drains_on_sigterm(demo, media, client):
    """--tp 2 under gloo (torchrun from `modeltest serve`): the same answers as the tp=1 server;
    SIGTERM with a request in flight ends it, and the server exits 0 without a traceback."""
    from openai import OpenAI

    tp2 = ServerProcess(
        demo.model,
        "--tp",
        "2",
        "--allowed-local-media-path",
        str(media),
        "--drain-timeout",
        "2",
        "--max_batch_size",
        "4",
        "--max_input_length",
        "4096",
    )
    try:
        c2 = OpenAI(base_url=tp2.url + "/v1", api_key="none", max_retries=0, timeout=120)
        import openai

        with pytest.raises(openai.BadRequestError, match="remote media is off"):  # not enabled on this one
            c2.chat.completions.create(
                model="Qwen2-VL-tiny-random",
                max_tokens=2,
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.jpg"}}],
                    }
                ],
            )
        for name, (parts, _) in cases(media).items():
            kw = dict(
                model="Qwen2-VL-tiny-random",
                messages=[{"role": "user", "content": parts}],
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            assert (
                c2.chat.completions.create(**kw).choices[0].message.content
                == client.chat.completions.create(**kw).choices[0].message.content
            ), name
        inflight = StreamingRequest(tp2.url)
        assert inflight.first_token.wait(60) and inflight.text, (inflight.status, inflight.error)
    finally:
        rc, out, err = tp2.stop(signal.SIGTERM)
    inflight.join(30)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    # the request in flight got a whole answer: 200, a finish reason, the stream's end
    assert inflight.status == 200 and inflight.error is None, (inflight.status, inflight.error)
    assert inflight.finish_reason in ("abort", "length") and inflight.done, inflight.finish_reason


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker of the given RANK among a launcher's descendants (torchrun
    starts each worker in a session of its own)."""
    todo = [launcher]
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        if f"RANK={rank}" in environ and any(kv.startswith("LOCAL_RANK=") for kv in environ):
            return pid
    raise AssertionError(f"no rank {rank} under process {launcher}")


def test_a_killed_rank_ends_a_tensor_parallel_server_in_one_line(demo):
    """SIGKILL rank 1 of `modeltest serve --tp 2`: the server ends, and the launcher says which
    rank died and how, in one line (not a traceback of its own)."""
    tp2 = ServerProcess(demo.model, "--tp", "2", "--drain-timeout", "1")
    try:
        os.kill(rank_pid(tp2.proc.pid, 1), signal.SIGKILL)
        tp2.proc.wait(120)
    finally:
        rc, out, err = tp2.stop()
    assert rc == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("modeltest serve: error: ") and "rank 1 was killed by SIGKILL" in last, last
    assert "AttributeError" not in err


def test_sigterm_drains_a_single_process_server(demo):
    s = ServerProcess(demo.model, "--drain-timeout", "1")
    inflight = StreamingRequest(s.url)
    assert inflight.first_token.wait(60) and inflight.text, (inflight.status, inflight.error)
    rc, out, err = s.stop(signal.SIGTERM)
    inflight.join(30)
    assert rc == 0 and "Traceback" not in err, err
    assert "draining" in out and "stopped" in out
    assert inflight.status == 200 and inflight.error is None, (inflight.status, inflight.error)
    assert inflight.finish_reason in ("abort", "length") and inflight.done, inflight.finish_reason


def test_health_is_503_while_loading_and_when_the_engine_is_dead(demo):
    """/health before the engine exists (loading), and after its load failed (dead); chat
    requests get 503 with the reason meanwhile."""
    from fastapi.testclient import TestClient

    from modeltest.serve.app import ServerState, create_app
    from modeltest.serve.config import ServeConfig
    from modeltest.serve.engine_loop import EngineLoop
    from modeltest.serve.metrics import ServerMetrics
    from modeltest.serve.preprocess import Preprocessor

    cfg = ServeConfig(model_path=str(demo.model), decode_workers="0")
    release = threading.Event()

    def slow_then_broken():
        release.wait(30)
        raise RuntimeError("out of memory while loading")

    loop = EngineLoop(slow_then_broken)
    app = create_app(cfg, loop, Preprocessor(cfg), ServerMetrics(), ServerState(), "fp32")
    loop.start()
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503 and http.get("/health").json()["status"] == "loading"
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        release.set()
        deadline = time.time() + 10
        while loop.state != "dead":
            assert time.time() < deadline
            time.sleep(0.05)
        h = http.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "dead" and "out of memory" in h.json()["error"]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "no working engine" in r.json()["error"]["message"]


def test_fields_not_implemented_are_refused_by_name_never_ignored(server):
    h = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "/v1/chat/completions"
    base = {"model": "Qwen2-VL-tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    base["temperature"] = 0
    refused = {"best_of": 3, "audio": {"voice": "alloy"}, "prediction": {"type": "content", "content": "x"}}
    for field, value in refused.items():
        r = httpx.post(url, json={**base, field: value}, headers=h)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field and f"'{field}' is not implemented" in err["message"]
    r = httpx.post(url, json={**base, "stream": True, "stream_options": {"chunk_size": 3}}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.chunk_size"
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    r = httpx.post(url, json={**base, "messages": [{"role": "user", "content": "x", "tool_calls": calls}]}, headers=h)
    assert r.status_code == 400 and "only an assistant turn" in r.json()["error"]["message"]
    # penalties and logit_bias reach the engine: +100 on one token makes every token that one
    forced = httpx.post(url, json={**base, "logit_bias": {"15": 100}, "ignore_eos": True}, headers=h).json()
    assert forced["usage"]["completion_tokens"] == 2 and forced["choices"][0]["message"]["content"] == "00"
    bad = httpx.post(url, json={**base, "logit_bias": {"15": 300}}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    # the values that mean "off" (what benchmark clients send by default) run, as does `user`
    off = {"presence_penalty": 0, "logprobs": False, "response_format": {"type": "text"}, "user": "u1", "n": 1}
    plain = httpx.post(url, json=base, headers=h).json()
    same = httpx.post(url, json={**base, **off}, headers=h).json()
    assert same["choices"][0]["message"] == plain["choices"][0]["message"]
    # an extension this server does not know runs without it and is named once in the log
    for _ in range(2):
        assert httpx.post(url, json={**base, "frobnicate": 1}, headers=h).status_code == 200
    assert server.output()[1].count("request field 'frobnicate' is unknown") == 1


def test_developer_role_models_by_id_fingerprint_errors_and_the_access_log(server, client):
    ask = dict(model="Qwen2-VL-tiny-random", max_tokens=4, temperature=0)
    as_system = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], **ask
    )
    as_developer = client.chat.completions.create(
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}], **ask
    )
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_system.system_fingerprint.startswith("modeltest-") and "fp32" in as_system.system_fingerprint
    assert client.models.retrieve("Qwen2-VL-tiny-random").id == "Qwen2-VL-tiny-random"
    h = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.get(server.url + "/v1/models/other", headers=h)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        r = httpx.request(method, server.url + path, headers=h)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # every usage in the stream with continuous_usage_stats, growing
    chunks = list(
        client.chat.completions.create(
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            **ask,
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts) and counts[-1] >= 1
    log = server.output()[1]
    line = [x for x in log.splitlines() if "modeltest.access" in x and as_developer.id in x]
    assert len(line) == 1 and "POST /v1/chat/completions 200" in line[0] and "completion_tokens=" in line[0]
    assert "Be brief" not in log and "GET /v1/nothing 404" in log


def test_logprobs_are_the_models_log_softmax_streamed_or_not(client, demo, reference):
    """Each token's logprob = transformers' log-softmax of the same fp32 weights at that position
    (1e-4); greedy, it is the top of its top_logprobs; the stream carries the same entries."""
    from transformers import Qwen2VLForConditionalGeneration

    from modeltest.backends.hf import dtype_kwarg
    from modeltest.inputs import model_input

    _, processor = reference
    ask = dict(
        model="Qwen2-VL-tiny-random",
        messages=[{"role": "user", "content": "Hello, who are you?"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    r = client.chat.completions.create(**ask)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= MAX_TOKENS
    for e in content:
        top = e.top_logprobs
        assert len(top) == 5 and [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert e.token == top[0].token and e.logprob == top[0].logprob and e.bytes == list(e.token.encode())
    streamed = [
        e
        for c in client.chat.completions.create(**ask, stream=True)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # against transformers: the prompt + the answer's tokens in one forward pass
    inp = model_input(
        processor, [{"role": "user", "content": [{"type": "text", "text": "Hello, who are you?"}]}]
    ).inputs
    ids = [processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.tokenize(e.token))[0] for e in content]
    assert processor.tokenizer.decode(ids) == r.choices[0].message.content
    hf = Qwen2VLForConditionalGeneration.from_pretrained(demo.model, **dtype_kwarg(torch.float32)).eval()
    n = inp["input_ids"].shape[1]
    full = torch.cat([inp["input_ids"], torch.tensor([ids])], dim=1)
    with torch.no_grad():
        logits = hf(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float()
    want = torch.log_softmax(logits[n - 1 : n - 1 + len(ids)], dim=-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([e.logprob for e in content]), want, atol=1e-4)


def test_n_choices_are_reproducible_with_a_seed(server, client):
    ask = dict(
        model="Qwen2-VL-tiny-random",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=6,
        temperature=1.0,
        seed=1234,
        n=3,
    )
    a = client.chat.completions.create(**ask)
    b = client.chat.completions.create(**ask)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice draws its own tokens
    single = client.chat.completions.create(**{**ask, "n": 1})
    assert single.choices[0].message.content == texts[0]  # choice 0 is the request with n=1
    # completion tokens counted over all choices, the prompt once
    assert single.usage.completion_tokens < a.usage.completion_tokens <= 3 * 6
    assert a.usage.prompt_tokens == single.usage.prompt_tokens
    # streamed: the choices interleaved, each index's deltas adding up to its non-streamed text
    streamed = {}
    reasons = {}
    for c in client.chat.completions.create(**ask, stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
            reasons[ch.index] = ch.finish_reason or reasons.get(ch.index)
    assert [streamed[i] for i in range(3)] == texts
    assert [reasons[i] for i in range(3)] == [c.finish_reason for c in a.choices]
