"""Backend `hf`: transformers' reference model of the checkpoint's family (Qwen2-VL:
Qwen2VLForConditionalGeneration; Qwen2.5-VL: Qwen2_5_VLForConditionalGeneration), greedy,
left-padded batches.

It streams like every backend (base.py): submitted samples wait in a queue, and each step()
runs transformers' generate on the next `max_batch_size` of them (the last batch may be short).
A batch that fails is retried one sample at a time, so only the sample at fault gets the error.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from pathlib import Path
from typing import Deque, List, Tuple

import torch

from ..core import Sample
from ..device import synchronize
from ..engine.config import checkpoint_stop_ids, read_checkpoint_config
from ..engine.families import FAMILIES, reference_model_class
from ..engine.loader import check_weight_files
from ..errors import UserError, first_line
from ..inputs import decoded_media, prefetch_media, prompt_text, sample_messages, video_seconds_per_grid
from ..media.decode import require_qwen_vl_utils
from ..media.processor import load_processor
from .base import Backend, BackendSettings, Completed, GenerationOutput, Prepared
from .traits import TRAITS


def device_for(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    import os

    return torch.device(device, int(os.environ.get("LOCAL_RANK", "0")))


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument: `torch_dtype` up to transformers 4.x (which ignores an
    unknown `dtype`), `dtype` from 5 (which deprecates `torch_dtype`)."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


class HFBackend(Backend):
    name = "hf"
    traits = TRAITS["hf"]

    def __init__(self, settings: BackendSettings):
        super().__init__(settings)
        from transformers import GenerationConfig

        path = Path(self.model_cfg.model_path)
        model_class = reference_model_class(FAMILIES[read_checkpoint_config(path)["model_type"]])
        require_qwen_vl_utils()  # fail before loading weights, not on every sample
        self.processor = load_processor(str(path))
        # Left padding keeps every row's last prompt token at the end, so batching cannot change
        # what a row generates.
        self.processor.tokenizer.padding_side = "left"
        self.torch_device = device_for(self.device)
        check_weight_files(path)  # a truncated file: one line naming it, not transformers' traceback
        try:
            self.model = model_class.from_pretrained(path, **dtype_kwarg(self.dtype))
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(
                f"model.model_path: transformers cannot load the weights in '{path}' ({first_line(e, 200)})"
            ) from None
        self.model.to(self.torch_device).eval()
        tok = self.processor.tokenizer
        self.stop_ids = list(checkpoint_stop_ids(path))  # the engine's, from the checkpoint
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        # prepare() runs in background threads while generate() pads with the processor's own
        # tokenizer; a fast tokenizer used from two threads can fail ("Already borrowed"), so
        # counting uses a private copy behind a lock.
        self._count_tokenizer = copy.deepcopy(tok)
        self._count_lock = threading.Lock()
        self.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, eos_token_id=self.stop_ids, pad_token_id=self.pad_id
        )
        # (prepared, max_new_tokens, ignore_eos, submit time) waiting for a batch
        self._queue: Deque[Tuple[Prepared, int, bool, float]] = collections.deque()

    def prepare(self, sample: Sample) -> Prepared:
        start = time.perf_counter()
        messages = sample_messages(sample)
        images, videos = decoded_media(messages, self.settings.media)
        text = prompt_text(self.processor, messages, self.model_cfg.use_chat_template)
        return Prepared(
            sample=sample,
            text=text,
            images=images,
            videos=videos,
            second_per_grid_ts=video_seconds_per_grid(self.processor, messages),
            preprocess_time=time.perf_counter() - start,
            input_length=self.count_input_tokens(text, images, videos),
        )

    def count_input_tokens(self, text: str, images, videos) -> int:
        """Prompt length once each placeholder becomes (t/2)*(h/14)*(w/14)/4 vision tokens."""
        with self._count_lock:
            n = len(self._count_tokenizer(text)["input_ids"])
        patch, merge = 14, 2
        for im in images or []:
            w, h = im.size
            n += (h // patch) * (w // patch) // (merge * merge) - 1
        for v in videos or []:
            t, _, h, w = v.shape
            n += max(1, t // 2) * (h // patch) * (w // patch) // (merge * merge) - 1
        return n

    def prefetch(self, sample: Sample) -> None:
        if not sample.load_error:
            prefetch_media(sample_messages(sample), self.settings.media)

    def submit(self, prepared: Prepared, max_new_tokens: int, ignore_eos: bool = False) -> None:
        self._queue.append((prepared, max_new_tokens, ignore_eos, time.perf_counter()))

    def pending(self) -> int:
        return len(self._queue)

    def step(self) -> List[Completed]:
        """generate() on the next batch: up to max_batch_size queued samples that share
        max_new_tokens and ignore_eos (the harness always gives the same ones)."""
        if not self._queue:
            return []
        first = self._queue[0]
        batch = []
        while self._queue and len(batch) < self.settings.max_batch_size and self._queue[0][1:3] == first[1:3]:
            batch.append(self._queue.popleft())
        prepared = [b[0] for b in batch]
        started = time.perf_counter()
        outputs = self._generate_isolating(prepared, first[1], first[2])
        for out, b in zip(outputs, batch):
            out.queue_time = started - b[3]
        return list(zip(prepared, outputs))

    def _generate_isolating(
        self, batch: List[Prepared], max_new_tokens: int, ignore_eos: bool
    ) -> List[GenerationOutput]:
        try:
            return self._generate_batch(batch, max_new_tokens, ignore_eos)
        except Exception as e:
            if len(batch) == 1:
                return [
                    GenerationOutput(
                        text="", input_length=batch[0].input_length, error=f"inference failed: {first_line(e)}"
                    )
                ]
            # Isolate the failing sample: run the batch one by one.
            return [self._generate_isolating([p], max_new_tokens, ignore_eos)[0] for p in batch]

    @torch.inference_mode()
    def _generate_batch(self, batch: List[Prepared], max_new_tokens: int, ignore_eos: bool) -> List[GenerationOutput]:
        start = time.perf_counter()
        images = [im for p in batch for im in (p.images or [])] or None
        videos = [v for p in batch for v in (p.videos or [])] or None
        # transformers 4.46 expands placeholders in the list it is given: pass a fresh list.
        inputs = self.processor(
            text=[p.text for p in batch], images=images, videos=videos, padding=True, return_tensors="pt"
        )
        seconds = [p.second_per_grid_ts for p in batch if p.second_per_grid_ts is not None]
        if seconds:  # the engine's value, whatever this transformers' processor assumes (inputs.py)
            inputs["second_per_grid_ts"] = torch.cat(seconds)
        inputs = inputs.to(self.torch_device)
        gen_cfg = self.generation_config
        if ignore_eos:  # keep going past a stop token (as the engine does), rather than forbidding it
            gen_cfg = copy.deepcopy(gen_cfg)
            gen_cfg.eos_token_id = None
        out = self.model.generate(**inputs, generation_config=gen_cfg, max_new_tokens=max_new_tokens)
        synchronize(self.torch_device)
        elapsed = time.perf_counter() - start
        prompt_len = inputs["input_ids"].shape[1]
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_in in zip(out[:, prompt_len:].tolist(), lengths):
            ids = []
            for t in row:
                if t in self.stop_ids and not ignore_eos:
                    break
                ids.append(t)
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=False)
            results.append(GenerationOutput(text=text, token_ids=ids, input_length=int(n_in), e2e_time=elapsed))
        return results

    def describe(self):
        d = super().describe()
        d["attn_implementation"] = getattr(self.model.config, "_attn_implementation", None)
        return d
