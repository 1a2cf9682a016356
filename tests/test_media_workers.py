"""Decoding in worker processes: bit-identical media, one decode per clip, a hanging or crashing
decode costs one sample (recorded, retried on resume) and never the run."""

import json
import threading

import numpy as np
import pytest
import torch
import worker_helpers
from test_media_cache import elements

from modeltest.errors import SampleError
from modeltest.media import InProcessMedia
from modeltest.media.cache import MediaCache
from modeltest.media.decode import vision_from_messages
from modeltest.media.pool import TaskFailed, WorkerPool
from modeltest.media.workers import WorkerMedia

pytestmark = pytest.mark.subprocess


def test_a_hanging_or_dying_task_fails_alone_and_its_worker_is_replaced():
    pool = WorkerPool(worker_helpers.work, 2, timeout_s=3)
    try:
        items = ["a", "hang", "b", "die", "c", "bad", "d"]
        futures = [pool.submit(x, None, f"clip_{i}.mp4") for i, x in enumerate(items)]
        results = {}
        for x, f in zip(items, futures):
            try:
                results[x] = f.result(timeout=120)[1]
            except SampleError as e:
                results[x] = e
        assert [results[x] for x in "abcd"] == list("abcd")
        hang, die, bad = results["hang"], results["die"], results["bad"]
        assert isinstance(hang, TaskFailed) and hang.transient
        assert "clip_1.mp4" in str(hang) and "over 3 s" in str(hang)
        assert isinstance(die, TaskFailed) and "died (signal 9)" in str(die) and "clip_3.mp4" in str(die)
        assert not bad.transient and str(bad) == "preprocessing failed on clip_5.mp4: ValueError: bad thing"
        assert pool.replaced == 2
        # Tasks for one medium go to one worker (so its decode is shared).
        same = [pool.submit(f"q{i}", "clip-x", "clip_x.mp4") for i in range(4)]
        assert len({f.result(timeout=60)[0] for f in same}) == 1
    finally:
        pool.close()
    with pytest.raises(RuntimeError):
        pool.submit("late", None, "x")


def test_a_task_is_timed_from_when_its_worker_is_ready_not_from_its_start():
    """Workers take 2.5 s to start and a task 0.5 s, under a 2 s timeout: nothing times out (a
    task's clock starts once its worker said it is ready). Workers that can never start fail the
    waiting tasks with one message saying so, instead of hanging them."""
    pool = WorkerPool(worker_helpers.nap, 2, timeout_s=2, init=worker_helpers.slow_start, init_args=(2.5,))
    try:
        assert len({f.result(timeout=120) for f in [pool.submit(0.5, None, f"c{i}.mp4") for i in range(4)]}) >= 1
        assert pool.replaced == 0 and pool.wait_started(0)
    finally:
        pool.close()
    broken = WorkerPool(worker_helpers.nap, 1, timeout_s=30, init=worker_helpers.broken_start)
    try:
        with pytest.raises(TaskFailed, match=r"the media worker processes cannot start \(4 died or hung"):
            broken.submit(0.1, None, "c.mp4").result(timeout=120)
    finally:
        broken.close()


def test_a_process_that_cannot_be_started_fails_the_tasks_in_one_line(monkeypatch):
    """Starting a worker raises (the forkserver died: the server is being stopped; or no process
    can be made): waiting tasks fail with one message, and the dispatcher thread ends without a
    traceback."""
    import threading

    def no_process(self):
        raise EOFError("unexpected EOF")

    monkeypatch.setattr(WorkerPool, "_start", no_process)
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args))
    pool = WorkerPool(worker_helpers.nap, 1, timeout_s=30)
    try:
        with pytest.raises(TaskFailed, match=r"cannot start \(EOFError: unexpected EOF\)"):
            pool.submit(0.1, None, "c.mp4").result(timeout=60)
    finally:
        pool.close()
    assert crashed == []


def demo_messages(demo):
    image, video = elements(demo)
    return [{"role": "user", "content": [image, video, {"type": "text", "text": "q"}]}]


