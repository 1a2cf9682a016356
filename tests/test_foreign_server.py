"""The `openai` backend against a server we did not write: `transformers serve` (transformers 5,
the suite's .venv-t5 pass) on the demo model. With default settings the run finds the server's
dialect (chat_template_kwargs), TextVQA's answers equal the in-process engine's, and a task
option (max_pixels) changes the served prompt tokens exactly as it changes the engine's. Videos,
which that server cannot decode without torchcodec, fail per sample — never the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port
from test_openai_backend import evaluate

pytestmark = pytest.mark.subprocess


def transformers_serve() -> Path:
    import transformers

    cli = Path(sys.executable).parent / "transformers"
    if int(transformers.__version__.split(".")[0]) < 5 or not cli.exists():
        pytest.skip("`transformers serve` needs transformers 5 (the suite's .venv-t5 pass runs this)")
    return cli


@pytest.fixture(scope="module")
def foreign(demo, tmp_path_factory):
    cli = transformers_serve()
    port = free_port()
    log = open(tmp_path_factory.mktemp("tserve") / "server.log", "w+")
    proc = subprocess.Popen(
        [str(cli), "serve", str(demo.model), "--port", str(port), "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            proc.kill()
            raise AssertionError(f"transformers serve did not start:\n{log.read()[-3000:]}")
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_textvqa_against_transformers_serve_equals_the_engine(demo, foreign, tmp_path):
    from modeltest.backends.openai import served_model_identity
    from modeltest.config import load_config
    from modeltest.tasks import TASKS

    overrides = ["backend=openai", f"model.api_base={foreign}/v1", f"task.local_dataset_path={demo.textvqa_jsonl}"]
    cfg = load_config(TASKS, "textvqa", "qwen2_vl", overrides)
    assert served_model_identity(cfg.model)["server_kind"] == "transformers"
    tokens = {}
    for opts in ([], ["task.max_pixels=50176"]):
        engine = evaluate(demo, "textvqa", tmp_path / f"engine{len(opts)}", *opts)
        served = evaluate(
            demo, "textvqa", tmp_path / f"served{len(opts)}", "backend=openai", f"model.api_base={foreign}/v1", *opts
        )
        assert not any(r.error for r in served.records)
        assert {r.id: r.output for r in served.records} == {r.id: r.output for r in engine.records}
        assert {r.id: r.input_tokens for r in served.records} == {r.id: r.input_tokens for r in engine.records}
        tokens[bool(opts)] = [r.input_tokens for r in served.records]
    # the option reached the server: at least one image shrank
    assert any(small < full for small, full in zip(tokens[True], tokens[False]))


def test_videos_it_cannot_decode_fail_per_sample(demo, foreign, tmp_path):
    run = evaluate(
        demo,
        "videobench",
        tmp_path,
        "backend=openai",
        f"model.api_base={foreign}/v1",
        "limit=2",
        "model.max_retries=0",
    )
    assert run.records and all(r.error and r.output is None for r in run.records)
    assert any("HTTP 500" in r.error for r in run.records)
