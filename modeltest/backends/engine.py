"""Backend `engine`: the project's own tensor-parallel inference core (modeltest/engine).

Preprocessing is transformers' Qwen2-VL processor (tokenizer, chat template, image processor)
after qwen-vl-utils; the model, KV cache and scheduling are ours. Under torchrun every rank
builds the same inputs and runs the same engine loop; only rank 0 writes files.

Streaming: the harness keeps the engine fed, so a finished sequence's slot is refilled at once
(continuous batching across the whole dataset) and each sample is saved as it ends.
"""
from __future__ import annotations

import itertools
import time
from typing import Dict, List

from ..engine.engine import EngineConfig, LLMEngine, Request, RequestStatus, SamplingParams
from ..engine.parallel import TPContext, init_distributed
from .. import fast_processor
from ..media import ProcessorCopies, load_processor, prefetch_vision, processor_inputs, require_qwen_vl_utils
from ..device import TORCH_DTYPES
from ..tasks.base import Sample
from .base import Backend, BackendSettings, Completed, GenerationOutput, Prepared


def engine_config(settings: BackendSettings) -> EngineConfig:
    """The one place an EngineConfig is built from user-facing settings."""
    m = settings.model
    return EngineConfig(model_path=m.model_path, dtype=TORCH_DTYPES[m.data_type],
                        max_batch_size=settings.max_batch_size, max_input_length=settings.max_input_length,
                        max_output_length=settings.max_output_length, block_size=m.block_size)


def engine_request(rid, inputs: Dict, max_new_tokens: int, ignore_eos: bool = False) -> Request:
    """An engine request from the processor's tensors of one sample."""
    return Request(id=rid, input_ids=inputs["input_ids"][0].tolist(),
                   params=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos),
                   pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                   pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=inputs.get("video_grid_thw"))


class EngineBackend(Backend):
    name = "engine"

    def __init__(self, settings: BackendSettings, tp_ctx: TPContext = None):
        super().__init__(settings)
        require_qwen_vl_utils()   # fail before loading weights, not on every sample
        self.processor = load_processor(self.model_cfg.model_path, fast=settings.fast_processor)
        self.tp = tp_ctx if tp_ctx is not None else init_distributed(self.device)
        self.engine = LLMEngine(engine_config(settings), self.tp)
        self._processors = ProcessorCopies(self.processor)
        self._inflight: Dict[int, Prepared] = {}   # request id -> Prepared, while the engine holds it
        self._ids = itertools.count()

    @property
    def rank(self) -> int:
        return self.tp.rank

    @property
    def world_size(self) -> int:
        return self.tp.world_size

    def prepare(self, sample: Sample) -> Prepared:
        start = time.perf_counter()
        with self._processors.borrow() as processor:
            text, inputs = processor_inputs(processor, sample, self.model_cfg.use_chat_template, self.settings.media)
        return Prepared(sample=sample, text=text, inputs=inputs, preprocess_time=time.perf_counter() - start,
                        input_length=int(inputs["input_ids"].shape[1]))

    def prefetch(self, sample: Sample) -> None:
        prefetch_vision(sample, self.settings.media, uint8=fast_processor.installed(self.processor))

    def submit(self, prepared: Prepared, max_new_tokens: int, ignore_eos: bool = False) -> None:
        rid = next(self._ids)
        self._inflight[rid] = prepared
        self.engine.add_request(engine_request(rid, prepared.inputs, max_new_tokens, ignore_eos))

    def pending(self) -> int:
        return len(self._inflight)

    def step(self) -> List[Completed]:
        return [(self._inflight.pop(r.id), self._output(r)) for r in self.engine.step()]

    def _output(self, r: Request) -> GenerationOutput:
        if r.status is not RequestStatus.FINISHED:
            return GenerationOutput(text="", error=r.error or r.status.value, input_length=len(r.input_ids),
                                    queue_time=r.queue_time)
        ids = r.generated_ids()
        return GenerationOutput(text=self.processor.tokenizer.decode(ids, skip_special_tokens=False), token_ids=ids,
                                input_length=len(r.input_ids), e2e_time=r.run_time, queue_time=r.queue_time,
                                prefill_time=r.prefill_time, decode_time=r.decode_time)

    def describe(self):
        d = super().describe()
        stats = self.engine.stats()
        d.update(world_size=self.world_size, kv_cache_tokens=stats.capacity_tokens, block_size=stats.block_size)
        return d
