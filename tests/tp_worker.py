"""Run under torchrun: the engine on the test cases at this world size; rank 0 saves the results.

python -m torch.distributed.run --nproc_per_node N tests/tp_worker.py MODEL DEMO_ROOT OUT.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import all_inputs, make_request, run_cases  # noqa: E402

from modeltest.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from modeltest.engine.parallel import init_distributed  # noqa: E402


def main(model: str, demo_root: str, out: str) -> None:
    from transformers import AutoProcessor

    tp = init_distributed("cpu")
    engine = LLMEngine(
        EngineConfig(
            model_path=model,
            dtype=torch.float32,
            max_batch_size=4,
            max_input_length=2048,
            max_output_length=16,
            block_size=16,
        ),
        tp,
    )
    inputs = all_inputs(AutoProcessor.from_pretrained(model), Path(demo_root))
    results = run_cases(engine, inputs)
    # prompt logprobs (completions' echo) through the step loop: full-vocabulary rows gathered
    scoring = make_request("score", inputs["image"], 1)
    scoring.params.prompt_logprobs = 3
    results["prompt_logprobs"] = engine.generate([scoring])[0].prompt_logprobs
    st = engine.stats()
    # every rank must take the same reuse decisions (a vision-cache miss on one rank alone would
    # leave the others waiting in the tower's collectives): each rank reports its own
    reuse = (st.prompt_tokens, st.cached_prompt_tokens, st.vision_cache_hits, st.vision_cache_misses)
    torch.save(reuse, f"{out}.rank{tp.rank}")
    results["reuse"] = reuse
    results["world_size"] = tp.world_size
    results["layout"] = [engine.runner.model.layout.kv_heads, engine.runner.model.layout.q_heads]
    if tp.rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
