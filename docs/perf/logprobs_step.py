import torch, time, statistics as st
from modeltest.engine.engine import EngineConfig, LLMEngine
from modeltest.engine.parallel import TPContext
from modeltest.engine.request import Request, SamplingParams
from pathlib import Path
mid=str(Path.home()/'.cache/modeltest/bench/mid-seed0')
e=LLMEngine(EngineConfig(model_path=mid, dtype=torch.float32, max_batch_size=8, max_input_length=512, max_output_length=64), TPContext())
def run(**kw):
    reqs=[Request(f"r{i}", [9707+i, 11, 1879, 0, 785, 6722], SamplingParams(max_new_tokens=48, ignore_eos=True, **kw)) for i in range(8)]
    e.clear_caches(); n0=len(e.runner.step_times['decode'])
    e.generate(reqs)
    return st.median(list(e.runner.step_times['decode'])[n0:])*1e3
for rnd in range(3):
    print('plain', round(run(),2), 'logprobs5', round(run(logprobs=5),2), 'logprobs0', round(run(logprobs=0),2))
