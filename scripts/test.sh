#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up .venv, check lint and formatting (ruff), run
# pytest; then, with no arguments, run the transformers-facing tests again with transformers 5
# (.venv-t5, see scripts/setup_compat_env.sh), and the Qwen2.5-VL tests with transformers 4.57
# and 4.49 (.venv-t457, .venv-t449). Arguments go to the first pytest run only (and skip the others).
#   bash scripts/test.sh --fast    the unit layer only (no model-loading subprocesses, no servers,
#                                  no benchmarks): the inner loop, a few minutes on 2 cores
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup_env.sh"
cd "$repo"
"$repo/.venv/bin/ruff" check modeltest tests docs
"$repo/.venv/bin/ruff" format --check modeltest tests docs
# The demo model and datasets once for every pass (tests/conftest.py reads MODELTEST_TEST_DEMO;
# test_end_to_end's demo test still builds one from scratch in each pass). Built afresh each time.
"$repo/.venv/bin/python" -m modeltest demo --build-only --force --dir "$repo/.test-demo" >/dev/null
export MODELTEST_TEST_DEMO="$repo/.test-demo"
if [[ ${1:-} == --fast ]]; then
    shift
    exec "$repo/.venv/bin/python" -m pytest -q -m "not slow and not subprocess" "$@"
fi
bash "$repo/scripts/setup_browser.sh"
"$repo/.venv/bin/python" -m pytest -q "$@"
if [[ $# -eq 0 && ${MODELTEST_SKIP_T5:-0} != 1 ]]; then
    bash "$repo/scripts/setup_compat_env.sh"
    echo "[test] the transformers-facing tests again, with transformers 5"
    "$repo/.venv-t5/bin/python" -m pytest -q \
        tests/test_engine.py::test_matches_transformers_logits_and_greedy_tokens \
        tests/test_engine.py::test_newer_checkpoint_naming_loads \
        tests/test_prompt_golden.py tests/test_bench.py tests/test_batch_invariance.py \
        tests/test_end_to_end.py::test_textvqa_end_to_end tests/test_end_to_end.py::test_videobench_end_to_end \
        tests/test_end_to_end.py::test_demo_command_builds_and_runs_both_tasks \
        tests/test_end_to_end.py::test_corrupt_weights_are_one_line_naming_the_file \
        tests/test_engine_harness.py tests/test_run_pa.py \
        tests/test_serve.py::test_greedy_answers_equal_the_in_process_engine \
        tests/test_inputs.py tests/test_foreign_server.py tests/test_vision_windows.py tests/test_qwen2_5_vl.py \
        --deselect tests/test_bench.py::test_bench_prep_reports_the_split_the_cache_and_harness_vs_engine \
        --deselect tests/test_engine_harness.py::test_tensor_parallel_harness_run_matches_single_process \
        --deselect tests/test_batch_invariance.py::test_engine_answers_do_not_depend_on_the_batch_size
    # (bench-prep measures host preprocessing; the tp=2 harness run and the engine's batch-size
    # invariance repeat the engine path the tests above run: nothing in them depends on
    # transformers' version beyond that; deselected to keep CI near 30 minutes)
    # Qwen2.5-VL against the first and the last transformers 4 that have it (4.49, 4.57: video time
    # from video_kwargs, the slow image processor; 4.49 saves configs without default keys)
    for version in 4.57 4.49; do
        bash "$repo/scripts/setup_compat_env.sh" $version
        echo "[test] Qwen2.5-VL against transformers $version"
        "$repo/.venv-t${version/./}/bin/python" -m pytest -q tests/test_qwen2_5_vl.py \
            -k "not tensor_parallel and not harness and not server and not run_pa"
    done
fi