def assert_vision_equal(a, b):
    (ia, va), (ib, vb) = a, b
    assert len(ia) == len(ib) and len(va) == len(vb)
    for x, y in zip(ia, ib):
        assert x.mode == y.mode and np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(va, vb):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_workers_hand_over_what_qwen_vl_utils_returns_and_two_ranks_share_one_cache(demo, tmp_path):
    from qwen_vl_utils import process_vision_info

    messages = demo_messages(demo)
    reference = process_vision_info(messages)  # float frames, PIL images
    # Two "ranks" (two pools) fill one cache folder at the same time; a third reads it.
    ranks = [WorkerMedia(2, 60, str(tmp_path / "cache"), 1 << 30) for _ in range(2)]
    try:
        got = [None, None]

        def ask(i):
            got[i] = (ranks[i].vision(messages), ranks[i].vision(messages, uint8=True))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for floats, exact in got:
            assert_vision_equal(floats, reference)
            assert exact[1][0].dtype == torch.uint8 and torch.equal(exact[1][0].float(), reference[1][0])
    finally:
        for r in ranks:
            r.close()
    third = MediaCache(tmp_path / "cache", 1 << 30)
    assert_vision_equal(vision_from_messages(messages, third), reference)
    assert third.hits == 2 and third.misses == 0
    # Without a cache the workers decode every time, and still exactly.
    plain = WorkerMedia(1, 60, None, 0)
    try:
        assert_vision_equal(plain.vision(messages), reference)
        assert plain.summary() is None
    finally:
        plain.close()
    assert_vision_equal(InProcessMedia(None).vision(messages), reference)


def harness(demo, out, *extra):
    from modeltest.config import load_config
    from modeltest.runner import Evaluator
    from modeltest.tasks import TASKS

    cfg = load_config(
        TASKS,
        "videobench",
        "qwen2_vl",
        [
            f"model.model_path={demo.model}",
            f"task.local_dataset_path={demo.videobench_qa}",
            "task.subject_mapping=null",
            f"output_dir={out}",
            "max_output_length=4",
            *extra,
        ],
    )
    return Evaluator(cfg, show_progress=False).run()


def test_harness_with_workers_answers_identically_and_survives_hangs_and_crashes(demo, tmp_path, monkeypatch):
    threads = harness(demo, tmp_path / "threads", "prep_workers=0", f"media_cache={tmp_path / 'c0'}")
    expected = {r.id: r.output for r in threads.records}
    assert all(r.error is None for r in threads.records)

    # A decode that hangs (msvd_red) and a worker killed mid-sample (nba_green): the run's media
    # source, as the harness builds it, with the test-only faults.
    from modeltest import runner
    from modeltest.media import open_media_source

    def faulty(media_cache, media_cache_gb, workers, timeout_s):
        assert workers == 2
        return WorkerMedia(
            workers,
            timeout_s,
            str(media_cache),
            int(media_cache_gb * 2**30),
            faults=[("hang", "msvd_red"), ("die", "nba_green")],
        )

    monkeypatch.setattr(runner, "open_media_source", faulty)
    out = tmp_path / "workers"
    first = harness(demo, out, "prep_workers=2", "prep_timeout_s=3", f"media_cache={tmp_path / 'c1'}")
    by_id = {r.id: r for r in first.records}
    failed = {i for i, r in by_id.items() if r.error}
    hung = {r.id for r in first.records if "msvd_red" in r.input["videos"][0]}
    died = {r.id for r in first.records if "nba_green" in r.input["videos"][0]}
    assert hung and died and failed == hung | died
    assert all("took over 3 s" in by_id[i].error and by_id[i].transient for i in hung)
    assert all("worker died (signal 9)" in by_id[i].error and by_id[i].transient for i in died)
    assert {i: r.output for i, r in by_id.items() if i not in failed} == {
        i: expected[i] for i in by_id if i not in failed
    }
    summary = json.loads(first.paths.summary_json.read_text())["media_cache"]
    assert summary["workers"] == 2 and summary["workers_replaced"] >= len(died) + len(hung) > 0

    # Resumed without the fault: only the failed samples are computed, and answered as without workers.
    monkeypatch.setattr(runner, "open_media_source", open_media_source)
    second = harness(demo, out, "prep_workers=2", f"media_cache={tmp_path / 'c1'}")
    assert {r.id: r.output for r in second.records} == expected
    assert all(r.error is None and not r.transient for r in second.records)
    assert json.loads(second.paths.summary_json.read_text())["computed"] == len(failed)
