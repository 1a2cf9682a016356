"""Prompt logprobs (log-likelihood requests: completions `echo` + `logprobs`) from the engine's
step loop against transformers' Qwen2-VL in fp32: every prompt token's logprob and top-k equal the
log-softmax of transformers' logits — in one pass, in chunks, when the prefix cache holds the
prompt already, and across a preemption (each token scored once)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import all_blocks_free, processor_inputs
from test_engine import hf_prefill_positions, make_engine

from modeltest.engine.request import SamplingParams
from modeltest.inputs import ModelInput, engine_request

TOP = 3


@pytest.fixture(scope="module")
def reference(demo):
    """(name, inputs, transformers' log-softmax [prompt_len, vocab]) for text and an image."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from modeltest.backends.hf import dtype_kwarg

    processor = AutoProcessor.from_pretrained(demo.model)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(demo.model, **dtype_kwarg(torch.float32)).eval()
    img = demo.root / "textvqa" / "images" / "demo_000.jpg"
    contents = {
        "text": [{"type": "text", "text": "The capital of France is Paris, and the capital of Italy is Rome."}],
        "image": [{"type": "image", "image": str(img)}, {"type": "text", "text": "what does the sign say?"}],
    }
    out = []
    for name, content in contents.items():
        inp = processor_inputs(processor, content)
        with torch.no_grad():
            logits = hf(**inp, **hf_prefill_positions(hf, inp)).logits[0].float()
        out.append((name, inp, torch.log_softmax(logits, dim=-1)))
    return out


def scoring_request(name, inp, max_new_tokens=1, top=TOP):
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, prompt_logprobs=top)
    return engine_request(name, ModelInput(text="", inputs=dict(inp)), params)


def assert_matches(req, inp, ref):
    ids = inp["input_ids"][0]
    assert len(req.prompt_logprobs) == len(ids) - 1, req.id
    want = ref[torch.arange(len(ids) - 1), ids[1:]]  # row p scores token p + 1
    got = torch.tensor([lp for lp, _ in req.prompt_logprobs])
    assert (got - want).abs().max().item() < 1e-4, req.id
    for p, (_, top) in enumerate(req.prompt_logprobs):
        best = torch.topk(ref[p], TOP)
        assert [t for t, _ in top] == best.indices.tolist(), (req.id, p)
        assert max(abs(v - w) for (_, v), w in zip(top, best.values.tolist())) < 1e-4


def test_prompt_logprobs_equal_transformers_in_one_pass_and_in_chunks(demo, reference):
    for kw in ({}, {"max_num_batched_tokens": 4 + 16}):  # a prompt in chunks of one block
        engine = make_engine(demo.model, **kw)
        reqs = engine.generate([scoring_request(n, inp) for n, inp, _ in reference])
        for r, (_, inp, ref) in zip(reqs, reference):
            assert_matches(r, inp, ref)
        assert all_blocks_free(engine)


def test_a_cached_prompt_is_still_scored_whole(demo, reference):
    engine = make_engine(demo.model)
    name, inp, ref = reference[1]
    plain = engine.generate([scoring_request("warm", inp, top=None) for _ in range(1)])[0]
    assert plain.prompt_logprobs == []  # not asked for: nothing computed
    again = engine.generate([scoring_request(name, inp)])[0]
    assert_matches(again, inp, ref)
    # the cache was there to be used — by a request that does not score its prompt
    other = engine.generate([scoring_request("plain", inp, top=None)])[0]
    assert other.cached_tokens > 0 and again.cached_tokens == 0


def test_a_preempted_scoring_request_scores_each_prompt_token_once(demo, reference):
    name, inp, ref = reference[1]
    n = inp["input_ids"].shape[1]
    # room for both prompts and not one block more: decoding past a block's end preempts one
    prompt_blocks = -(-n // 16)
    engine = make_engine(demo.model, kv_cache_tokens=2 * prompt_blocks * 16, max_batch_size=2, max_output_length=32)
    reqs = engine.generate(
        [scoring_request(f"{name}{i}", inp, max_new_tokens=prompt_blocks * 16 - n + 8) for i in range(2)]
    )
    assert engine.stats().preemptions > 0
    for r in reqs:
        assert_matches(r, inp, ref)
    assert all_blocks_free(engine)
