"""backend=openai: the harness against `modeltest serve` (a real server process on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_csv, read_debug, slow_samples
from serve_helpers import ServerProcess

pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def server(demo):
    s = ServerProcess(demo.model, "--allowed-local-media-path", str(demo.root), "--max_batch_size", "4")
    yield s
    s.stop()


def evaluate(demo, task, out, *extra):
    from modeltest.config import load_config
    from modeltest.runner import Evaluator
    from modeltest.tasks import TASKS

    data = demo.textvqa_jsonl if task == "textvqa" else demo.videobench_qa
    overrides = [
        f"model.model_path={demo.model}",
        f"task.local_dataset_path={data}",
        f"output_dir={out}",
        "max_output_length=6",
        *extra,
    ]
    if task == "videobench":
        overrides.append("task.subject_mapping=null")
    return Evaluator(load_config(TASKS, task, "qwen2_vl", overrides), show_progress=False).run()


@pytest.mark.parametrize("task", ["textvqa", "videobench"])
def test_served_results_equal_in_process_results(demo, server, tmp_path, task):
    engine = evaluate(demo, task, tmp_path / "engine", "batch_size=4")
    for media in ("data", "file"):
        served = evaluate(
            demo,
            task,
            tmp_path / media,
            "backend=openai",
            f"model.api_base={server.url}/v1",
            f"model.media={media}",
            "model.concurrency=4",
        )
        assert served.paths.result_csv.read_text() == engine.paths.result_csv.read_text(), media
        assert [(r.id, r.output, r.score, r.prediction, r.input_tokens) for r in served.records] == [
            (r.id, r.output, r.score, r.prediction, r.input_tokens) for r in engine.records
        ], media
        assert all(r.error is None and r.prefill_time is not None and r.e2e_time > 0 for r in served.records)
        assert served.paths.result_csv.name == f"{task}_qwen2_vl_openai_batch1_tp1_result.csv"


def test_api_key_is_never_saved_and_a_down_server_is_one_line(demo, tmp_path):
    keyed = ServerProcess(demo.model, "--api-key", "sekret-42")
    try:
        out = tmp_path / "out"
        env = dict(os.environ, MODELTEST_PYTHON=sys.executable)
        common = [
            f"task.local_dataset_path={demo.textvqa_jsonl}",
            f"output_dir={out}",
            "backend=openai",
            f"model.api_base={keyed.url}/v1",
            "limit=2",
            "max_output_length=3",
        ]
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "mm_run.sh"), "textvqa", "qwen2_vl", *common],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 2 and "401 unauthorized" in proc.stderr and "OPENAI_API_KEY" in proc.stderr
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "mm_run.sh"), "textvqa", "qwen2_vl", *common, "model.api_key=sekret-42"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "mm_run.sh"), "textvqa", "qwen2_vl", *common],
            capture_output=True,
            text=True,
            env=dict(env, OPENAI_API_KEY="sekret-42"),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        for f in (
            list((out / "results").rglob("*")) + list((out / "debug").rglob("*")) + list((out / "records").rglob("*"))
        ):
            if f.is_file():
                assert "sekret-42" not in f.read_text(), f
    finally:
        keyed.stop()
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "mm_run.sh"), "textvqa", "qwen2_vl", *common],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no server answers at" in proc.stderr and "Traceback" not in proc.stderr


def test_faults_are_retried_as_specified_and_failures_are_recorded(demo, server, tmp_path):
    """429, 500 (MindIE's error shape), a dropped connection and a stall past the timeout are
    retried with back-off; a 400 (older vLLM's shape) is not; what still fails is that sample's
    error, not scored text, and only those samples are computed again on resume."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(
        server.url,
        {
            "what does the sign say": ("429", 2),  # fine on the 3rd attempt
            "what word is written on the door": ("500", 99),  # never fine: 1 + max_retries attempts
            "what is the name of the shop": ("400", 99),  # not retried: 1 attempt
            "what does the green sign read": ("drop", 1),
            "what is on sale": ("stall", 1),
            "which bus number is shown": ("error_event", 1),  # fine on the 2nd attempt
            "what is not allowed here": ("malformed", 99),
            "what kind of building is this": ("cut", 99),
        },
    )
    try:
        extra = [
            "backend=openai",
            f"model.api_base={proxy.url}/v1",
            "model.max_retries=4",  # two to spare for a slow machine's timeouts
            "model.retry_backoff=0.05",
            "model.timeout=4",
            "model.concurrency=3",
        ]
        result = evaluate(demo, "textvqa", tmp_path, *extra)
        by_question = {r.input["prompt"].split(" Answer")[0]: r for r in result.records}
        # (">=": on a loaded machine a forwarded attempt may itself time out and be retried)
        assert proxy.attempts["what does the sign say"] >= 3 and by_question["what does the sign say?"].error is None
        failed = by_question["what word is written on the door?"]
        assert proxy.attempts["what word is written on the door"] == 5  # 1 + max_retries
        # the same 500 body every time: the server's answer to this sample, kept on resume
        assert failed.output is None and failed.score == 0 and not failed.transient
        assert (
            "HTTP 500" in failed.error
            and "engine overloaded" in failed.error
            and "the same answer 5 times" in failed.error
        )
        # a failing 200 stream is that sample's error (retried), never the run's crash
        assert by_question["which bus number is shown?"].error is None
        assert proxy.attempts["which bus number is shown"] == 2
        malformed = by_question["what is not allowed here?"]
        assert "malformed stream chunk" in malformed.error and malformed.output is None
        cut = by_question["what kind of building is this?"]
        assert "ended before the answer did" in cut.error and cut.output is None
        bad = by_question["what is the name of the shop?"]
        assert proxy.attempts["what is the name of the shop"] == 1 and "HTTP 400" in bad.error
        assert "bad request: no" in bad.error and not bad.transient
        assert proxy.attempts["what does the green sign read"] >= 2
        assert by_question["what does the green sign read?"].error is None
        assert proxy.attempts["what is on sale"] >= 2 and by_question["what is on sale?"].error is None
        rows, _ = read_csv(tmp_path, "textvqa")
        assert rows[0]["Errors"] == "4" and rows[0]["Total"] == "8"
        summary = json.loads(result.paths.summary_json.read_text())
        assert sorted(e["samples"] for e in summary["errors_by_message"]) == [1, 1, 1, 1]
        # Resume: permanent answers (the 400, the same 500 each time, the same broken stream each
        # time) are kept as they are; nothing transient is left to compute
        proxy.faults["what word is written on the door"] = ("500", 0)
        again = evaluate(demo, "textvqa", tmp_path, *extra)
        summary = json.loads(again.paths.summary_json.read_text())
        assert summary["computed"] == 0 and summary["reused"] == 8
    finally:
        proxy.close()


def test_server_killed_mid_run_and_restarted(demo, tmp_path):
    """SIGKILL the server mid-run: the run goes on (the rest fail as server errors), the next run
    against a restarted server computes exactly those, and every finished sample is reused once."""
    first = ServerProcess(demo.model)
    out = tmp_path / "out"
    env = dict(os.environ, MODELTEST_PYTHON=sys.executable, **slow_samples(0.7))
    common = [
        f"task.local_dataset_path={demo.textvqa_jsonl}",
        f"output_dir={out}",
        "backend=openai",
        "model.max_retries=1",
        "model.retry_backoff=0.05",
        "model.concurrency=1",
        "max_output_length=4",
    ]
    run = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "mm_run.sh"), "textvqa", "qwen2_vl", *common, f"model.api_base={first.url}/v1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while (
        not list(out.rglob("records_dp0.jsonl"))
        or len(next(out.rglob("records_dp0.jsonl")).read_text().splitlines()) < 3
    ):
        assert time.time() < deadline and run.poll() is None
        time.sleep(0.05)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert "run the same command again to retry only those" in stdout
    # what is evaluated, and where: no weights folder or data type of its own (the server has them)
    assert f"evaluating the model it serves at {first.url}/v1 (openai backend, 1 request(s) at once)" in stdout
    assert "loading None" not in stdout
    records = read_debug(out, "textvqa")
    finished = [r for r in records if r["error"] is None]
    assert 3 <= len(finished) < 8 and all(r.get("transient") for r in records if r["error"])
    second = ServerProcess(demo.model)
    try:
        proc = subprocess.run(
            [
                "bash",
                str(REPO / "scripts" / "mm_run.sh"),
                "textvqa",
                "qwen2_vl",
                *common,
                f"model.api_base={second.url}/v1",
            ],
            capture_output=True,
            text=True,
            env=dict(env, MODELTEST_TEST_SLOW_SAMPLE_S="0"),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        second.stop()
    summary = json.loads(next((out / "results").rglob("*_summary.json")).read_text())
    assert summary["reused"] == len(finished) and summary["computed"] == 8 - len(finished)
    latest = sorted((out / "debug").rglob("output_*.txt"))[-1]  # the second run's debug file
    again = [json.loads(line) for line in latest.read_text().splitlines()]
    assert all(r["error"] is None for r in again) and len({r["id"] for r in again}) == 8
    assert [r["output"] for r in again if r["id"] in {f["id"] for f in finished}] == [f["output"] for f in finished]


def test_bench_serve_reports_consistent_figures(demo, server, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeltest",
            "bench-serve",
            "videobench",
            "qwen2_vl",
            f"task.local_dataset_path={demo.videobench_qa}",
            "task.subject_mapping=null",
            f"model.api_base={server.url}/v1",
            "--max-concurrency",
            "3",
            "--num-prompts",
            "12",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--request-rate",
            "50",
            "--goodput",
            "e2el:60000",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Request throughput" in proc.stdout
    r = json.loads(out.read_text())
    assert r["successful_requests"] == 12 and r["failed_requests"] == 0 and r["total_output_tokens"] == 72
    assert r["request_throughput"] == pytest.approx(12 / r["duration_s"])
    assert r["output_token_throughput"] == pytest.approx(72 / r["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[name]["median_ms"] <= r[name]["p90_ms"] <= r[name]["p99_ms"], name
    assert r["ttft"]["mean_ms"] <= r["e2el"]["mean_ms"] and r["goodput"]["good_requests"] == 12


def test_bench_serve_sends_structured_output_and_logprobs(demo, server, tmp_path):
    """--response-format and --logprobs reach the server on every request (refused, they would
    count as failed requests)."""
    out = tmp_path / "bench.json"
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}))
    for fmt in ("json_object", str(schema)):
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "modeltest", "bench-serve", "textvqa", "qwen2_vl"),
                f"task.local_dataset_path={demo.textvqa_jsonl}",
                f"model.api_base={server.url}/v1",
                *("--num-prompts", "3", "--max-tokens", "8", "--logprobs", "2", "--response-format", fmt),
                *("--json", str(out)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        r = json.loads(out.read_text())
        assert r["successful_requests"] == 3 and r["failed_requests"] == 0
        assert r["response_format"] == fmt and r["logprobs"] == 2


def test_exit_codes_say_when_samples_failed(demo, server, tmp_path):
    """Every sample failed: exit 1 and one line naming the most frequent error. Some failed: exit
    0, the count and the messages in the summary — and exit 1 with fail_on_errors=true."""
    from fault_proxy import FaultProxy

    def run(proxy, *extra):
        return subprocess.run(
            [
                *(sys.executable, "-m", "modeltest", "run", "textvqa", "qwen2_vl"),
                f"task.local_dataset_path={demo.textvqa_jsonl}",
                f"output_dir={tmp_path / 'out'}",
                "resume=false",
                *("backend=openai", f"model.api_base={proxy.url}/v1", "max_output_length=2"),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

    everything = FaultProxy(server.url, {"?": ("400", 99)})  # every question has a '?'
    try:
        proc = run(everything)
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("modeltest: every sample failed (8)") and "HTTP 400" in last
        assert "Traceback" not in proc.stderr
    finally:
        everything.close()
    one = FaultProxy(server.url, {"what is on sale": ("400", 99)})
    try:
        proc = run(one)
        assert proc.returncode == 0, proc.stderr
        assert "1 of 8 sample(s) recorded with errors" in proc.stdout and "1 x HTTP 400" in proc.stdout
        strict = run(one, "fail_on_errors=true")
        assert strict.returncode == 1 and "1 of 8 samples failed (fail_on_errors=true)" in strict.stderr
    finally:
        one.close()


def test_the_servers_dialect_decides_how_media_options_travel(demo, server, tmp_path):
    """auto finds how each server takes the task's media options: mm_processor_kwargs (modeltest
    serve), chat_template_kwargs (a transformers-serve-like server, where mm_processor_kwargs is a
    422); the options arrive either way (max_pixels changes the prompt tokens exactly as in
    process). A server that takes neither refuses the run in one line; with
    send_preprocessing=false it runs, and every record and the summary say so."""
    from fault_proxy import FaultProxy

    from modeltest.errors import UserError

    small = ["task.max_pixels=50176", "backend=openai", "max_output_length=2"]
    engine = evaluate(demo, "textvqa", tmp_path / "engine", "task.max_pixels=50176", "max_output_length=2")
    want = {r.id: r.input_tokens for r in engine.records}
    direct = evaluate(demo, "textvqa", tmp_path / "direct", *small, f"model.api_base={server.url}/v1")
    assert {r.id: r.input_tokens for r in direct.records} == want
    assert json.loads(direct.paths.summary_json.read_text())["preprocessing"] is None
    hf_like = FaultProxy(server.url, {}, dialect="transformers")
    try:
        run = evaluate(demo, "textvqa", tmp_path / "tf", *small, f"model.api_base={hf_like.url}/v1")
        assert {r.id: r.input_tokens for r in run.records} == want and not any(r.error for r in run.records)
        sent = [b for b in hf_like.bodies if "messages" in b and b.get("max_tokens") == 2]
        assert sent and all(b["chat_template_kwargs"]["max_pixels"] == 50176 for b in sent)
    finally:
        hf_like.close()
    plain = FaultProxy(server.url, {}, dialect="plain")
    try:
        with pytest.raises(UserError, match="takes no per-request media options.*send_preprocessing=false"):
            evaluate(demo, "textvqa", tmp_path / "plain", *small, f"model.api_base={plain.url}/v1")
        run = evaluate(
            demo,
            "textvqa",
            tmp_path / "plain",
            *small,
            f"model.api_base={plain.url}/v1",
            "model.send_preprocessing=false",
        )
        assert all(r.preprocessing == "server-side preprocessing: options not applied" for r in run.records)
        assert {r.id: r.input_tokens for r in run.records} != want  # the server's defaults, not 50176
        summary = json.loads(run.paths.summary_json.read_text())
        assert summary["preprocessing"] == ["server-side preprocessing: options not applied"]
    finally:
        plain.close()


def test_bench_serve_drops_an_extension_the_server_refuses(demo, server, tmp_path):
    """A server that refuses ignore_eos (as transformers serve does): one probe, a warning, the
    figures say it was not sent, every request succeeds; key=value overrides after the options."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(server.url, {}, dialect="transformers")
    out = tmp_path / "bench.json"
    try:
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "modeltest", "bench-serve", "textvqa", "qwen2_vl"),
                *("--num-prompts", "3", "--max-tokens", "4", "--ignore-eos", "--json", str(out)),
                f"task.local_dataset_path={demo.textvqa_jsonl}",
                f"model.api_base={proxy.url}/v1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert "the server refuses ignore_eos (HTTP 422" in proc.stdout
    r = json.loads(out.read_text())
    assert r["successful_requests"] == 3 and r["failed_requests"] == 0
    assert r["ignore_eos"] is False and "ignore_eos" in r["ignore_eos_refused"]
