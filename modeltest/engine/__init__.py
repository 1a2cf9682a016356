"""The project's own Qwen2-VL / Qwen2.5-VL inference core: tensor parallel, paged KV cache,
continuous batching.

families.py      the model families (model_type -> name, transformers class, version needed)
config.py        model facts from config.json
parallel.py      torch.distributed set-up and the head layout across ranks
loader.py        safetensors -> the slices a layer asks for
layers.py        column/row/vocab-parallel layers (each loads its own shard), norms
rope.py          M-RoPE (3-axis positions; Qwen2.5-VL's video time) and the towers' 2-D rotary
vision.py        Qwen2-VL's vision tower (tensor parallel); the patch embedding and merger both use
vision_qwen2_5.py  Qwen2.5-VL's vision tower: windows, RMSNorm, gated MLP
vision_windows.py  Qwen2.5-VL's windowed vision attention: patch order and window bounds
model.py         the Qwen2 language model + the multimodal wrapper
kv_cache.py      paged KV cache; ref-counted blocks findable by content hash (prefix cache)
media_spans.py   which prompt rows hold which medium; media content keys
vision_cache.py  the vision tower's output per medium, LRU-bounded
request.py       a request: inputs, sampling parameters, status, timings
logits.py        penalties, logit_bias, min_tokens on one request's logits row
grammar.py       structured output: llguidance grammars and the token mask of each step
scheduler.py     each pass: decodes + prefill chunks, admission, blocks on demand, preemption
model_runner.py  loads the model and cache, builds each pass's tensors, runs it, samples (CUDA
                 graphs); prompt logprobs from the prefill rows
cuda_graphs.py   decode steps captured and replayed as CUDA graphs
engine.py        the loop: add_request / step / abort / stats
"""
