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

from ..config.schema import ENGINE_SETTINGS
from ..core import Sample
from ..device import TORCH_DTYPES
from ..engine.engine import EngineConfig, LLMEngine, Request, RequestStatus, SamplingParams
from ..engine.parallel import TPContext, init_distributed
from ..inputs import engine_request, model_input, prefetch_media, sample_messages
from ..media import fast_processor
from ..media.decode import require_qwen_vl_utils
from ..media.processor import ProcessorCopies, load_processor
from .base import Backend, BackendSettings, Completed, GenerationOutput, Prepared
from .traits import TRAITS


def engine_config(settings: BackendSettings) -> EngineConfig:
    """The one place an EngineConfig is built from user-facing settings."""
    m = settings.model
    return EngineConfig(
        model_path=m.model_path,
        dtype=TORCH_DTYPES[m.data_type],
        max_batch_size=settings.max_batch_size,
        max_input_length=settings.max_input_length,
        max_output_length=settings.max_output_length,
        **{k: getattr(m, k) for k in ENGINE_SETTINGS},
    )


def engine_reuse(st) -> dict:
    """The reuse figures of engine stats (EngineStats), for summaries and benchmark files."""
    return {
        "prefix_cache": st.prefix_cache,
        "prompt_tokens": st.prompt_tokens,
        "cached_prompt_tokens": st.cached_prompt_tokens,
        "prefix_hit_rate": round(st.prefix_hit_rate, 4),
        "vision_cache_hits": st.vision_cache_hits,
        "vision_cache_misses": st.vision_cache_misses,
        "preemptions": st.preemptions,
        "max_num_batched_tokens": st.max_num_batched_tokens,
    }


class EngineBackend(Backend):
    name = "engine"
    traits = TRAITS["engine"]

    def __init__(self, settings: BackendSettings, tp_ctx: TPContext = None):
        super().__init__(settings)
        require_qwen_vl_utils()  # fail before loading weights, not on every sample
        self.processor = load_processor(self.model_cfg.model_path, fast=settings.fast_processor)
        self.tp = tp_ctx if tp_ctx is not None else init_distributed(self.device)
        self.engine = LLMEngine(engine_config(settings), self.tp)
        self._processors = ProcessorCopies(self.processor)
        self._inflight: Dict[int, Prepared] = {}  # request id -> Prepared, while the engine holds it
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
            mi = model_input(processor, sample_messages(sample), self.settings.media, self.model_cfg.use_chat_template)
        mi.media_keys()  # hash the pixels here, in a preparing thread, not in the loop that feeds the engine
        return Prepared(
            sample=sample,
            text=mi.text,
            model_input=mi,
            preprocess_time=time.perf_counter() - start,
            input_length=mi.prompt_tokens,
        )

    def prefetch(self, sample: Sample) -> None:
        if not sample.load_error:
            prefetch_media(sample_messages(sample), self.settings.media, uint8=fast_processor.installed(self.processor))

    def submit(self, prepared: Prepared, max_new_tokens: int, ignore_eos: bool = False) -> None:
        rid = next(self._ids)
        self._inflight[rid] = prepared
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
        self.engine.add_request(engine_request(rid, prepared.model_input, params))

    def pending(self) -> int:
        return len(self._inflight)

    def step(self) -> List[Completed]:
        return [(self._inflight.pop(r.id), self._output(r)) for r in self.engine.step()]

    def _output(self, r: Request) -> GenerationOutput:
        if r.status is not RequestStatus.FINISHED:
            return GenerationOutput(
                text="",
                error=r.error or r.status.value,
                input_length=len(r.input_ids),
                queue_time=r.queue_time,
                transient=r.retryable,
            )
        ids = r.generated_ids()
        return GenerationOutput(
            text=self.processor.tokenizer.decode(ids, skip_special_tokens=False),
            token_ids=ids,
            input_length=len(r.input_ids),
            e2e_time=r.run_time,
            queue_time=r.queue_time,
            prefill_time=r.prefill_time,
            decode_time=r.decode_time,
        )

    def reuse(self):
        return engine_reuse(self.engine.stats(timings=False))

    def describe(self):
        d = super().describe()
        stats = self.engine.stats()
        d.update(world_size=self.world_size, kv_cache_tokens=stats.capacity_tokens, block_size=stats.block_size)
        return d
