"""Inputs for engine tests: text, one image, two images, a video — built with the real processor."""

from __future__ import annotations

from pathlib import Path
from typing import Dict


def case_messages(demo_root: Path) -> Dict[str, list]:
    img = demo_root / "textvqa" / "images"
    vid = demo_root / "videobench" / "Eval_video"
    return {
        "text": [{"type": "text", "text": "Hello, who are you? Tell me about Qwen2-VL."}],
        "image": [
            {"type": "image", "image": str(img / "demo_000.jpg")},
            {"type": "text", "text": "what does the sign say?"},
        ],
        "two_images": [
            {"type": "image", "image": str(img / "demo_001.jpg")},
            {"type": "image", "image": str(img / "demo_002.jpg")},
            {"type": "text", "text": "compare them"},
        ],
        "video": [
            {"type": "video", "video": str(vid / "MSVD" / "msvd_red.mp4"), "fps": 0.5},
            {"type": "text", "text": "what happens?"},
        ],
    }


def processor_inputs(processor, content) -> dict:
    """The processor's tensors for one user turn, by the one conversation -> model-input path."""
    from modeltest.inputs import model_input

    return model_input(processor, [{"role": "user", "content": content}]).inputs


def make_request(name, inputs, max_new_tokens: int, ignore_eos: bool = True):
    from modeltest.engine.request import SamplingParams
    from modeltest.inputs import ModelInput, engine_request

    return engine_request(
        name,
        ModelInput(text="", inputs=dict(inputs)),
        SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos),
    )


def prompt_logits(engine, req):
    """Full-vocabulary logits [prompt_len, vocab] of one prompt, outside the step loop."""
    return engine.prompt_logits(req)


class RecordingSampler:
    """Greedy, and calls on_step(requests, full logits [B, vocab]) at every pass (tests only)."""

    capturable = False  # decode through the eager path, where the logits exist

    def __init__(self, on_step):
        self.on_step = on_step

    def __call__(self, model, reqs, h):
        self.on_step(reqs, model.full_logits(h).float())
        return model.greedy(h).tolist()


def record_steps(engine, on_step) -> None:
    engine.runner.sampler = RecordingSampler(on_step)


def all_blocks_free(engine) -> bool:
    s = engine.stats()
    return s.free_blocks == s.num_blocks


def all_inputs(processor, demo_root: Path) -> Dict[str, dict]:
    return {name: processor_inputs(processor, content) for name, content in case_messages(demo_root).items()}


def run_cases(engine, inputs: Dict[str, dict], max_new_tokens: int = 6) -> dict:
    """Per case: prompt logits (last 4 positions) and greedy tokens alone; then all cases in one batch."""
    out = {"logits": {}, "alone": {}, "batch": {}}
    for name, inp in inputs.items():
        out["logits"][name] = prompt_logits(engine, make_request(name, inp, max_new_tokens))[-4:].clone()
        out["alone"][name] = engine.generate([make_request(name, inp, max_new_tokens)])[0].output_ids
    reqs = [make_request(name, inp, max_new_tokens - i % 3) for i, (name, inp) in enumerate(inputs.items())]
    for r in engine.generate(reqs):
        out["batch"][r.id] = r.output_ids
    return out


def assert_engine_equals_transformers(hf, make_engine, inputs: Dict[str, dict], n_new: int = 8, prefill_kwargs=None):
    """Per case, fp32: every prompt logit and every decode step's logits (paged-cache attention)
    within 1e-4 of transformers', the same greedy tokens — by a recording sampler and by the
    production one (what every run uses; the recording one only greedy-picks).
    prefill_kwargs(hf, inp) -> extra arguments of transformers' plain forward (positions)."""
    import torch
    from transformers import GenerationConfig

    engine, production = make_engine(), make_engine()
    steps = {}
    record_steps(engine, lambda reqs, logits: [steps.setdefault(r.id, []).append(lg) for r, lg in zip(reqs, logits)])
    for name, inp in inputs.items():
        with torch.no_grad():
            ref = hf(**inp, **(prefill_kwargs(hf, inp) if prefill_kwargs else {})).logits[0].float()
            gen = hf.generate(
                **inp,
                generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=151643
                ),
                output_scores=True,
                return_dict_in_generate=True,
            )
        ours = prompt_logits(engine, make_request(name, inp, n_new))
        assert ours.shape == ref.shape, name
        assert (ours - ref).abs().max().item() < 1e-4, name
        hf_tokens = gen.sequences[0, inp["input_ids"].shape[1] :].tolist()
        assert engine.generate([make_request(name, inp, n_new)])[0].output_ids == hf_tokens, name
        assert len(steps[name]) == len(gen.scores) == n_new, name
        for ours_step, ref_step in zip(steps[name], gen.scores):
            assert (ours_step - ref_step[0]).abs().max().item() < 1e-4, name
        assert production.generate([make_request(name, inp, n_new)])[0].output_ids == hf_tokens, name


def assert_bf16_engine_close_to_transformers(
    hf, engine, inputs: Dict[str, dict], tolerance, diverging, prefill_kwargs=None
):
    """Both in bf16 on the same inputs, greedy through the production sampler: every prompt's
    prefill logits within `tolerance` of transformers'; greedy 8-token answers identical but for at
    most `diverging` prompts (bf16 rounding flips near-ties of random weights)."""
    import torch
    from transformers import GenerationConfig

    diverged = []
    for name, inp in inputs.items():
        with torch.no_grad():
            ref = hf(**inp, **(prefill_kwargs(hf, inp) if prefill_kwargs else {})).logits[0].float()
            gen = hf.generate(
                **inp,
                generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=151643
                ),
            )
        ours = prompt_logits(engine, make_request(name, inp, 8))
        assert (ours - ref).abs().max().item() <= tolerance, name
        if engine.generate([make_request(name, inp, 8)])[0].output_ids != gen[0, inp["input_ids"].shape[1] :].tolist():
            diverged.append(name)
    assert len(diverged) <= diverging, diverged
