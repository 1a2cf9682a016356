"""Logit adjustments (engine/logits.py) against transformers' logits processors and OpenAI's
formula applied by hand, in fp32 greedy decoding on the demo model."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import all_inputs
from test_engine import hf_prefill_positions, make_engine

from modeltest.engine.request import SamplingParams
from modeltest.inputs import ModelInput, engine_request

NEW = 8
IM_END = 151645


@pytest.fixture(scope="module")
def setup(demo):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from modeltest.backends.hf import dtype_kwarg

    inputs = all_inputs(AutoProcessor.from_pretrained(demo.model), demo.root)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(demo.model, **dtype_kwarg(torch.float32)).eval()
    return make_engine(demo.model, max_output_length=NEW), hf, {k: inputs[k] for k in ("text", "image")}


def engine_tokens(engine, inp, **params):
    req = engine_request("r", ModelInput(text="", inputs=dict(inp)), SamplingParams(max_new_tokens=NEW, **params))
    return engine.generate([req])[0].output_ids


def test_repetition_penalty_is_transformers(setup):
    from transformers import GenerationConfig

    engine, hf, inputs = setup
    changed = []
    for name, inp in inputs.items():
        cfg = GenerationConfig(
            do_sample=False, max_new_tokens=NEW, repetition_penalty=1.5, eos_token_id=None, pad_token_id=151643
        )
        with torch.no_grad():
            want = hf.generate(**inp, generation_config=cfg)[0, inp["input_ids"].shape[1] :].tolist()
        assert engine_tokens(engine, inp, repetition_penalty=1.5, ignore_eos=True) == want, name
        changed.append(engine_tokens(engine, inp, ignore_eos=True) != want)
    assert any(changed)  # the penalty changed something (the image answer repeats a token)


def test_frequency_and_presence_penalties_are_openais_formula(setup):
    engine, hf, inputs = setup
    inp = inputs["image"]  # its plain answer repeats a token: the penalties have work to do
    fp, pp = -1.2, 0.3  # net -0.9 once, -2.1 twice: repeats build up, and the two terms differ
    ids, out = inp["input_ids"], []
    for _ in range(NEW):
        step = dict(inp, input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            logits = hf(**step, **hf_prefill_positions(hf, step)).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - counts * fp - (counts > 0).float() * pp
        out.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    got = engine_tokens(engine, inp, frequency_penalty=fp, presence_penalty=pp, ignore_eos=True)
    assert got == out and out != engine_tokens(engine, inp, ignore_eos=True)
    assert max(out.count(t) for t in out) > 2  # a count above 1 met the frequency term


def test_logit_bias_and_min_tokens(setup):
    engine, _, inputs = setup
    inp = inputs["image"]
    assert engine_tokens(engine, inp, logit_bias={42: 100.0}, ignore_eos=True) == [42] * NEW
    # the stop token made certain, then kept out for 3 tokens: 3 tokens, then the stop
    out = engine_tokens(engine, inp, logit_bias={IM_END: 100.0}, min_tokens=3)
    assert len(out) == 4 and out[-1] == IM_END and IM_END not in out[:3]


def test_adjustments_stay_with_their_request_in_a_batch(setup):
    engine, _, inputs = setup
    plain = {k: engine_tokens(engine, v, ignore_eos=True) for k, v in inputs.items()}
    rep = engine_tokens(engine, inputs["image"], repetition_penalty=1.5, ignore_eos=True)
    reqs = [
        engine_request(k, ModelInput(text="", inputs=dict(v)), SamplingParams(max_new_tokens=NEW, ignore_eos=True))
        for k, v in inputs.items()
    ]
    reqs.append(
        engine_request(
            "rep",
            ModelInput(text="", inputs=dict(inputs["image"])),
            SamplingParams(max_new_tokens=NEW, ignore_eos=True, repetition_penalty=1.5),
        )
    )
    done = {r.id: r.output_ids for r in engine.generate(reqs)}
    assert done == {**plain, "rep": rep}


def test_out_of_range_adjustments_are_refused_with_why(setup):
    engine, _, inputs = setup
    for params, why in (
        (dict(logit_bias={10**7: 1.0}), "logit_bias: token ids must be in"),
        (dict(repetition_penalty=0.0), "repetition_penalty 0.0 must be > 0"),
        (dict(min_tokens=NEW + 1), "min_tokens 9 must be between 0 and max_new_tokens 8"),
    ):
        req = engine_request(
            "x", ModelInput(text="", inputs=dict(inputs["text"])), SamplingParams(max_new_tokens=NEW, **params)
        )
        r = engine.generate([req])[0]
        assert r.status.value == "failed" and why in r.error
