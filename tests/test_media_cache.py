"""The preprocessed-media cache hands the model bit-identical input to qwen-vl-utils' own path."""
import json

import numpy as np
import pytest
import torch

from modeltest.media_cache import MediaCache


def elements(demo):
    image = {"type": "image", "image": str(demo.root / "textvqa" / "images" / "demo_003.jpg"),
             "min_pixels": 3136, "max_pixels": 12845056}
    video = {"type": "video", "video": str(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"),
             "fps": 0.5, "min_frames": 4, "max_frames": 768, "min_pixels": 100352, "max_pixels": 602112,
             "total_pixels": 19267584}
    return image, video


def test_hits_are_bit_identical_to_the_reference_and_corruption_is_recomputed(demo, tmp_path):
    from qwen_vl_utils.vision_process import fetch_image, fetch_video
    image, video = elements(demo)
    ref_image, ref_video = np.asarray(fetch_image(dict(image))), fetch_video(dict(video))
    first = MediaCache(tmp_path, 1 << 30)
    assert np.array_equal(np.asarray(first.image(dict(image))), ref_image)
    assert torch.equal(first.video(dict(video)), ref_video) and first.misses == 2 and first.hits == 0
    second = MediaCache(tmp_path, 1 << 30)                        # a new run: from disk
    got_image, got_video = second.image(dict(image)), second.video(dict(video))
    assert second.hits == 2 and second.misses == 0
    assert np.array_equal(np.asarray(got_image), ref_image) and got_image.mode == "RGB"
    assert torch.equal(got_video, ref_video) and got_video.dtype == ref_video.dtype
    # A truncated entry is detected (checksum), removed and computed again.
    entry = next(p for p in tmp_path.glob("*/*.bin") if p.stat().st_size > 10000)
    entry.write_bytes(entry.read_bytes()[:-100])
    third = MediaCache(tmp_path, 1 << 30)
    assert torch.equal(third.video(dict(video)), ref_video) and np.array_equal(np.asarray(third.image(dict(image))),
                                                                                ref_image)
    assert third.misses == 1 and third.hits == 1
    # Another option that changes the frames is another entry.
    assert third.key(dict(video, fps=1.0), "video") != third.key(dict(video), "video")


def test_size_bound_evicts_least_recently_used(demo, tmp_path):
    image, video = elements(demo)
    cache = MediaCache(tmp_path, 10_000)                           # smaller than one video entry
    cache.image(dict(image))
    cache.video(dict(video))
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.bin")) <= 10_000


@pytest.mark.parametrize("task", ["videobench"])
def test_harness_runs_reuse_the_cache_and_answer_identically(demo, tmp_path, task):
    from modeltest.config import load_config
    from modeltest.runner import Evaluator

    def run(out, cache):
        cfg = load_config(task, "qwen2_vl", [f"model.model_path={demo.model}", f"task.local_dataset_path={demo.videobench_qa}",
                                             "task.subject_mapping=null", f"output_dir={out}", "max_output_length=4",
                                             f"media_cache={cache}"])
        result = Evaluator(cfg, show_progress=False).run()
        return result, json.loads(result.paths.summary_json.read_text())["media_cache"]
    off, none = run(tmp_path / "off", "off")
    first, stats1 = run(tmp_path / "a", tmp_path / "cache")
    second, stats2 = run(tmp_path / "b", tmp_path / "cache")
    assert none is None and stats1["misses"] > 0
    assert stats2["misses"] == 0 and stats2["hits"] == len(first.records)
    outputs = lambda r: [(x.id, x.output, x.input_tokens) for x in r.records]   # noqa: E731
    assert outputs(first) == outputs(off) == outputs(second)
    assert first.paths.result_csv.read_text() == off.paths.result_csv.read_text()
