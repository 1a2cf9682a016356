"""Never lose a finished sample: SIGKILL and Ctrl-C mid-run, resume, data parallelism, keys."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_csv, read_debug, run_mm, slow_samples
from serve_helpers import free_port

pytestmark = pytest.mark.subprocess


def overrides(demo, out, *extra):
    return [
        f"model.model_path={demo.model}",
        f"task.local_dataset_path={demo.textvqa_jsonl}",
        f"output_dir={out}",
        "max_output_length=4",
        *extra,
    ]


def summary(out):
    return json.loads(next((out / "results").rglob("*_summary.json")).read_text())


def shard_lines(out):
    return sum(
        1
        for p in (out / "records").rglob("records_*.jsonl")
        for line in p.read_text().splitlines()
        if line.endswith("}")
    )


def start(demo, out, *extra, slow="0.6", sigint=signal.SIG_DFL):
    """mm_run.sh in its own process group (a terminal's Ctrl-C reaches the whole group), with
    SIGINT's disposition set as a parent would leave it: default, or ignored (a background job
    of a script, some CI runners) — whatever this test process itself inherited."""
    env = dict(os.environ, MODELTEST_PYTHON=sys.executable, **slow_samples(slow))
    return subprocess.Popen(
        [
            "bash",
            str(REPO / "scripts" / "mm_run.sh"),
            "textvqa",
            "qwen2_vl",
            *overrides(demo, out, "batch_size=1", *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )


PER_SAMPLE = ("subject", "input", "output", "prediction", "gold", "score", "error", "input_tokens", "output_tokens")


def assert_same_answers(out, reference, task="textvqa"):
    """Every sample's record (by id) equals the uninterrupted run's: the answer text, what was
    scored, the token counts — not only the result CSV, which random weights leave at 0."""
    got = {r["id"]: r for r in read_debug(out, task)}
    want = {r["id"]: r for r in read_debug(reference, task)}
    assert sorted(got) == sorted(want) and len(got) == len(read_debug(out, task))
    for sid, r in want.items():
        assert {k: got[sid].get(k) for k in PER_SAMPLE} == {k: r.get(k) for k in PER_SAMPLE}, sid
    assert read_csv(out, task)[1].read_text() == read_csv(reference, task)[1].read_text()


def wait_for_records(proc, out, n, timeout=120):
    deadline = time.time() + timeout
    while shard_lines(out) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no records appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """An uninterrupted run to compare against."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_mm("textvqa", overrides(demo, out))
    return out


