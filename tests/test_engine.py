"""The inference core against transformers' Qwen2-VL on the same weights (fp32, CPU)."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import (
    all_blocks_free,
    all_inputs,
    assert_bf16_engine_close_to_transformers,
    assert_engine_equals_transformers,
    make_request,
    prompt_logits,
    record_steps,
)

from modeltest.engine.engine import EngineConfig, LLMEngine
from modeltest.engine.parallel import TPContext, head_layout
from modeltest.errors import UserError

TESTS = Path(__file__).resolve().parent
BF16_LOGIT_TOLERANCE = 0.125  # 4 bf16 steps at |logit| 4..8 (measured: at most 0.0625)
BF16_DIVERGING_PROMPTS = 1  # per model, of 4 prompts x 8 greedy tokens (measured: 1 on demo, 0 on odd)


@pytest.fixture(scope="session")
def odd_model(tmp_path_factory):
    from modeltest.demo.tiny_model import ODD_HEADS, build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("odd") / "model", ODD_HEADS, seed=1)


@pytest.fixture(params=["demo", "odd"])
def model_path(request, demo, odd_model):
    return demo.model if request.param == "demo" else odd_model


def make_engine(path, **kw):
    cfg = dict(
        model_path=str(path),
        dtype=torch.float32,
        max_batch_size=4,
        max_input_length=2048,
        max_output_length=16,
        block_size=16,
    )
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), TPContext())


@pytest.fixture
def processor(model_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path)


def hf_prefill_positions(hf, inp) -> dict:
    """transformers 4.x's plain forward numbers the prompt 1-D unless given the 3-axis M-RoPE
    positions (generate computes them); 5.x computes them in forward itself."""
    if not hasattr(hf, "get_rope_index"):
        return {}
    # by keyword: Qwen2.5-VL's (transformers 4.49-4.5x) takes second_per_grid_ts before attention_mask
    times = {"second_per_grid_ts": inp["second_per_grid_ts"]} if "second_per_grid_ts" in inp else {}
    pos, _ = hf.get_rope_index(
        inp["input_ids"],
        inp.get("image_grid_thw"),
        inp.get("video_grid_thw"),
        attention_mask=inp["attention_mask"],
        **times,
    )
    return {"position_ids": pos}


def test_matches_transformers_logits_and_greedy_tokens(model_path, processor, demo):
    from transformers import Qwen2VLForConditionalGeneration

    from modeltest.backends.hf import dtype_kwarg

    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_path, **dtype_kwarg(torch.float32)).eval()
    inputs = all_inputs(processor, demo.root)
    assert_engine_equals_transformers(hf, lambda: make_engine(model_path), inputs, prefill_kwargs=hf_prefill_positions)


def test_mixed_batch_equals_each_alone(model_path, processor, demo):
    engine = make_engine(model_path)
    inputs = all_inputs(processor, demo.root)
    alone = {n: engine.generate([make_request(n, i, 6)])[0].output_ids for n, i in inputs.items()}
    reqs = [make_request(n, i, 6) for n, i in inputs.items()]
    assert {r.id: r.output_ids for r in engine.generate(reqs)} == alone
    assert all_blocks_free(engine)


def test_continuous_batching_and_small_blocks_give_the_same_tokens(demo, odd_model):
    from transformers import AutoProcessor

    inputs = all_inputs(AutoProcessor.from_pretrained(odd_model), demo.root)
    reference = make_engine(odd_model)
    lengths = {"text": 7, "image": 2, "two_images": 7, "video": 4}
    alone = {n: reference.generate([make_request(n, inputs[n], lengths[n])])[0].output_ids for n in inputs}

    # Two sequences at a time, 4-token blocks, a cache with room for about two requests only.
    engine = make_engine(odd_model, max_batch_size=2, block_size=4, kv_cache_tokens=2 * 340)
    trace = []
    record_steps(engine, lambda reqs, logits: trace.append([r.id for r in reqs]))
    reqs = [make_request(n, inputs[n], lengths[n]) for n in inputs]
    assert {r.id: r.output_ids for r in engine.generate(reqs)} == alone
    assert max(len(step) for step in trace) <= 2
    first = {n: min(i for i, s in enumerate(trace) if n in s) for n in inputs}
    last = {n: max(i for i, s in enumerate(trace) if n in s) for n in inputs}
    # "two_images" joined while "text" was still decoding: continuous batching, not static batches.
    assert first["two_images"] < last["text"]
    assert all_blocks_free(engine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_packed_weights_match_plain_weights(demo, dtype):
    """CPU engines pack linear weights for oneDNN by default; the plain path (F.linear, what GPUs
    run) must agree with it on logits and greedy tokens."""
    from transformers import AutoProcessor

    from modeltest.engine.layers import _Linear, onednn_packing_works

    if not onednn_packing_works(dtype):
        pytest.skip(f"this PyTorch build cannot pack {dtype} weights for oneDNN")
    inputs = all_inputs(AutoProcessor.from_pretrained(demo.model), demo.root)
    packed = make_engine(demo.model, dtype=dtype)
    plain = make_engine(demo.model, dtype=dtype, onednn_weights=False)
    model = packed.runner.model
    lm = [m for m in model.modules() if isinstance(m, _Linear) and not any(m is v for v in model.visual.modules())]
    tower = [m for m in model.visual.modules() if isinstance(m, _Linear)]
    assert lm and all(m.packed is not None for m in lm)
    # the vision tower only in low precision (model.py: ATen's fp32 GEMM is as fast at its sizes)
    assert tower and all((m.packed is not None) == (dtype != torch.float32) for m in tower)
    assert not any(m.packed is not None for m in plain.runner.model.modules() if isinstance(m, _Linear))
    for name, inp in inputs.items():
        a = prompt_logits(packed, make_request(name, inp, 6))
        b = prompt_logits(plain, make_request(name, inp, 6))
        # oneDNN's blocked GEMM sums in another order: fp32 within 1e-4; bf16 within bf16 rounding
        # (not bit-identical: 0.0586 measured on an AMX Xeon, torch 2.11 — two bf16 steps)
        tol = 1e-4 if dtype == torch.float32 else BF16_LOGIT_TOLERANCE
        assert (a - b).abs().max().item() <= tol, (name, (a - b).abs().max().item())
    reqs = {e: [make_request(n, i, 6) for n, i in inputs.items()] for e in ("packed", "plain")}
    packed.generate(reqs["packed"])
    plain.generate(reqs["plain"])
    diverged = [a.id for a, b in zip(reqs["packed"], reqs["plain"]) if a.output_ids != b.output_ids]
    assert len(diverged) <= (0 if dtype == torch.float32 else BF16_DIVERGING_PROMPTS), diverged


def test_over_long_request_fails_alone(demo):
    from transformers import AutoProcessor

    inputs = all_inputs(AutoProcessor.from_pretrained(demo.model), demo.root)
    engine = make_engine(demo.model, max_input_length=60)
    reqs = [make_request(n, i, 4) for n, i in inputs.items()]
    engine.generate(reqs)
    by_id = {r.id: r for r in reqs}
    assert by_id["text"].error is None and len(by_id["text"].output_ids) == 4
    for name in ("image", "two_images", "video"):
        assert "over max_input_length 60" in by_id[name].error and by_id[name].output_ids == []


def test_abort_frees_blocks_and_leaves_the_others_alone(demo):
    """abort() of a waiting and of a running request: both come back ABORTED from the next step
    with their KV blocks freed; the remaining request's tokens are those it gets alone."""
    from transformers import AutoProcessor

    from modeltest.engine.request import RequestStatus

    inputs = all_inputs(AutoProcessor.from_pretrained(demo.model), demo.root)
    alone = make_engine(demo.model).generate([make_request("text", inputs["text"], 6)])[0].output_ids
    engine = make_engine(demo.model, max_batch_size=2)
    reqs = {n: make_request(n, inputs[n], 6) for n in ("text", "image", "video")}
    for r in reqs.values():
        engine.add_request(r)
    engine.step()  # prefill text + image; video waits
    assert reqs["image"].status is RequestStatus.RUNNING and reqs["video"].status is RequestStatus.WAITING
    assert engine.abort("image") and engine.abort("video") and not engine.abort("no such id")
    assert engine.stats().running == 1 and engine.stats().waiting == 0
    ended = engine.step()
    assert {r.id for r in ended} == {"image", "video"}
    assert all(r.status is RequestStatus.ABORTED and r.blocks == [] for r in ended)
    while engine.has_work():
        engine.step()
    assert reqs["text"].status is RequestStatus.FINISHED and reqs["text"].output_ids == alone
    assert len(reqs["image"].output_ids) == 1 and reqs["video"].output_ids == []
    assert all_blocks_free(engine)


