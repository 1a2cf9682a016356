"""Prefix cache, vision cache, chunked prefill and preemption against the engine with all of them
off (fp32, CPU): the same logits bit for bit and the same tokens. Every K/V block is computed the
same way whichever pass it is in (model.chunk_attention), so reuse is identical by construction;
these tests hold the engine to that."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import all_blocks_free, processor_inputs, record_steps
from test_engine import make_engine

from modeltest.inputs import ModelInput, engine_request

OFF = dict(prefix_cache=False, vision_cache=False, max_num_batched_tokens=4096)


def questions(demo_root):
    """Several questions per medium (as the datasets ask them), two different same-size images
    behind identical placeholder ids, a video, and text: (name, processor content)."""
    img = demo_root / "textvqa" / "images"
    vid = demo_root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"
    out = []
    for i, q in enumerate(["what does the sign say?", "what colour is it?", "is there text?"]):
        out.append((f"img0_q{i}", [{"type": "image", "image": str(img / "demo_000.jpg")}, {"type": "text", "text": q}]))
    out.append(
        (
            "img1_q0",
            [
                {"type": "image", "image": str(img / "demo_001.jpg")},
                {"type": "text", "text": "what does the sign say?"},
            ],
        )
    )
    for i, q in enumerate(["what happens?", "which colour dominates?"]):
        out.append((f"vid_q{i}", [{"type": "video", "video": str(vid), "fps": 0.5}, {"type": "text", "text": q}]))
    out.append(("text", [{"type": "text", "text": "Hello, who are you? Tell me about Qwen2-VL."}]))
    return out


@pytest.fixture(scope="module")
def cases(demo):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo.model)
    return [(name, processor_inputs(processor, content)) for name, content in questions(demo.root)]


def run(engine, cases, new_tokens=6, together=False):
    """Greedy tokens and the logits of every sampled row, per request; requests one after another
    (each finds what the earlier ones left in the caches) or all at once."""
    logits = {}

    def on_step(reqs, full):
        for r, row in zip(reqs, full):
            logits[(r.id, len(r.output_ids))] = row.clone()

    record_steps(engine, on_step)

    def req(name, inp):
        return engine_request(name, ModelInput(text="", inputs=dict(inp)), sampling(new_tokens))

    if together:
        done = engine.generate([req(n, i) for n, i in cases])
    else:
        done = [engine.generate([req(n, i)])[0] for n, i in cases]
    return {r.id: r.output_ids for r in done}, logits, {r.id: r for r in done}


def sampling(n):
    from modeltest.engine.request import SamplingParams

    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def assert_identical(a, b, decodes_exact=True):
    """Same tokens; the same logits bit for bit — for decode rows too where both runs decoded the
    same batches (`decodes_exact`); else decode rows within fp32 rounding (a decode pass's batch,
    like any batch, moves its rows by ~1e-6: batch invariance holds for tokens)."""
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for (rid, step), row in a[1].items():
        if step == 0 or decodes_exact:
            assert torch.equal(row, b[1][(rid, step)]), (rid, step)
        else:
            assert torch.allclose(row, b[1][(rid, step)], atol=1e-4), (rid, step)


def test_prefix_and_vision_reuse_are_bit_identical_to_no_reuse(demo, cases):
    off = run(make_engine(demo.model, **OFF), cases)
    engine = make_engine(demo.model)
    on = run(engine, cases)
    assert_identical(on, off)
    s = engine.stats()
    reqs = on[2]
    # later questions on a medium find it: its blocks (all but the last partial one) and its embeddings
    for later in ("img0_q1", "img0_q2", "vid_q1"):
        span = reqs[later].spans[0]
        assert reqs[later].cached_tokens >= span.end // 16 * 16 > span.start, later
    # another image behind the same placeholder ids shares only what comes before it
    assert reqs["img1_q0"].cached_tokens <= reqs["img1_q0"].spans[0].start
    assert s.prefix_hit_rate > 0.3 and s.vision_cache_misses == 3 and s.preemptions == 0
    assert all_blocks_free(engine)


def test_vision_cache_alone_skips_the_tower_for_a_medium_seen_before(demo, cases):
    off = run(make_engine(demo.model, **OFF), cases)
    engine = make_engine(demo.model, prefix_cache=False)
    on = run(engine, cases)
    assert_identical(on, off)
    s = engine.stats()
    assert (s.vision_cache_hits, s.vision_cache_misses, s.vision_passes) == (3, 3, 3)
    assert s.cached_prompt_tokens == 0


def test_chunked_prefill_is_bit_identical_to_one_pass(demo, cases):
    off = run(make_engine(demo.model, **OFF), cases, together=True)
    engine = make_engine(demo.model, prefix_cache=False, max_num_batched_tokens=4 + 16)  # one block a pass
    on = run(engine, cases, together=True)
    assert_identical(on, off, decodes_exact=False)  # prefill logits: bit for bit
    assert engine.stats().prefill_passes > sum(len(i["input_ids"][0]) // 16 for _, i in cases) // 2


def test_reuse_within_one_batch_and_under_a_tiny_kv_budget_with_preemption(demo, cases):
    off = run(make_engine(demo.model, **OFF), cases, new_tokens=16)
    longest = max(i["input_ids"].shape[1] for _, i in cases)
    engine = make_engine(demo.model, kv_cache_tokens=longest + 16 + 3 * 16, max_batch_size=4)
    on = run(engine, cases, new_tokens=16, together=True)
    # rows recomputed after a preemption come from a prefill, not a decode pass: within rounding
    assert_identical(on, off, decodes_exact=False)
    assert engine.stats().preemptions > 0 and all_blocks_free(engine)
