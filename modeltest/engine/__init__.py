"""The project's own Qwen2-VL inference core: tensor parallel, paged KV cache, continuous batching.

    config.py     model facts from config.json
    parallel.py   torch.distributed set-up and the head layout across ranks
    layers.py     column/row/vocab-parallel layers, norms
    rope.py       M-RoPE (3-axis positions) and the vision tower's 2-D rotary
    vision.py     the vision tower (tensor parallel)
    model.py      the Qwen2 language model + the multimodal wrapper
    loader.py     safetensors -> this rank's slices
    kv_cache.py   paged KV cache and block allocation
    engine.py     requests, scheduler (continuous batching), greedy decoding, timings
"""