def test_sampling_is_reproducible_by_seed_whatever_the_batch(demo):
    """temperature / top-k / top-p with a seed: the same tokens alone and in a mixed batch;
    another seed draws other tokens; temperature 0 stays greedy."""
    from transformers import AutoProcessor

    inputs = all_inputs(AutoProcessor.from_pretrained(demo.model), demo.root)
    engine = make_engine(demo.model)

    def sampled(name, seed, **kw):
        r = make_request(name, inputs[name], 8)
        r.params.temperature, r.params.seed = kw.get("temperature", 1.5), seed
        r.params.top_k, r.params.top_p = kw.get("top_k", 0), kw.get("top_p", 1.0)
        return r

    alone = engine.generate([sampled("text", 7)])[0].output_ids
    batch = engine.generate(
        [make_request("image", inputs["image"], 8), sampled("text", 7), sampled("video", 3, top_k=50, top_p=0.9)]
    )
    assert batch[1].output_ids == alone
    greedy = engine.generate([make_request("text", inputs["text"], 8)])[0].output_ids
    others = {tuple(engine.generate([sampled("text", seed)])[0].output_ids) for seed in range(8, 12)}
    assert len(others | {tuple(alone)}) > 1 and tuple(greedy) not in others | {tuple(alone)}
    assert engine.generate([sampled("text", 7, temperature=0.0)])[0].output_ids == greedy
    top1 = engine.generate([sampled("text", 5, top_k=1)])[0].output_ids
    assert top1 == greedy  # top_k=1 is greedy whatever the seed
    bad = sampled("text", 1, top_p=0.0)
    engine.generate([bad])
    assert bad.error and "top_p" in bad.error


