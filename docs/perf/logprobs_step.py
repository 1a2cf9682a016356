"""The engine's decode step with and without logprobs, same run: 8 sequences of the `mid` preset
(fp32, CPU), 48 tokens each, median decode-pass time per kind, three rounds interleaved.

    python docs/perf/logprobs_step.py        (needs ~/.cache/modeltest/bench/mid-seed0:
                                              `modeltest bench --preset mid` builds it)
"""

import statistics
from pathlib import Path

import torch

from modeltest.engine.engine import EngineConfig, LLMEngine
from modeltest.engine.parallel import TPContext
from modeltest.engine.request import Request, SamplingParams

MID = Path.home() / ".cache" / "modeltest" / "bench" / "mid-seed0"


def median_decode_ms(engine: LLMEngine, **params) -> float:
    reqs = [
        Request(
            f"r{i}", [9707 + i, 11, 1879, 0, 785, 6722], SamplingParams(max_new_tokens=48, ignore_eos=True, **params)
        )
        for i in range(8)
    ]
    engine.clear_caches()
    before = len(engine.runner.step_times["decode"])
    engine.generate(reqs)
    return statistics.median(list(engine.runner.step_times["decode"])[before:]) * 1e3


def main() -> None:
    cfg = EngineConfig(
        model_path=str(MID), dtype=torch.float32, max_batch_size=8, max_input_length=512, max_output_length=64
    )
    engine = LLMEngine(cfg, TPContext())
    for _ in range(3):
        plain = median_decode_ms(engine)
        top5 = median_decode_ms(engine, logprobs=5)
        top0 = median_decode_ms(engine, logprobs=0)
        print(f"decode step ms: plain {plain:.2f}  logprobs=5 {top5:.2f}  logprobs=0 {top0:.2f}")


if __name__ == "__main__":
    main()
