"""`modeltest demo`: build the tiny model and datasets, then run both tasks through scripts/mm_run.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..config.loader import default_config_dir
from .datasets import build_textvqa, build_videobench
from .planted import (
    EXPECTED_TEXTVQA_SCORE,
    EXPECTED_VIDEOBENCH,
    PLANTED_ALL,
    PLANTED_ONE,
    PLANTED_VIDEOBENCH,
    plant_textvqa,
    plant_videobench,
)
from .tiny_model import build_tiny_qwen2vl

DEMO_VERSION = 4  # bump when what is built changes, so an old demo folder is rebuilt


@dataclass
class DemoPaths:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "Qwen2-VL-tiny-random"

    @property
    def qwen2_5_vl_model(self) -> Path:
        """The tiny random Qwen2.5-VL (`modeltest demo --model qwen2_5_vl`, transformers >= 4.49)."""
        return self.root / "Qwen2.5-VL-tiny-random"

    def model_for(self, model_name: str) -> Path:
        return self.qwen2_5_vl_model if model_name == "qwen2_5_vl" else self.model

    @property
    def textvqa_jsonl(self) -> Path:
        return self.root / "textvqa" / "textvqa_val.jsonl"

    @property
    def videobench_qa(self) -> Path:
        return self.root / "videobench" / "Eval_QA"

    @property
    def stamp(self) -> Path:
        return self.root / "demo.json"


def build_demo(root: str | Path = "demo_data", force: bool = False, seed: int = 0) -> DemoPaths:
    paths = DemoPaths(Path(root).resolve())
    if not force and paths.stamp.is_file():
        try:
            if json.loads(paths.stamp.read_text()).get("version") == DEMO_VERSION:
                return paths
        except json.JSONDecodeError:
            pass
    paths.root.mkdir(parents=True, exist_ok=True)
    print(f"building the demo in {paths.root} (tiny random Qwen2-VL, seed {seed}) ...", flush=True)
    build_tiny_qwen2vl(paths.model, seed=seed)
    build_textvqa(paths.textvqa_jsonl.parent, seed=seed)
    build_videobench(paths.videobench_qa.parent, seed=seed)
    print("planting the tiny model's own answers into a few TextVQA annotations (demo/planted.py) ...", flush=True)
    plant_textvqa(paths.model, paths.textvqa_jsonl)
    print("planting the tiny model's own answers as options of a few VideoBench questions ...", flush=True)
    try:
        plant_videobench(paths.model, paths.videobench_qa)
        planted = True
    except RuntimeError as e:  # the demo still runs; its VideoBench scores are then 0
        print(f"warning: {e}; the demo's VideoBench scores will be 0, not the planted ones", flush=True)
        planted = False
    paths.stamp.write_text(json.dumps({"version": DEMO_VERSION, "seed": seed, "videobench_planted": planted}))
    return paths


def build_demo_qwen2_5_vl(paths: DemoPaths, force: bool = False, seed: int = 0) -> Path:
    """The tiny random Qwen2.5-VL beside the demo's Qwen2-VL (same tokenizer and datasets), built
    once (again with force). Refused in one line by a transformers older than 4.49."""
    out = paths.qwen2_5_vl_model
    if force or not (out / COMPLETE).is_file():
        print(f"building a tiny random Qwen2.5-VL (seed {seed}) in {out} ...", flush=True)
        build_tiny_qwen2vl(out, seed=seed, model_type="qwen2_5_vl")
        (out / COMPLETE).write_text(json.dumps({"seed": seed}))
    return out


COMPLETE = ".modeltest-complete"  # written last: a folder without it is an interrupted build


def demo_overrides(paths: DemoPaths, task: str, model_name: str = "qwen2_vl") -> List[str]:
    common = [f"model.model_path={paths.model_for(model_name)}"]
    if task == "textvqa":
        return common + [f"task.local_dataset_path={paths.textvqa_jsonl}"]
    # subject_mapping=null: every subject the demo dataset has.
    return common + [f"task.local_dataset_path={paths.videobench_qa}", "task.subject_mapping=null"]


def run_demo(paths: DemoPaths, extra: Optional[List[str]] = None, model_name: str = "qwen2_vl") -> int:
    script = default_config_dir().parent / "scripts" / "mm_run.sh"
    env = dict(os.environ, MODELTEST_PYTHON=sys.executable)
    for task in ("textvqa", "videobench"):
        cmd = ["bash", str(script), task, model_name, *demo_overrides(paths, task, model_name), *(extra or [])]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            return rc
    # The review of each run: `modeltest report` (with a second run, it would compare them).
    out = demo_output_dir(extra, model_name)
    for task in ("textvqa", "videobench"):
        cmd = [
            sys.executable,
            "-m",
            "modeltest",
            "report",
            str(out),
            "--task",
            task,
            "--out",
            str(out / "report" / task),
        ]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            return rc
    print(next_steps(paths, out, model_name), flush=True)
    return 0


def next_steps(paths: DemoPaths, out: Path, model_name: str = "qwen2_vl") -> str:
    """What to try after the demo, as commands that work as written: `modeltest` is the console
    script of the environment this demo ran in (.venv/bin/modeltest after scripts/demo.sh)."""
    exe = Path(sys.executable).parent / "modeltest"
    activate = Path(sys.executable).parent / "activate"
    prefix = f"source {activate}   # puts `modeltest` on your PATH\n  " if activate.is_file() else ""
    cli = "modeltest" if activate.is_file() or not exe.is_file() else str(exe)
    videobench = (
        f"VideoBench only on the {len(PLANTED_VIDEOBENCH)} questions whose answer key is the option the model "
        f"repeats (weighted score {EXPECTED_VIDEOBENCH['weighted_score']:.4f}; demo/planted.py)"
        if json.loads(paths.stamp.read_text()).get("videobench_planted")
        else "VideoBench 0 (no question could be planted on this machine)"
    )
    planted = (
        f"TextVQA scores only on the questions whose annotations hold the model's own answers "
        f"({len(PLANTED_ALL)} fully, {len(PLANTED_ONE)} once: {EXPECTED_TEXTVQA_SCORE:.4f} on a CPU run), {videobench}"
        if model_name == "qwen2_vl"
        else "the planted answers (demo/planted.py) are the Qwen2-VL demo model's, so this one scores 0"
    )
    return (
        f"\nThe weights are random, so the answers are nonsense: {planted}. Next, try:\n"
        f"  {prefix}"
        f"{cli} report {out}                          # the review page of these runs\n"
        f"  {cli} serve --model_path {paths.model_for(model_name)} --port 8000 &\n"
        f"  {cli} bench-serve textvqa {model_name} model.api_base=http://127.0.0.1:8000/v1 "
        f"task.local_dataset_path={paths.textvqa_jsonl} --num-prompts 8   # benchmark the server\n"
        f"  {cli} --help                              # every command"
    )


def demo_output_dir(extra: Optional[List[str]], model_name: str = "qwen2_vl") -> Path:
    """Where the demo's runs write: an output_dir=... among the extra overrides, else the default."""
    from ..outputs import default_output_dir

    for item in extra or []:
        if item.startswith(("output_dir=", "run.output_dir=")):
            return Path(item.split("=", 1)[1])
    return default_output_dir(model_name)
