"""What a user sees next to what the engine can do: the harness's end-to-end samples/s on
real-size media (cold media cache, then warm) against the engine alone on the same prepared
inputs, one loaded model for all three (`modeltest bench-prep --infer PRESET`).

The media become TextVQA- and VideoBench-format datasets (the on-disk formats the tasks read),
so the harness run is the one `scripts/mm_run.sh` makes: its loader, its preprocessing (worker
processes, media cache, fast processor), its records.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple


def write_datasets(folder: Path, photos: List[Path], clips: List[Path], questions: int) -> Tuple[Path, Path]:
    """(textvqa_val.jsonl, Eval_QA folder) over the media, by symlink."""
    tv = folder / "textvqa"
    (tv / "images").mkdir(parents=True, exist_ok=True)
    lines, annotations = [], []
    for i, p in enumerate(photos):
        link = tv / "images" / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
        lines.append(
            {"image": f"images/{p.name}", "question": "what does the sign say?", "question_id": i, "answer": "sign"}
        )
        annotations.append(
            {
                "question_id": i,
                "image_id": p.stem,
                "question": "what does the sign say?",
                "answers": [{"answer": "sign", "answer_id": k + 1, "answer_confidence": "yes"} for k in range(10)],
            }
        )
    (tv / "textvqa_val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tv / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}))

    vb = folder / "videobench"
    qa = vb / "Eval_QA"
    (qa / "answer").mkdir(parents=True, exist_ok=True)
    (vb / "Eval_video" / "Real").mkdir(parents=True, exist_ok=True)
    entries, key = {}, {}
    for c in clips:
        link = vb / "Eval_video" / "Real" / c.name
        if not link.exists():
            link.symlink_to(c.resolve())
        for q in range(questions):
            qid = f"{c.stem}_{q}"
            entries[qid] = {
                "vid_path": f"Eval_video/Real/{c.name}",
                "video_id": c.stem,
                "question": f"Question {q}: what happens in the clip?",
                "choices": {"A": "a pattern moves", "B": "nothing", "C": "a dunk", "D": "rain"},
            }
            key[qid] = "A"
    (qa / "Real_QA_new.json").write_text(json.dumps(entries))
    (qa / "answer" / "ANSWER.json").write_text(json.dumps({"Real": key}))
    return tv / "textvqa_val.jsonl", qa


def clear_engine_caches(backend) -> None:
    """Each timed run starts with the engine's reuse caches empty, as a fresh run does."""
    from ..backends.engine import EngineBackend

    if isinstance(backend, EngineBackend):
        backend.engine.clear_caches()


def harness_vs_engine(
    checkpoint: Path,
    textvqa: Path,
    videobench: Path,
    device: str,
    data_type: str,
    batch_size: int,
    new_tokens: int,
    prep_workers: str,
) -> Dict[str, Dict[str, float]]:
    """Per task: engine-only samples/s, harness samples/s (cold and warm media cache) and their
    ratios, from one loaded model."""
    from ..backends import make_backend
    from ..backends.base import BackendSettings
    from ..config import load_config
    from ..media import InProcessMedia
    from ..media.workers import WorkerMedia
    from ..runner import Evaluator, max_new_tokens, media_source
    from ..tasks import TASKS

    out: Dict[str, Dict[str, float]] = {}
    for task, data in (("textvqa", textvqa), ("videobench", videobench)):
        with tempfile.TemporaryDirectory(prefix=f"bench-harness-{task}-") as tmp:
            overrides = [
                f"model.model_path={checkpoint}",
                f"task.local_dataset_path={data}",
                f"output_dir={tmp}/out",
                f"max_output_length={new_tokens}",
                f"batch_size={batch_size}",
                f"device={device}",
                f"model.data_type={data_type}",
                f"media_cache={tmp}/cache",
                f"prep_workers={prep_workers}",
                "resume=false",
            ]
            if task == "videobench":
                overrides.append("task.subject_mapping=null")
            cfg = load_config(TASKS, task, "qwen2_vl", overrides)
            n_new = max_new_tokens(cfg)
            print(f"[bench-prep] loading {checkpoint.name} on {device} for {task} ...", flush=True)
            backend = make_backend(BackendSettings.from_eval(cfg, device, n_new, InProcessMedia(None)))
            try:
                samples = Evaluator(cfg).task.load_samples(None)
                # Warm-up (allocator, kernels) on two samples without the cache, then the harness
                # with an empty one (cold).
                backend.generate([backend.prepare(s) for s in samples[:2]], n_new)
                backend.settings.media = media_source(cfg)
                # Worker processes up before the clock: a real run starts them while it loads the model.
                if isinstance(backend.settings.media, WorkerMedia):
                    backend.settings.media.pool.wait_started()
                clear_engine_caches(backend)
                t0 = time.perf_counter()
                Evaluator(cfg, backend=backend, show_progress=False).run()
                cold = len(samples) / (time.perf_counter() - t0)
                # Warm: a second model on the same data (same cache, nothing decoded).
                clear_engine_caches(backend)
                t0 = time.perf_counter()
                Evaluator(cfg, backend=backend, show_progress=False).run()
                warm = len(samples) / (time.perf_counter() - t0)
                # The engine alone on the very inputs the harness made (prepared beforehand).
                prepared = [backend.prepare(s) for s in samples]
                clear_engine_caches(backend)
                t0 = time.perf_counter()
                backend.generate(prepared, n_new)
                engine = len(samples) / (time.perf_counter() - t0)
            finally:
                backend.settings.media.close()
        out[task] = {
            "samples": len(samples),
            "engine_only": engine,
            "harness_cold": cold,
            "harness_warm": warm,
            "warm_over_engine": warm / engine,
            "cold_over_engine": cold / engine,
        }
    return out
