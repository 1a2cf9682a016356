"""Run one workload on one backend at one batch size, returning tokens and measurements.

Both backends get the same processor outputs and generate the same number of tokens
(ignore_eos), greedily. Times cover generation only (not image decoding or preprocessing).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..device import synchronize
from .measure import PeakRSS, VisionTimer, device_allocated_mb, measured_run


@dataclass
class Measurement:
    backend: str
    batch_size: int
    elapsed_s: float
    tokens: List[List[int]]
    ttft_s: List[float]
    decode_s_per_step: Optional[float]
    vision_s: float
    peak_host_mb: float
    peak_device_mb: Optional[float]
    load_host_growth_mb: dict = field(default_factory=dict)
    host_growth_mb: float = 0.0  # peak RSS during the run minus RSS at its start
    device_growth_mb: Optional[float] = None  # the same for torch's device allocations
    extra: Dict = field(default_factory=dict)

    def row(self, workload: str, preset: str) -> dict:
        n = len(self.tokens)
        generated = sum(len(t) for t in self.tokens)
        q = statistics.quantiles(self.ttft_s, n=10) if len(self.ttft_s) > 1 else [self.ttft_s[0]] * 9
        return {
            "backend": self.backend,
            "workload": workload,
            "preset": preset,
            "batch_size": self.batch_size,
            "samples_per_s": round(n / self.elapsed_s, 4),
            "tokens_per_s": round(generated / self.elapsed_s, 3),
            "ttft_p50_ms": round(statistics.median(self.ttft_s) * 1000, 2),
            "ttft_p90_ms": round(q[8] * 1000, 2),
            "decode_ms_per_token": round(self.decode_s_per_step * 1000, 3) if self.decode_s_per_step else None,
            "vision_ms": round(self.vision_s * 1000, 1),
            "peak_host_mb": round(self.peak_host_mb, 1),
            "peak_device_mb": round(self.peak_device_mb, 1) if self.peak_device_mb is not None else None,
        }


def bench_engine_config(
    model_path, data_type: str, device: str, max_batch_size: int, max_input: int, max_output: int, **overrides
):
    """An EngineConfig by the harness's and run_pa's path (settings -> engine_config), with any
    EngineConfig field overridden (the reuse benchmarks turn reuse and scheduling off)."""
    import dataclasses

    from ..backends.base import BackendSettings
    from ..backends.engine import engine_config
    from ..config.schema import ModelConfig

    settings = BackendSettings(
        model=ModelConfig(model_path=str(model_path), data_type=data_type),
        device=device,
        max_batch_size=max_batch_size,
        max_input_length=max_input,
        max_output_length=max_output,
    )
    return dataclasses.replace(engine_config(settings), **overrides)


class EngineRunner:
    name = "engine"

    def __init__(self, model_path, data_type: str, device: str, max_batch_size: int, max_input: int, max_output: int):
        from ..engine.engine import LLMEngine
        from ..engine.parallel import init_distributed

        self.tp = init_distributed(device)
        self.device = self.tp.device
        cfg = bench_engine_config(model_path, data_type, device, max_batch_size, max_input, max_output)
        before = device_allocated_mb(self.device)
        with PeakRSS() as mem:
            self.engine = LLMEngine(cfg, self.tp)
        self.load_growth_mb = {"rss": round(mem.growth_mb, 1), "anon": round(mem.anon_growth_mb, 1)}
        self.load_device_mb = device_allocated_mb(self.device) - before  # weights + KV cache

    def run(self, inputs: List[dict], new_tokens: int, batch_size: int) -> Measurement:
        from ..engine.request import SamplingParams
        from ..inputs import ModelInput, engine_request

        eng = self.engine
        eng.limit_batch_size(batch_size)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        reqs = [engine_request(i, ModelInput(text="", inputs=dict(x)), params) for i, x in enumerate(inputs)]
        # Every timed run starts cold: the same inputs run at each batch size and repeat, and the
        # prefix and vision caches would otherwise answer the later runs from the earlier ones
        # (hf keeps nothing between generate calls; the reuse workloads measure reuse itself).
        eng.clear_caches()
        before = eng.stats(timings=False)
        with measured_run(self.device) as run:
            eng.generate(reqs)
        bad = [r.error for r in reqs if r.error]
        if bad:
            from ..errors import UserError

            raise UserError(f"bench: an engine request failed ({bad[0]}); lower --image-size/--frames or --requests")
        after = eng.stats()
        n_decode, n_vision = after.decode_passes - before.decode_passes, after.vision_passes - before.vision_passes
        decode = after.decode_times[-n_decode:] if n_decode else []
        vision_s = sum(after.vision_times[-n_vision:]) if n_vision else 0.0
        return Measurement(
            "engine",
            batch_size,
            run.elapsed_s,
            [r.output_ids for r in reqs],
            [r.t_first_token - r.t_arrival for r in reqs],
            statistics.fmean(decode) if decode else None,
            vision_s,
            run.peak_host_mb,
            run.peak_device_mb,
            self.load_growth_mb,
            run.host_growth_mb,
            run.device_growth_mb,
        )


class _StepClock:
    """A StoppingCriteria that never stops: it notes when each new token appears."""

    def __init__(self, device):
        self.times: List[float] = []
        self.device = device

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFRunner:
    name = "hf"

    def __init__(self, model_path, dtype, device: str):
        from transformers import AutoProcessor

        from ..backends.hf import dtype_kwarg
        from ..engine.config import read_checkpoint_config
        from ..engine.families import FAMILIES, reference_model_class

        self.device = torch.device(device if device == "cpu" else f"{device}:0")
        before = device_allocated_mb(self.device)
        with PeakRSS() as mem:
            family = FAMILIES[read_checkpoint_config(model_path)["model_type"]]
            self.model = reference_model_class(family).from_pretrained(model_path, **dtype_kwarg(dtype))
            self.model.to(self.device).eval()
        self.load_growth_mb = {"rss": round(mem.growth_mb, 1), "anon": round(mem.anon_growth_mb, 1)}
        self.load_device_mb = device_allocated_mb(self.device) - before
        self.pad_id = AutoProcessor.from_pretrained(model_path).tokenizer.pad_token_id or 151643
        # transformers 5 moved the vision tower under .model
        visual = getattr(self.model, "visual", None) or self.model.model.visual
        self.vision = VisionTimer(visual, self.device)

    def collate(self, batch: List[dict]) -> dict:
        """Left-pad input_ids, build the attention mask, concatenate the vision tensors."""
        length = max(x["input_ids"].shape[1] for x in batch)
        ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, x in enumerate(batch):
            n = x["input_ids"].shape[1]
            ids[i, length - n :] = x["input_ids"][0]
            mask[i, length - n :] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        # Other per-token inputs (transformers 5's `mm_token_type_ids`, which its M-RoPE needs)
        # are left-padded with zeros the same way.
        for key in sorted(set().union(*batch) - {"input_ids", "attention_mask"}):
            if all(key in x and x[key].shape == x["input_ids"].shape for x in batch):
                t = torch.zeros((len(batch), length), dtype=batch[0][key].dtype)
                for i, x in enumerate(batch):
                    t[i, length - x[key].shape[1] :] = x[key][0]
                out[key] = t
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            parts = [x[key] for x in batch if key in x]
            if parts:
                out[key] = torch.cat(parts)
        return {k: v.to(self.device) for k, v in out.items()}

    @torch.inference_mode()
    def run(self, inputs: List[dict], new_tokens: int, batch_size: int) -> Measurement:
        from transformers import GenerationConfig, StoppingCriteriaList

        cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=self.pad_id)
        tokens, ttft, steps = [], [], []
        self.vision.total = 0.0
        with measured_run(self.device) as run:
            for i in range(0, len(inputs), batch_size):
                batch = self.collate(inputs[i : i + batch_size])
                clock = _StepClock(self.device)
                out = self.model.generate(
                    **batch, generation_config=cfg, stopping_criteria=StoppingCriteriaList([clock])
                )
                tokens += out[:, batch["input_ids"].shape[1] :].tolist()
                ttft += [clock.times[0] - run.start] * len(out)  # from the run start, as for the engine
                if len(clock.times) > 1:
                    steps.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
        return Measurement(
            "hf",
            batch_size,
            run.elapsed_s,
            tokens,
            ttft,
            statistics.fmean(steps) if steps else None,
            self.vision.total,
            run.peak_host_mb,
            run.peak_device_mb,
            self.load_growth_mb,
            run.host_growth_mb,
            run.device_growth_mb,
        )
