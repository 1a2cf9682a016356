"""The benchmark's correctness checks (not its timings): report shape, token comparison, failure."""

import json

import pytest

from modeltest.cli import build_parser

pytestmark = pytest.mark.slow

ROW_KEYS = {
    "backend",
    "workload",
    "preset",
    "batch_size",
    "samples_per_s",
    "tokens_per_s",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "decode_ms_per_token",
    "peak_host_mb",
    "peak_device_mb",
}


@pytest.fixture
def bench_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MODELTEST_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench_cache"))


def run_bench(argv):
    args = build_parser().parse_args(["bench", *argv])
    return args.func(args)


def test_report_and_token_check(bench_cache, tmp_path):
    out = tmp_path / "b.json"
    rc = run_bench(
        [
            "--preset",
            "tiny",
            "--workload",
            "all",
            "--requests",
            "3",
            "--batch-sizes",
            "1,2",
            "--new-tokens",
            "4",
            "--dtype",
            "fp32",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0 and report["tokens_match"] is True
    assert {(r["backend"], r["workload"], r["batch_size"]) for r in report["results"]} == {
        (b, w, n) for b in ("engine", "hf") for w in ("textvqa", "videobench", "decode") for n in (1, 2)
    }
    assert all(ROW_KEYS <= set(r) for r in report["results"])
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in report["results"])
    # Every timed engine run computes its media: the same inputs at each batch size and repeat
    # must not be answered from the prefix or vision cache of the run before (hf keeps nothing).
    media_rows = [r for r in report["results"] if r["workload"] != "decode"]
    assert all(r["vision_ms"] > 0 for r in media_rows), [
        (r["backend"], r["batch_size"], r["vision_ms"]) for r in media_rows
    ]
    # textvqa/videobench: best against best; decode: equal batch sizes.
    assert [(r["workload"], r["engine_batch_size"] == r["hf_batch_size"]) for r in report["ratios"]][-2:] == [
        ("decode", True),
        ("decode", True),
    ]
    assert {r["workload"] for r in report["ratios"]} == {"textvqa", "videobench", "decode"}


def test_token_mismatch_is_reported_and_fails(bench_cache, tmp_path, monkeypatch):
    from modeltest.bench import runners

    original = runners.EngineRunner.run

    def corrupted(self, inputs, new_tokens, batch_size):
        m = original(self, inputs, new_tokens, batch_size)
        m.tokens[0] = [t + 1 for t in m.tokens[0]]
        return m

    monkeypatch.setattr(runners.EngineRunner, "run", corrupted)
    out = tmp_path / "b.json"
    rc = run_bench(
        [
            "--preset",
            "tiny",
            "--workload",
            "decode",
            "--requests",
            "2",
            "--batch-sizes",
            "1",
            "--new-tokens",
            "3",
            "--dtype",
            "fp32",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 1 and report["tokens_match"] is False
    assert report["mismatches"][0]["request"] == 0


def test_repeats_keep_the_median_run_and_must_agree(bench_cache, tmp_path, monkeypatch):
    from modeltest.bench import runners

    out = tmp_path / "b.json"
    rc = run_bench(
        [
            "--preset",
            "tiny",
            "--workload",
            "decode",
            "--requests",
            "2",
            "--batch-sizes",
            "1",
            "--new-tokens",
            "3",
            "--dtype",
            "fp32",
            "--repeats",
            "3",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0 and report["tokens_match"] is True and report["repeats"] == 3

    # A backend whose repeats disagree (nondeterminism) fails the run even if one repeat matches.
    original, calls = runners.EngineRunner.run, []

    def flaky(self, inputs, new_tokens, batch_size):
        m = original(self, inputs, new_tokens, batch_size)
        calls.append(1)
        if len(calls) == 3:
            m.tokens[1] = [t + 1 for t in m.tokens[1]]
        return m

    monkeypatch.setattr(runners.EngineRunner, "run", flaky)
    rc = run_bench(
        [
            "--preset",
            "tiny",
            "--workload",
            "decode",
            "--requests",
            "2",
            "--batch-sizes",
            "1",
            "--new-tokens",
            "3",
            "--dtype",
            "fp32",
            "--repeats",
            "3",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 1 and report["tokens_match"] is False
    assert report["mismatches"][0]["problem"] == "tokens differ between repeats"


def test_paired_order_interleaves_backends_and_pairs_the_ratios(bench_cache, tmp_path, monkeypatch):
    from modeltest.bench import runners

    calls = []
    for cls in (runners.EngineRunner, runners.HFRunner):

        def recorded(self, inputs, new_tokens, batch_size, _orig=cls.run):
            calls.append((self.name, batch_size, len(inputs)))
            return _orig(self, inputs, new_tokens, batch_size)

        monkeypatch.setattr(cls, "run", recorded)
    out = tmp_path / "b.json"
    rc = run_bench(
        [
            "--preset",
            "tiny",
            "--workload",
            "textvqa",
            "--requests",
            "2",
            "--batch-sizes",
            "1,2",
            "--new-tokens",
            "2",
            "--dtype",
            "fp32",
            "--repeats",
            "3",
            "--check-requests",
            "0",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0 and report["order"] == "paired"
    timed = [(name, bs) for name, bs, n in calls if n == 2]  # warm-ups run one request
    assert timed == [("engine", 1), ("hf", 1), ("engine", 2), ("hf", 2)] * 3
    ratio = report["ratios"][0]
    assert len(ratio["samples_per_s_by_repeat"]) == 3
    assert ratio["samples_per_s"] == sorted(ratio["samples_per_s_by_repeat"])[1]

    calls.clear()
    rc = run_bench(
        [
            "--preset",
            "tiny",
            "--workload",
            "textvqa",
            "--requests",
            "2",
            "--batch-sizes",
            "1",
            "--new-tokens",
            "2",
            "--dtype",
            "fp32",
            "--repeats",
            "2",
            "--order",
            "sequential",
            "--check-requests",
            "0",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0 and [(name, bs) for name, bs, n in calls if n == 2] == [("engine", 1)] * 2 + [("hf", 1)] * 2
    assert "samples_per_s_by_repeat" not in report["ratios"][0]


def test_out_of_memory_with_both_backends_loaded_says_what_to_do(bench_cache, monkeypatch):
    import torch

    from modeltest.bench import runners
    from modeltest.errors import UserError

    def no_room(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runners.HFRunner, "__init__", no_room)
    with pytest.raises(UserError, match="rerun with --order sequential"):
        run_bench(
            [
                "--preset",
                "tiny",
                "--workload",
                "decode",
                "--requests",
                "1",
                "--batch-sizes",
                "1",
                "--new-tokens",
                "2",
                "--dtype",
                "fp32",
            ]
        )
    with pytest.raises(torch.OutOfMemoryError):  # sequential: nothing to suggest, the real error
        run_bench(
            [
                "--preset",
                "tiny",
                "--workload",
                "decode",
                "--requests",
                "1",
                "--batch-sizes",
                "1",
                "--new-tokens",
                "2",
                "--dtype",
                "fp32",
                "--order",
                "sequential",
            ]
        )


def test_memory_is_attributed_to_the_backend_that_used_it():
    from modeltest.bench.run import attribute_memory
    from modeltest.bench.runners import Measurement

    # Absolute peaks include whatever else the process holds (another backend's model in paired
    # order); the reported figure is baseline + own resident growth + own run growth.
    m = Measurement(
        "hf",
        1,
        1.0,
        [[1]],
        [0.1],
        None,
        0.0,
        peak_host_mb=5000.0,
        peak_device_mb=9000.0,
        host_growth_mb=30.0,
        device_growth_mb=200.0,
    )
    attribute_memory(m, resident_mb=400.0, load_device_mb=1500.0, base_rss_mb=800.0)
    assert (m.peak_host_mb, m.peak_device_mb) == (1230.0, 1700.0)
    cpu = Measurement(
        "engine",
        1,
        1.0,
        [[1]],
        [0.1],
        None,
        0.0,
        peak_host_mb=5000.0,
        peak_device_mb=None,
        host_growth_mb=10.0,
        device_growth_mb=None,
    )
    attribute_memory(cpu, resident_mb=100.0, load_device_mb=0.0, base_rss_mb=800.0)
    assert (cpu.peak_host_mb, cpu.peak_device_mb) == (910.0, None)


def test_low_precision_runs_check_tokens_in_fp32(bench_cache, tmp_path):
    out = tmp_path / "b.json"
    rc = run_bench(
        [
            "--preset",
            "tiny",
            "--workload",
            "textvqa",
            "--requests",
            "2",
            "--batch-sizes",
            "1",
            "--new-tokens",
            "3",
            "--dtype",
            "bf16",
            "--check-requests",
            "1",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0 and report["tokens_checked_in"] == "fp32" and report["tokens_match"] is True
    assert "lowp_tokens_match" in report


def test_reuse_workloads_report_their_figures_and_refuse_options_they_do_not_read(bench_cache, tmp_path):
    """The reuse benchmarks' checks, not their timings: reuse on gives the off path's tokens and
    says what it reused; the probe and the capacity count report their figures."""
    from modeltest.errors import UserError

    out = tmp_path / "shared.json"
    argv = ["--preset", "tiny", "--dtype", "fp32", "--json", str(out)]
    shared = ["--workload", "videobench-shared", "--clips", "1", "--questions-per-clip", "2", "--clip", "4x112x112"]
    assert run_bench([*argv, *shared, "--new-tokens", "4"]) == 0
    report = json.loads(out.read_text())
    assert report["tokens_identical"] is True and report["reuse"]["vision_cache_hits"] == 1
    assert report["samples_per_s"]["reuse_on"] > 0 and report["samples_per_s"]["reuse_off"] > 0
    probe_argv = ["--workload", "serving-probe", "--long-prompt", "2048", "--max-num-batched-tokens", "256"]
    assert run_bench([*argv, *probe_argv]) == 0
    probe = json.loads(out.read_text())
    # in one pass the streams wait for the whole prefill; in 8 chunks they go on between them
    assert probe["one_pass"]["gap_over_ttft"] > 0.95 and 0 < probe["chunked"]["gap_over_ttft"] < 0.75
    assert run_bench([*argv, "--workload", "kv-capacity"]) == 0
    capacity = json.loads(out.read_text())
    assert capacity["on_demand"]["peak_running"] > capacity["reserved"]["peak_running"]
    with pytest.raises(UserError, match="--requests does not apply to --workload kv-capacity"):
        run_bench([*argv, "--workload", "kv-capacity", "--requests", "3"])
    with pytest.raises(UserError, match="--clips does not apply to --workload textvqa"):
        run_bench([*argv, "--workload", "textvqa", "--clips", "3"])


def test_unknown_preset_is_a_clear_error(bench_cache):
    from modeltest.errors import UserError

    with pytest.raises(UserError, match="--preset huge: unknown; choose one of tiny, mid, 2b, 7b"):
        run_bench(["--preset", "huge"])


def test_half_built_preset_folder_is_rebuilt(tmp_path, monkeypatch):
    """An interrupted earlier build left weights but no processor files: detected and rebuilt,
    and a build that fails leaves no folder that looks finished."""
    from modeltest.bench import presets

    monkeypatch.setenv("MODELTEST_BENCH_CACHE", str(tmp_path))
    half = tmp_path / "tiny-seed0"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 64)  # weights only, no processor files
    out = presets.preset_checkpoint("tiny", 0)
    assert out == half and (out / presets.COMPLETE_MARKER).is_file()
    assert (out / "config.json").is_file() and (out / "model.safetensors").stat().st_size > 64
    assert list(out.glob("*processor*.json"))  # preprocessor_config.json (4.x) / processor_config.json (5.x)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    def broken(folder, *a, **kw):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(presets, "build_tiny_qwen2vl", broken)
    with pytest.raises(KeyboardInterrupt):
        presets.preset_checkpoint("tiny", 1)
    assert not (tmp_path / "tiny-seed1").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_cached_preset_damaged_after_it_was_built_is_rebuilt(tmp_path, monkeypatch, capsys):
    from modeltest.bench import presets

    monkeypatch.setenv("MODELTEST_BENCH_CACHE", str(tmp_path))
    out = presets.preset_checkpoint("tiny", 0)
    assert presets.checkpoint_damage(out) is None
    built = (out / "model.safetensors").stat().st_mtime_ns
    assert presets.preset_checkpoint("tiny", 0) == out and (out / "model.safetensors").stat().st_mtime_ns == built
    (out / "tokenizer.json").unlink()
    assert presets.checkpoint_damage(out) == "tokenizer.json is missing"
    capsys.readouterr()
    assert presets.preset_checkpoint("tiny", 0) == out and (out / "tokenizer.json").is_file()
    assert f"[bench] {out}: tokenizer.json is missing; rebuilding it" in capsys.readouterr().out
    with open(out / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert presets.checkpoint_damage(out).startswith("model.safetensors is 100 bytes")
    presets.preset_checkpoint("tiny", 0)
    assert presets.checkpoint_damage(out) is None


def test_bench_prep_reports_the_split_the_cache_and_harness_vs_engine(tmp_path, monkeypatch):
    """bench-prep on tiny generated media: every medium timed, the warm cache decodes nothing,
    worker processes measured, and (--infer) the harness next to the engine alone."""
    monkeypatch.setenv("MODELTEST_BENCH_CACHE", str(tmp_path))
    out = tmp_path / "prep.json"
    assert (
        run_bench_prep(
            [
                "--photos",
                "2",
                "--photo-size",
                "320x240",
                "--clips",
                "2x160x120",
                "--questions-per-clip",
                "2",
                "--workers",
                "1",
                "--infer",
                "tiny",
                "--device",
                "cpu",
                "--batch-size",
                "2",
                "--new-tokens",
                "2",
                "--prep-workers",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["samples"] == 4 and set(r["per_medium"]) == {
        "photo_0_320x240.jpg",
        "photo_1_320x240.jpg",
        "clip_2s_160x120.mp4",
    }
    assert all(
        v["decode_s"] > 0
        and v["processor_s"] > 0
        and v["fast_processor_s"] > 0
        and v["warm_question_s"] > 0
        and v["warm_next_question_s"] > 0
        for v in r["per_medium"].values()
    )
    assert set(r["pipeline_samples_per_s"]) == {
        "2 threads, transformers' processor, cache off",
        "2 threads, cache off",
        "2 threads, cache cold",
        "2 threads, cache warm",
        "1 worker(s), cache cold",
        "1 worker(s), cache warm",
        "1 worker(s), decode only, cache cold",
    }
    tasks = r["infer"]["tasks"]
    assert set(tasks) == {"textvqa", "videobench"} and tasks["textvqa"]["samples"] == 2
    assert tasks["videobench"]["samples"] == 2
    assert all(t[k] > 0 for t in tasks.values() for k in ("engine_only", "harness_cold", "harness_warm"))
    assert r["cache"]["warm"]["misses"] == 0 and r["cache"]["warm"]["hits"] == 4
    # Cold: each medium decoded once, even when both threads start on the clip's two questions.
    assert r["cache"]["cold"]["misses"] == 3 and r["cache"]["cold"]["hits"] == 1


def run_bench_prep(argv):
    args = build_parser().parse_args(["bench-prep", *argv])
    return args.func(args)
