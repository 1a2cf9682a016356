"""The CPU kernel figures quoted in docs/PERFORMANCE.md, reproducible:

    python docs/perf/cpu_kernels.py            # ~3 minutes on 2 cores
    python docs/perf/cpu_kernels.py --flex     # also torch.compile(flex_attention) (~20 s compile)

1. GEMMs of a `mid` decode step (weights bigger than the caches, read once per call):
   F.linear on the plain weight vs oneDNN on the packed weight, batch 1 and 8.
2. Vision-tower GEMM throughput at textvqa batch shape (8 images x 768 patches).
3. Attention: the vision tower's (8 images x 10 heads x 768 patches) and the language model's
   prefill (8 x 12 heads x 490 tokens, causal vs not) in PyTorch's CPU SDPA kernel.
4. The vision rope at textvqa shape: q and k one at a time over the whole batch (the former way)
   vs `rope_qk_` (both together, 256-row chunks); the SDPA kernel at fp32, and the pieces of a
   "math" attention (QK^T by bmm, softmax).
5. A whole engine decode step on the `mid` checkpoint, packed vs plain weights (median of 40).
6. Where an engine textvqa batch of 8 on `mid` spends its time (torch.profiler, self CPU time).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def ms(fn, n=5):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def packed_linear(w):
    p = torch.ops.mkldnn._reorder_linear_weight(w, 8)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")


def gemms():
    bf = torch.bfloat16
    layers = [
        (torch.randn(n, k) * 0.02).to(bf)
        for _ in range(8)
        for n, k in ((1024, 768), (768, 768), (6144, 768), (768, 3072))
    ]
    head = (torch.randn(151936, 768) * 0.02).to(bf)
    for m in (1, 8):
        xs = {k: torch.randn(m, k).to(bf) for k in (768, 3072)}
        packed = [packed_linear(w) for w in layers]
        plain_l = ms(lambda: [F.linear(xs[w.shape[1]], w) for w in layers])
        packed_l = ms(lambda: [f(xs[w.shape[1]]) for f, w in zip(packed, layers)])
        ph = packed_linear(head)
        plain_h, packed_h = ms(lambda: F.linear(xs[768], head)), ms(lambda: ph(xs[768]))
        print(
            f"decode GEMMs batch {m}: 8 layers {plain_l:.1f} -> {packed_l:.1f} ms, "
            f"LM head {plain_h:.1f} -> {packed_h:.1f} ms ({head.numel() * 2 / packed_h / 1e6:.1f} GB/s packed)"
        )


def vision_gemm():
    for m, k, n in ((6144, 640, 1920), (6144, 640, 2560), (6144, 2560, 640)):
        w, x = (torch.randn(n, k) * 0.02).to(torch.bfloat16), torch.randn(m, k).to(torch.bfloat16)
        f = packed_linear(w)
        print(f"vision GEMM {m}x{k}x{n}: {2 * m * k * n / ms(lambda: f(x), 3) / 1e6:.0f} GFLOP/s packed")


def attention(flex: bool):
    q, k, v = [torch.randn(8, 10, 768, 64).to(torch.bfloat16) for _ in range(3)]
    t = ms(lambda: F.scaled_dot_product_attention(q, k, v), 3)
    print(f"vision attention 8x10x768x64: SDPA {t:.1f} ms ({8 * 10 * 768 * 768 * 64 * 4 / t / 1e6:.0f} GFLOP/s)")
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        fa = torch.compile(flex_attention)
        print(f"  torch.compile(flex_attention): {ms(lambda: fa(q, k, v), 3):.1f} ms")
    q, k, v = [torch.randn(8, 12, 490, 64).to(torch.bfloat16) for _ in range(3)]
    c = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 3)
    nc = ms(lambda: F.scaled_dot_product_attention(q, k, v), 3)
    print(f"LM prefill attention 8x12x490x64: causal {c:.1f} ms, non-causal {nc:.1f} ms")


def vision_rope_and_attention_math():
    from modeltest.engine.rope import apply_vision_rope
    from modeltest.engine.vision import rope_qk_

    qkv = torch.randn(6144, 3, 10, 64).to(torch.bfloat16)
    cos, sin = torch.randn(6144, 1, 64), torch.randn(6144, 1, 64)

    def separate():
        q, k, _ = qkv.unbind(1)
        return apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)

    print(
        f"vision rope of q and k, 6144x10x64, x 8 blocks: separate whole-batch {8 * ms(separate):.0f} ms, "
        f"rope_qk_ {8 * ms(lambda: rope_qk_(qkv, cos, sin)):.0f} ms"
    )
    q, k, v = [torch.randn(80, 768, 64).to(torch.bfloat16) for _ in range(3)]
    qf, kf, vf = [x.float().view(8, 10, 768, 64) for x in (q, k, v)]
    s32 = torch.randn(80, 768, 768)
    print(
        f"vision attention 8x10x768x64: SDPA fp32 {ms(lambda: F.scaled_dot_product_attention(qf, kf, vf), 3):.1f} ms; "
        f"math pieces: QK^T bmm bf16 {ms(lambda: torch.bmm(q, k.transpose(1, 2)), 3):.1f} ms, "
        f"softmax fp32 {ms(lambda: torch.softmax(s32, -1), 3):.1f} ms"
    )


def engine_textvqa_profile():
    from torch.profiler import profile
    from transformers import AutoProcessor

    from modeltest.bench.presets import preset_checkpoint
    from modeltest.bench.runners import EngineRunner
    from modeltest.bench.workloads import WorkloadSpec, build_inputs

    path = preset_checkpoint("mid")
    inputs = build_inputs(AutoProcessor.from_pretrained(path), WorkloadSpec("textvqa", 8, 8))
    runner = EngineRunner(path, "bf16", "cpu", 8, 1024, 16)
    runner.run(inputs, 8, 8)
    with profile() as prof:
        runner.run(inputs, 8, 8)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    share = {e.key: e.self_cpu_time_total / total for e in prof.key_averages()}
    gemm = share.get("mkldnn::_linear_pointwise", 0.0)
    sdpa = sum(v for k, v in share.items() if "scaled_dot_product" in k)
    print(
        f"engine textvqa batch 8, mid: {total / 1e6:.2f} s self CPU; oneDNN GEMMs {gemm:.0%}, SDPA {sdpa:.0%}, "
        f"other {1 - gemm - sdpa:.0%}"
    )


def decode_step():
    from modeltest.bench.presets import preset_checkpoint
    from modeltest.engine.engine import EngineConfig, LLMEngine, Request, SamplingParams
    from modeltest.engine.parallel import init_distributed

    path, tp = preset_checkpoint("mid"), init_distributed("cpu")
    for pack in (False, True):
        eng = LLMEngine(
            EngineConfig(
                model_path=str(path),
                dtype=torch.bfloat16,
                max_batch_size=8,
                max_input_length=256,
                max_output_length=160,
                onednn_weights=pack,
            ),
            tp,
        )
        for b in (1, 8):
            for r in [
                Request(
                    id=i,
                    input_ids=list(range(100 + i, 170 + i)),
                    params=SamplingParams(max_new_tokens=60, ignore_eos=True),
                )
                for i in range(b)
            ]:
                eng.add_request(r)
            for _ in range(10):
                eng.step()
            for _ in range(40):
                eng.step()
            print(
                f"engine decode step, mid, batch {b}, {'packed' if pack else 'plain'}: "
                f"{statistics.median(eng.stats().decode_times[-40:]) * 1e3:.1f} ms"
            )
            while eng.has_work():
                eng.step()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--flex", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    gemms()
    vision_gemm()
    attention(args.flex)
    vision_rope_and_attention_math()
    decode_step()
    engine_textvqa_profile()
