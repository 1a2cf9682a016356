"""Shared fixtures: the demo model and datasets, built once per test session from a fixed seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs started by the tests keep their preprocessed-media cache out of the user's ~/.cache.
if "MODELTEST_MEDIA_CACHE" not in os.environ:
    import tempfile

    os.environ["MODELTEST_MEDIA_CACHE"] = tempfile.mkdtemp(prefix="modeltest-media-cache-")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo model and datasets, built for this session — or, with MODELTEST_TEST_DEMO set, a
    demo folder built earlier by `modeltest demo --build-only` (a machine without the demo's
    build dependencies, such as a lent GPU, runs the tests on one built elsewhere)."""
    from modeltest.demo.build import build_demo

    prebuilt = os.environ.get("MODELTEST_TEST_DEMO")
    return build_demo(prebuilt if prebuilt else tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture
def data_copy(demo, tmp_path):
    """A writable copy of the demo datasets (the model is shared read-only)."""
    shutil.copytree(demo.textvqa_jsonl.parent, tmp_path / "textvqa")
    shutil.copytree(demo.videobench_qa.parent, tmp_path / "videobench")
    return tmp_path


def slow_samples(seconds: float) -> dict:
    """Environment for a modeltest process that waits `seconds` after each finished sample (so a
    test can kill it halfway): tests/hooks/sitecustomize.py does it; modeltest itself reads no
    such setting."""
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "hooks"), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "MODELTEST_TEST_SLOW_SAMPLE_S": str(seconds)}


def run_mm(task: str, overrides, check: bool = True, model: str = "qwen2_vl") -> subprocess.CompletedProcess:
    """Run `bash scripts/mm_run.sh TASK MODEL ...` (MODEL: qwen2_vl unless given) as a user would.

    Unless the test sets prep_workers, these runs decode in the harness's threads
    (prep_workers=0): each new process would otherwise start a forkserver for its media workers
    (seconds of imports on CI's two cores, ~40 runs). The worker path has its own tests
    (test_media_workers, test_resume's SIGKILL and Ctrl-C runs, test_bench, the demo command)."""
    if not any(str(o).startswith("prep_workers=") for o in overrides):
        overrides = [*overrides, "prep_workers=0"]
    env = dict(os.environ, MODELTEST_PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "mm_run.sh"), task, model, *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mm_run.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_debug(out_dir: Path, task: str):
    folder = out_dir / "debug" / task
    files = sorted((folder if folder.is_dir() else out_dir / "debug").rglob("output_*.txt"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]


def read_csv(out_dir: Path, task: str):
    import csv

    files = sorted((out_dir / "results").rglob(f"{task}_*_result.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f)), files[0]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (with the reason) where there is none. The
    other markers (`slow`, `subprocess`) only select: `bash scripts/test.sh --fast` leaves them out."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run the gpu-marked tests where one is lent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