def test_timings_are_recorded(demo):
    from transformers import AutoProcessor

    inputs = all_inputs(AutoProcessor.from_pretrained(demo.model), demo.root)
    engine = make_engine(demo.model)
    r = engine.generate([make_request("image", inputs["image"], 5)])[0]
    assert r.prefill_time > 0 and r.decode_time > 0 and r.run_time >= r.prefill_time + r.decode_time * 0.99
    assert r.e2e_time == pytest.approx(r.queue_time + r.run_time)
    stats = engine.stats()
    assert len(stats.prefill_times) == 1 and len(stats.decode_times) == 4 and len(stats.vision_times) == 1


@pytest.mark.parametrize(
    "q,kv,world",
    [
        (12, 2, 1),
        (12, 2, 2),
        (12, 2, 4),
        (12, 2, 8),
        (28, 4, 1),
        (28, 4, 2),
        (28, 4, 4),
        (28, 4, 8),
        (64, 8, 4),
        (64, 8, 8),
        (6, 2, 4),
    ],
)
def test_head_layout_covers_every_head_once(q, kv, world):
    seen_q, per_rank = [], set()
    for rank in range(world):
        lay = head_layout(q, kv, world, rank)
        per_rank.add(lay.num_q)
        group = q // kv
        for h in lay.q_heads:
            if h is not None:
                assert h // group in lay.kv_heads  # each query head sits with its KV head
                seen_q.append(h)
    assert sorted(seen_q) == list(range(q))
    assert len(per_rank) == 1  # same local shapes on every rank


def test_padded_layout():
    # 6 query heads over 2 KV heads at world 4: groups of 3 padded to 4, two heads per rank.
    assert [head_layout(6, 2, 4, r).q_heads for r in range(4)] == [[0, 1], [2, None], [3, 4], [5, None]]
    # Qwen2-VL-7B at world 8: 28/4 heads, groups of 7 padded to 8.
    assert head_layout(28, 4, 8, 1).q_heads == [4, 5, 6, None]


def test_impossible_layout_is_a_clear_error():
    with pytest.raises(UserError, match=r"tensor parallel size 3 cannot split 4 KV heads \(28 query heads\)"):
        head_layout(28, 4, 3, 0)


def test_newer_checkpoint_naming_loads(demo, tmp_path):
    """Checkpoints re-saved by newer transformers use model.language_model.* and model.visual.*."""
    from safetensors.torch import load_file, save_file

    src = demo.model
    dst = tmp_path / "renamed"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        renamed[k] = v
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    from transformers import AutoProcessor

    inp = all_inputs(AutoProcessor.from_pretrained(src), demo.root)["image"]
    a = prompt_logits(make_engine(src), make_request("x", inp, 1))
    b = prompt_logits(make_engine(dst), make_request("x", inp, 1))
    assert torch.equal(a, b)


