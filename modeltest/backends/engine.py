"""Backend `engine`: the project's own tensor-parallel inference core (modeltest/engine).

Preprocessing is transformers' Qwen2-VL processor (tokenizer, chat template, image processor)
after qwen-vl-utils; the model, KV cache and scheduling are ours. Under torchrun every rank
builds the same inputs and runs the same engine loop; only rank 0 writes files.
"""
from __future__ import annotations

import copy
import threading
import time
from typing import List

from ..engine.engine import STOP_TOKEN_IDS, EngineConfig, LLMEngine, Request
from ..engine.parallel import init_distributed
from ..media import load_processor, load_vision, prompt_text, require_qwen_vl_utils
from ..tasks.base import Sample
from .base import Backend, GenerationOutput, Prepared

class EngineBackend(Backend):
    name = "engine"

    def __init__(self, model_cfg, device: str, data_type: str, max_batch_size: int = 8,
                 max_input_length: int = 4096, max_output_length: int = 256, tp_ctx=None):
        super().__init__(model_cfg, device, data_type)
        require_qwen_vl_utils()   # fail before loading weights, not on every sample
        self.processor = load_processor(model_cfg.model_path)
        self.tp = tp_ctx if tp_ctx is not None else init_distributed(device)
        self.engine = LLMEngine(EngineConfig(
            model_path=model_cfg.model_path, dtype=self.dtype, max_batch_size=max_batch_size,
            max_input_length=max_input_length, max_output_length=max_output_length,
            block_size=model_cfg.block_size), self.tp)
        # prepare() runs in worker threads; a fast tokenizer shared between threads can fail
        # ("Already borrowed"), so each thread gets its own processor copy.
        self._local = threading.local()
        self._inflight = {}   # streaming: request id -> Prepared, while the engine holds it

    @property
    def rank(self) -> int:
        return self.tp.rank

    @property
    def world_size(self) -> int:
        return self.tp.world_size

    def _thread_processor(self):
        proc = getattr(self._local, "processor", None)
        if proc is None:
            proc = self._local.processor = copy.deepcopy(self.processor)
        return proc

    def prepare(self, sample: Sample) -> Prepared:
        start = time.perf_counter()
        images, videos = load_vision(sample)
        proc = self._thread_processor()
        text = prompt_text(proc, sample, self.model_cfg.use_chat_template)
        inputs = proc(text=[text], images=images, videos=videos, return_tensors="pt")
        prepared = Prepared(sample=sample, text=text, preprocess_time=time.perf_counter() - start,
                            input_length=int(inputs["input_ids"].shape[1]))
        prepared.inputs = inputs
        return prepared

    @staticmethod
    def _request(rid, p: Prepared, max_new_tokens: int, ignore_eos: bool) -> Request:
        inp = p.inputs
        return Request(id=rid, input_ids=inp["input_ids"][0].tolist(), max_new_tokens=max_new_tokens,
                       pixel_values=inp.get("pixel_values"), image_grid_thw=inp.get("image_grid_thw"),
                       pixel_values_videos=inp.get("pixel_values_videos"), video_grid_thw=inp.get("video_grid_thw"),
                       ignore_eos=ignore_eos)

    def _output(self, r: Request) -> GenerationOutput:
        if r.error:
            return GenerationOutput(text="", error=r.error, input_length=len(r.input_ids))
        ids = list(r.output_ids)
        if ids and not r.ignore_eos and ids[-1] in STOP_TOKEN_IDS:
            ids = ids[:-1]
        return GenerationOutput(text=self.processor.tokenizer.decode(ids, skip_special_tokens=False), token_ids=ids,
                                input_length=len(r.input_ids), e2e_time=r.e2e_time,
                                prefill_time=r.prefill_time, decode_time=r.decode_time)

    def generate(self, batch: List[Prepared], max_new_tokens: int, ignore_eos: bool = False) -> List[GenerationOutput]:
        requests = [self._request(i, p, max_new_tokens, ignore_eos) for i, p in enumerate(batch)]
        self.engine.generate(requests)
        return [self._output(r) for r in requests]

    # ---- streaming: the harness keeps the engine fed, so a finished sequence's slot is refilled
    # at once (continuous batching across the whole dataset) and each sample is saved as it ends.
    def submit(self, prepared: Prepared, max_new_tokens: int) -> None:
        rid = id(prepared)
        self._inflight[rid] = prepared
        self.engine.add_request(self._request(rid, prepared, max_new_tokens, False))

    def pending(self) -> int:
        return len(self._inflight)

    def step(self):
        """One engine pass; returns [(prepared, GenerationOutput)] for the requests that ended."""
        return [(self._inflight.pop(r.id), self._output(r)) for r in self.engine.step()]

    def describe(self):
        d = super().describe()
        d.update(world_size=self.world_size, kv_cache_tokens=self.engine.capacity_tokens,
                 block_size=self.engine.cfg.block_size)
        return d
