"""scripts/run_pa.sh: the reference runner's interface, its results file and benchmark CSV."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[1]


def run_pa(args, env_extra=None, check=True):
    env = dict(os.environ, MODELTEST_PYTHON=sys.executable, **(env_extra or {}))
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "run_pa.sh"), *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_folder_of_images_and_video_engine_vs_hf_and_tp2(demo, tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(demo.root / "textvqa" / "images" / "demo_000.jpg", folder / "a.jpg")
    shutil.copy(demo.root / "textvqa" / "images" / "demo_001.jpg", folder / "b.jpg")
    shutil.copy(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4", folder / "c.mp4")
    (folder / "notes.txt").write_text("ignored")
    common = [
        "--model_path",
        str(demo.model),
        "--dataset_path",
        str(folder),
        "--input_text",
        "What is it?",
        "--max_batch_size",
        "2",
        "--max_output_length",
        "6",
    ]
    outs = {}
    for name, extra in (("engine", []), ("hf", ["--backend", "hf"]), ("tp2", ["--world_size", "2"])):
        res = tmp_path / f"{name}.json"
        proc = run_pa(common + extra + ["--results_save_path", str(res)])
        assert "Latency(s):" in proc.stdout and "Throughput(tokens/s):" in proc.stdout
        assert "Question[2]: What is it?" in proc.stdout and "Generate[2] token num:" in proc.stdout
        outs[name] = json.loads(res.read_text())
    engine = outs["engine"]
    assert len(engine) == 3 and engine[2]["input"]["media"].endswith("c.mp4")
    for r in engine:
        assert set(r) >= {"input", "output", "output_token_ids", "prefill_time", "decode_token_time", "e2e_time"}
        assert r["prefill_time"] > 0 and r["e2e_time"] > 0
    assert [r["output_token_ids"] for r in outs["hf"]] == [r["output_token_ids"] for r in engine]
    assert [r["output_token_ids"] for r in outs["tp2"]] == [r["output_token_ids"] for r in engine]


def test_benchmark_mode_prints_reference_line_and_writes_csv(demo, tmp_path):
    bench = tmp_path / "bench" / "benchmark.csv"
    proc = run_pa(
        [
            "--model_path",
            str(demo.model),
            "--input_image",
            str(demo.root / "textvqa" / "images" / "demo_000.jpg"),
            "--max_batch_size",
            "3",
            "--max_output_length",
            "5",
            "--ignore_eos",
            "--results_save_path",
            str(tmp_path / "r.json"),
        ],
        {"ATB_LLM_BENCHMARK_ENABLE": "1", "ATB_LLM_BENCHMARK_FILEPATH": str(bench)},
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Prefill time:"))
    assert "Prefill average time:" in line and "Decode token time:" in line and "E2E time:" in line
    rows = list(csv.DictReader(open(bench)))
    assert list(rows[0]) == [
        "batch_size",
        "input_seq_len",
        "output_seq_len",
        "e2e_time(ms)",
        "prefill_time(ms)",
        "decoder_token_time(ms)",
        "prefill_count",
        "prefill_token_times",
        "decode_token_times",
        "prefill_average_time(ms)",
    ]
    assert rows[0]["batch_size"] == "3" and rows[0]["output_seq_len"] == "5" and rows[0]["prefill_count"] == "1"
    assert len(rows[0]["decode_token_times"].split()) == 4  # 5 tokens: 1 from prefill + 4 decode passes
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results) == 3 and all(len(r["output_token_ids"]) == 5 for r in results)


def test_bad_arguments_are_one_line_errors(demo, tmp_path):
    proc = run_pa(["--model_path", str(tmp_path), "--input_image", "x.jpg"], check=False)
    assert proc.returncode == 2 and "has no config.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_pa(["--model_path", str(demo.model), "--input_image", str(tmp_path / "missing.png")], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    image = demo.root / "textvqa" / "images" / "demo_000.jpg"
    proc = run_pa(
        ["--model_path", str(demo.model), "--input_image", str(image), "--backend", "hf", "--no_prefix_cache"],
        check=False,
    )
    assert (
        proc.returncode == 2 and "--no_prefix_cache is an engine setting; use it with --backend engine" in proc.stderr
    )


def test_one_bad_file_in_a_folder_is_that_requests_error(demo, tmp_path):
    """A corrupt image in --dataset_path: its entry in results.json has `error`, the rest run."""
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(demo.root / "textvqa" / "images" / "demo_000.jpg", folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a jpeg at all")
    shutil.copy(demo.root / "textvqa" / "images" / "demo_001.jpg", folder / "c.jpg")
    res = tmp_path / "r.json"
    proc = run_pa(
        [
            "--model_path",
            str(demo.model),
            "--dataset_path",
            str(folder),
            "--max_output_length",
            "4",
            "--results_save_path",
            str(res),
        ],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "1 of 3 request(s) failed" in proc.stderr
    results = json.loads(res.read_text())
    assert [r["input"]["media"].rsplit("/", 1)[-1] for r in results] == ["a.jpg", "b.jpg", "c.jpg"]
    assert results[0]["error"] is None and results[2]["error"] is None and results[0]["output_token_ids"]
    assert "b.jpg" in results[1]["error"] and results[1]["output"] is None
    assert "Answer[1]: ERROR" in proc.stdout