# Failures of the launcher's rendezvous, not of our code: torchrun picks a free port, releases it
# and the workers bind it, so another process can take it in between. One retry for those only.
def reference_model(model_path, dtype=torch.float32):
    """transformers' model of the checkpoint's family (Qwen2-VL or Qwen2.5-VL), in eval mode."""
    from modeltest.backends.hf import dtype_kwarg
    from modeltest.engine.config import read_checkpoint_config
    from modeltest.engine.families import FAMILIES, reference_model_class

    family = FAMILIES[read_checkpoint_config(model_path)["model_type"]]
    return reference_model_class(family).from_pretrained(model_path, **dtype_kwarg(dtype)).eval()


def transformers_reference(model, demo_root, new_tokens: int) -> dict:
    """transformers' greedy tokens (no stop) and last-4-position prompt logits for the test cases, fp32."""
    from transformers import AutoProcessor, GenerationConfig

    hf = reference_model(model)
    out = {"tokens": {}, "last_logits": {}}
    for name, inp in all_inputs(AutoProcessor.from_pretrained(model), demo_root).items():
        with torch.no_grad():
            out["last_logits"][name] = hf(**inp, **hf_prefill_positions(hf, inp)).logits[0, -4:].float()
            gen = hf.generate(
                **inp,
                generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=151643
                ),
            )
        out["tokens"][name] = gen[0, inp["input_ids"].shape[1] :].tolist()
    return out


LAUNCH_FLAKES = ("Address already in use", "EADDRINUSE", "DistNetworkError", "Connection refused")


def _torchrun(n, model, demo_root, out):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
        str(TESTS / "tp_worker.py"),
        str(model),
        str(demo_root),
        str(out),
    ]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or attempt or not any(f in proc.stderr for f in LAUNCH_FLAKES):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("which,worlds", [("odd", (2, 4)), ("demo", (2,))])
@pytest.mark.subprocess  # torchrun worlds of 2 and 4 gloo processes
def test_tensor_parallel_matches_single_process(which, worlds, demo, odd_model, tmp_path):
    model = odd_model if which == "odd" else demo.model
    base = _torchrun(1, model, demo.root, tmp_path / "w1.pt")
    hf = transformers_reference(model, demo.root, new_tokens=6)
    for n in worlds:
        res = _torchrun(n, model, demo.root, tmp_path / f"w{n}.pt")
        assert res["world_size"] == n
        assert res["reuse"] == base["reuse"] and base["reuse"][1] > 0  # the batch reused the cases' prefixes
        assert all(torch.load(tmp_path / f"w{n}.pt.rank{r}") == base["reuse"] for r in range(n))
        # against transformers directly, not only against one process
        assert res["alone"] == hf["tokens"], n
        for name, logits in hf["last_logits"].items():
            assert (res["logits"][name] - logits).abs().max().item() < 1e-4, (n, name)
        assert res["alone"] == base["alone"] and res["batch"] == base["batch"]
        assert res["batch"] == {k: v[: len(res["batch"][k])] for k, v in base["alone"].items()}
        for name, logits in base["logits"].items():
            assert (res["logits"][name] - logits).abs().max().item() < 1e-4, (n, name)
        scored, want = res["prompt_logprobs"], base["prompt_logprobs"]
        assert len(scored) == len(want) > 0 and [[t for t, _ in top] for _, top in scored] == [
            [t for t, _ in top] for _, top in want
        ]
        assert max(abs(a[0] - b[0]) for a, b in zip(scored, want)) < 1e-4, n
    if which == "odd":
        assert res["layout"] == [[0], [0, 1]]  # rank 0 at world 4: KV head 0 shared with rank 1


