"""The preprocessed-media cache hands the model bit-identical input to qwen-vl-utils' own path."""

import json

import numpy as np
import pytest
import torch

from modeltest.media.cache import MediaCache


def elements(demo):
    image = {
        "type": "image",
        "image": str(demo.root / "textvqa" / "images" / "demo_003.jpg"),
        "min_pixels": 3136,
        "max_pixels": 12845056,
    }
    video = {
        "type": "video",
        "video": str(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"),
        "fps": 0.5,
        "min_frames": 4,
        "max_frames": 768,
        "min_pixels": 100352,
        "max_pixels": 602112,
        "total_pixels": 19267584,
    }
    return image, video


def test_hits_are_bit_identical_to_the_reference_and_corruption_is_recomputed(demo, tmp_path):
    from qwen_vl_utils.vision_process import fetch_image, fetch_video

    image, video = elements(demo)
    ref_image, ref_video = np.asarray(fetch_image(dict(image))), fetch_video(dict(video))
    first = MediaCache(tmp_path, 1 << 30)
    assert np.array_equal(np.asarray(first.image(dict(image))), ref_image)
    assert torch.equal(first.video(dict(video)), ref_video) and first.misses == 2 and first.hits == 0
    second = MediaCache(tmp_path, 1 << 30)  # a new run: from disk
    got_image, got_video = second.image(dict(image)), second.video(dict(video))
    assert second.hits == 2 and second.misses == 0
    assert np.array_equal(np.asarray(got_image), ref_image) and got_image.mode == "RGB"
    assert torch.equal(got_video, ref_video) and got_video.dtype == ref_video.dtype
    # A truncated entry is detected (checksum), removed and computed again.
    entry = next(p for p in tmp_path.glob("*/*.bin") if p.stat().st_size > 10000)
    entry.write_bytes(entry.read_bytes()[:-100])
    third = MediaCache(tmp_path, 1 << 30)
    assert torch.equal(third.video(dict(video)), ref_video) and np.array_equal(
        np.asarray(third.image(dict(image))), ref_image
    )
    assert third.misses == 1 and third.hits == 1
    # Another option that changes the frames is another entry.
    assert third.key(dict(video, fps=1.0), "video") != third.key(dict(video), "video")


def test_size_bound_evicts_least_recently_used(demo, tmp_path):
    """a written, b written, a read again (by another process's cache: from disk), then c pushes
    the folder over its bound: b, the least recently used, goes; a and c stay."""
    import os
    import time

    image, _ = elements(demo)
    a, b, c = (dict(image, image=str(demo.root / "textvqa" / "images" / f"demo_00{i}.jpg")) for i in (1, 2, 3))
    writer = MediaCache(tmp_path, 1 << 30)
    path = {}
    for name, ele in (("a", a), ("b", b)):
        writer.image(dict(ele))
        path[name] = writer._path(writer.key(ele, "image"))
    now = time.time()
    os.utime(path["a"], (now - 30, now - 30))  # written long ago, a before b
    os.utime(path["b"], (now - 20, now - 20))
    assert MediaCache(tmp_path, 1 << 30).image(dict(a)) is not None  # a read from disk: used now
    probe = tmp_path / "probe"  # c's entry size, measured elsewhere
    MediaCache(probe, 1 << 30).image(dict(c))
    sc = sum(q.stat().st_size for q in probe.glob("*/*.bin"))
    sa, sb = path["a"].stat().st_size, path["b"].stat().st_size
    bound = sa + sb + sc - 1  # c goes over by one byte; removing b alone gets under 90%
    assert sa + sc <= 0.9 * bound
    size_c = MediaCache(tmp_path, bound)
    size_c.image(dict(c))
    path["c"] = size_c._path(size_c.key(c, "image"))
    assert path["a"].is_file() and path["c"].is_file() and not path["b"].exists()
    assert sum(q.stat().st_size for q in tmp_path.glob("*/*.bin")) <= bound


@pytest.mark.parametrize("task", ["videobench"])
def test_harness_runs_reuse_the_cache_and_answer_identically(demo, tmp_path, task):
    from modeltest.config import load_config
    from modeltest.runner import Evaluator
    from modeltest.tasks import TASKS

    def run(out, cache):
        cfg = load_config(
            TASKS,
            task,
            "qwen2_vl",
            [
                f"model.model_path={demo.model}",
                f"task.local_dataset_path={demo.videobench_qa}",
                "task.subject_mapping=null",
                f"output_dir={out}",
                "max_output_length=4",
                f"media_cache={cache}",
            ],
        )
        result = Evaluator(cfg, show_progress=False).run()
        return result, json.loads(result.paths.summary_json.read_text())["media_cache"]

    off, none = run(tmp_path / "off", "off")
    first, stats1 = run(tmp_path / "a", tmp_path / "cache")
    second, stats2 = run(tmp_path / "b", tmp_path / "cache")
    assert none is None and stats1["misses"] > 0
    assert stats2["misses"] == 0 and stats2["hits"] == len(first.records)
    outputs = lambda r: [(x.id, x.output, x.input_tokens) for x in r.records]  # noqa: E731
    assert outputs(first) == outputs(off) == outputs(second)
    assert first.paths.result_csv.read_text() == off.paths.result_csv.read_text()


def test_another_process_decoding_an_entry_is_waited_for_and_a_dead_ones_lock_is_taken_over(demo, tmp_path):
    import os
    import socket
    import subprocess
    import threading
    import time

    from qwen_vl_utils.vision_process import fetch_video

    _, video = elements(demo)
    reference = fetch_video(dict(video))
    first = MediaCache(tmp_path, 1 << 30)
    key = first.key(dict(video), "video")
    lock = first._lock_path(key)
    lock.parent.mkdir(parents=True, exist_ok=True)
    # A live process (this one, as another MediaCache) holds the lock and writes the entry later.
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")

    def finish_elsewhere():
        time.sleep(0.5)
        first._put(key, reference.to(torch.uint8).numpy())
        lock.unlink()

    threading.Thread(target=finish_elsewhere).start()
    waiter = MediaCache(tmp_path, 1 << 30)
    assert torch.equal(waiter.video(dict(video)), reference)
    assert waiter.misses == 0 and waiter.hits == 1  # waited, decoded nothing
    # A lock left by a process that died mid-decode (SIGKILL) is taken over.
    for p in tmp_path.glob("*/*.bin"):
        p.unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}\n")
    taker = MediaCache(tmp_path, 1 << 30)
    assert torch.equal(taker.video(dict(video)), reference) and taker.misses == 1
    assert not lock.exists()