def test_sigkill_then_resume_recomputes_only_unfinished(demo, tmp_path, reference):
    out, cache = tmp_path / "out", tmp_path / "media-cache"
    proc = start(demo, out, f"media_cache={cache}", "prep_workers=2")
    wait_for_records(proc, out, 3)
    os.killpg(proc.pid, signal.SIGKILL)  # the harness and its decoding workers
    proc.wait()
    finished = shard_lines(out)
    assert 3 <= finished < 8
    shard = next((out / "records").rglob("records_dp0.jsonl"))
    with open(shard, "a") as f:
        f.write('{"key": "torn-by-a-cra')  # a line cut short by the crash
    # The cache as a crash can leave it: an entry cut short and a temporary file never renamed.
    entries = sorted(cache.glob("*/*.bin"))
    assert entries
    entries[0].write_bytes(entries[0].read_bytes()[:-50])
    (entries[-1].parent / ".tmp-left-by-a-crash").write_bytes(b"MTMC1\n partial")
    run_mm("textvqa", overrides(demo, out, f"media_cache={cache}", "prep_workers=2"))
    s = summary(out)
    assert s["reused"] == finished and s["computed"] == 8 - finished
    assert_same_answers(out, reference)


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(demo, tmp_path, reference, inherited):
    out = tmp_path / "out"
    proc = start(demo, out, sigint=inherited)
    wait_for_records(proc, out, 2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    saved = shard_lines(out)
    assert saved >= 2
    run_mm("textvqa", overrides(demo, out))
    assert summary(out)["reused"] == saved
    assert_same_answers(out, reference)


def test_ctrl_c_with_several_processes_is_one_message_with_the_total(demo, tmp_path, reference):
    """dp=2 under torchrun: one line counting both replicas' saved samples, exit 130, no
    launcher traceback; the next run reuses exactly those."""
    out = tmp_path / "out"
    proc = start(demo, out, "dp=2")
    wait_for_records(proc, out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    saved = shard_lines(out)
    assert lines == [
        f"modeltest: interrupted: {saved} finished sample(s) of this run are saved in "
        f"{out / 'records' / 'textvqa' / 'qwen2_vl' / 'fp32'}; run the same command again to resume"
    ]
    run_mm("textvqa", overrides(demo, out))
    assert summary(out)["reused"] == saved
    assert_same_answers(out, reference)


def test_modeltest_run_with_tp_launches_its_processes(demo, tmp_path, reference):
    """`modeltest run ... tp=2` typed directly (not through mm_run.sh) runs two processes."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "modeltest", "run", "textvqa", "qwen2_vl", *overrides(demo, out, "tp=2")],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, MASTER_PORT=str(free_port())),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, path = read_csv(out, "textvqa")
    assert path.name.endswith("_tp2_result.csv") and summary(out)["tp"] == 2
    assert_same_answers(out, reference)


def test_fully_resumed_run_keeps_what_computed_the_results(demo, tmp_path):
    out = tmp_path / "out"
    run_mm("textvqa", overrides(demo, out))
    config = next((out / "results").rglob("*_config.json"))
    first = json.loads(config.read_text())["backend"]
    assert first["backend"] == "engine" and first["kv_cache_tokens"] > 0
    run_mm("textvqa", overrides(demo, out))
    assert summary(out)["computed"] == 0
    assert json.loads(config.read_text())["backend"] == first


def test_data_parallel_equals_single_and_records_move_between_layouts(demo, tmp_path, reference):
    out = tmp_path / "dp2"
    proc = run_mm("textvqa", overrides(demo, out, "dp=2", "batch_size=3"))
    assert "8/8" in proc.stderr  # rank 0's progress bar counts both replicas' samples
    assert_same_answers(out, reference)
    assert {p.name for p in (out / "records").rglob("*.jsonl")} == {"records_dp0.jsonl", "records_dp1.jsonl"}
    debug = read_debug(out, "textvqa")
    assert [r["id"] for r in debug] == [r["id"] for r in read_debug(reference, "textvqa")]  # dataset order
    assert summary(out)["dp"] == 2
    # dp, tp and batch size are not part of a sample's key: a dp=1 run reuses everything.
    run_mm("textvqa", overrides(demo, out, "batch_size=1"))
    assert summary(out)["computed"] == 0 and summary(out)["reused"] == 8


def test_what_changes_an_answer_changes_the_key(demo, tmp_path):
    out = tmp_path / "out"
    run_mm("textvqa", overrides(demo, out))
    run_mm("textvqa", overrides(demo, out, "max_output_length=5"))
    assert summary(out)["computed"] == 8  # generation settings changed
    run_mm("textvqa", overrides(demo, out, "max_output_length=5", "model.mm_model.prompt_suffix=' Answer:'"))
    assert summary(out)["computed"] == 8  # prompt changed
    run_mm("textvqa", overrides(demo, out, "max_output_length=5", "model.mm_model.prompt_suffix=' Answer:'", "limit=3"))
    assert summary(out)["computed"] == 0  # a subset of finished samples
    run_mm(
        "textvqa",
        overrides(demo, out, "max_output_length=5", "model.mm_model.prompt_suffix=' Answer:'", "resume=false"),
    )
    assert summary(out)["computed"] == 8  # resume=false starts fresh
    assert any(p.name.startswith("fp32.replaced-") for p in (out / "records" / "textvqa" / "qwen2_vl").iterdir())


def test_disk_full_is_a_clear_error_and_keeps_what_was_saved(demo, tmp_path, monkeypatch):
    import errno

    from modeltest import records
    from modeltest.config import load_config
    from modeltest.errors import UserError
    from modeltest.runner import Evaluator
    from modeltest.tasks import TASKS

    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", fsync)
    out = tmp_path / "out"
    cfg = load_config(TASKS, "textvqa", "qwen2_vl", overrides(demo, out, "batch_size=1"))
    with pytest.raises(
        UserError,
        match=r"records_dp0.jsonl: cannot save a finished sample \(the disk is full\).*"
        r"run the same command again",
    ):
        Evaluator(cfg, show_progress=False).run()
    monkeypatch.setattr(records.os, "fsync", real_fsync)
    result = Evaluator(
        load_config(TASKS, "textvqa", "qwen2_vl", overrides(demo, out, "batch_size=1")), show_progress=False
    ).run()
    assert len(result.records) == 8
    assert json.loads(next((out / "results").rglob("*_summary.json")).read_text())["reused"] >= 2


def test_two_nodes_on_one_machine(demo, tmp_path, reference):
    """NNODES=2: two launches of mm_run.sh (node ranks 0 and 1) join one run of dp=2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    procs = []
    for node in (0, 1):
        env = dict(
            os.environ,
            MODELTEST_PYTHON=sys.executable,
            NNODES="2",
            NODE_RANK=str(node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [
                    "bash",
                    str(REPO / "scripts" / "mm_run.sh"),
                    "textvqa",
                    "qwen2_vl",
                    *overrides(demo, out, "dp=2", "tp=1"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert_same_answers(out, reference)
    assert {p.name for p in (out / "records").rglob("*.jsonl")} == {"records_dp0.jsonl", "records_dp1.jsonl"}