def test_a_failing_pass_fails_its_requests_and_the_engine_goes_on(demo):
    """A prefill that raises fails the requests in it (their own error); a decode pass that raises
    fails the batch's requests as retryable (the cause may be any of them); the engine frees their
    blocks and later requests run as if nothing happened."""
    from transformers import AutoProcessor

    inputs = all_inputs(AutoProcessor.from_pretrained(demo.model), demo.root)
    engine = make_engine(demo.model)
    alone = engine.generate([make_request("ok", inputs["image"], 4)])[0].output_ids

    real_run = engine.runner.run

    def bad_prefill(sp):
        if sp.chunks:
            raise RuntimeError("malformed pixel tensor\nsecond line")
        return real_run(sp)

    engine.runner.run = bad_prefill
    failed = engine.generate([make_request("p", inputs["text"], 4)])[0]
    assert failed.status.value == "failed" and failed.error == "prefill failed: RuntimeError: malformed pixel tensor"
    assert not failed.retryable and all_blocks_free(engine)
    # a prefill failing beside running decodes: the prefill's request fails as its own fault,
    # the decodes (not theirs, perhaps) as retryable
    engine.runner.run = real_run
    a = make_request("a", inputs["text"], 6)
    engine.add_request(a)
    engine.step()
    engine.runner.run = bad_prefill
    cached = engine.stats().cached_blocks
    engine.add_request(make_request("b", inputs["image"], 6))
    ended = {r.id: r for r in engine.step()}
    assert ended["b"].error.startswith("prefill failed") and not ended["b"].retryable
    assert ended["a"].error.startswith("decode failed") and ended["a"].retryable
    assert all_blocks_free(engine) and engine.stats().cached_blocks == cached  # no uncomputed block findable
    engine.runner.run = real_run

    calls = {"n": 0}

    def flaky_decode(sp):
        calls["n"] += not sp.chunks
        if calls["n"] == 2:
            raise RuntimeError("device error")
        return real_run(sp)

    engine.runner.run = flaky_decode
    batch = engine.generate([make_request("a", inputs["text"], 6), make_request("b", inputs["two_images"], 6)])
    assert [r.status.value for r in batch] == ["failed", "failed"]
    assert all(r.error == "decode failed: RuntimeError: device error" and r.retryable for r in batch)
    assert all_blocks_free(engine)
    engine.runner.run = real_run
    assert engine.generate([make_request("again", inputs["image"], 4)])[0].output_ids == alone


def test_bf16_engine_matches_transformers_in_bf16(model_path, processor, demo):
    """What real checkpoints run: the engine and transformers both in bf16 on the same inputs,
    greedy through the production sampler. Prefill logits within a few bf16 steps; greedy
    tokens identical except where bf16 rounding flips a near-tie of random weights — at most
    BF16_DIVERGING_PROMPTS prompts per model diverge anywhere in their 8 tokens."""
    from transformers import Qwen2VLForConditionalGeneration

    from modeltest.backends.hf import dtype_kwarg

    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_path, **dtype_kwarg(torch.bfloat16)).eval()
    engine = make_engine(model_path, dtype=torch.bfloat16)
    inputs = all_inputs(processor, demo.root)
    tol, diverging = BF16_LOGIT_TOLERANCE, BF16_DIVERGING_PROMPTS
    assert_bf16_engine_close_to_transformers(hf, engine, inputs, tol, diverging, prefill_kwargs=hf_prefill_positions)


def test_weights_config_json_does_not_describe_are_one_line_naming_the_tensor(demo, tmp_path):
    """config.json without intermediate_size reads as transformers' default (29568 rows), which
    the tiny checkpoint's MLP does not have: one line naming the tensor and the fix, no traceback."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo.model, model)
    config = json.loads((model / "config.json").read_text())
    del config["intermediate_size"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        make_engine(model)
    message = str(e.value)
    assert "mlp" in message and "model.layers.0." in message and "correct config.json" in message, message
    assert "\n" not in message


def test_a_kv_cache_without_room_for_one_block_is_one_line(demo):
    """Too little memory for a single KV block: refused as the engine loads, naming what to do."""
    with pytest.raises(UserError, match=r"KV cache: not one 16-token block fits in 0% of free memory; use more"):
        make_engine(demo.model, kv_cache_fraction=1e-15)


def test_a_long_video_at_small_frames_is_placed_as_the_original_qwen2_vl_places_it(demo):
    """A video with more temporal patches than merged rows and columns (8 x 2 x 2): text after it
    resumes at the video's largest position + 1, as the original Qwen2-VL (transformers 4.x, vLLM)
    does — the engine's logits equal transformers 4.46's. (transformers 5.24 resumes at
    max(h, w) / merge instead, and differs here: README, "The inference core".)"""
    import transformers
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from modeltest.backends.hf import dtype_kwarg

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 places text after such a video differently (see the docstring)")
    proc = AutoProcessor.from_pretrained(demo.model)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (16, 3, 56, 56), dtype=np.uint8))
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inp = dict(proc(text=[text], videos=[frames], return_tensors="pt"))
    assert inp["video_grid_thw"].tolist() == [[8, 4, 4]]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(demo.model, **dtype_kwarg(torch.float32)).eval()
    with torch.no_grad():
        ref = hf(**inp, **hf_prefill_positions(hf, inp)).logits[0].float()
    ours = prompt_logits(make_engine(demo.model), make_request("long", inp, 1))
    assert (ours - ref).abs().max().item() < 1e-4
