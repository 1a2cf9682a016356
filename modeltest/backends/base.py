"""The inference backend contract the harness, run_pa and the benchmark feed.

A backend turns samples into model inputs (`prepare`: CPU work that may run in a background
thread and may raise SampleError) and generates greedily for them as a stream:

    submit(prepared, max_new_tokens)   hand over one sample's input
    step()                             do some work; return the (prepared, output) pairs that ended
    pending()                          how many submitted samples have not come back yet

The `engine` backend streams into our inference core (continuous batching: a finished
sequence's slot is refilled at the next step); the `hf` backend runs transformers' generate on
batches of `max_batch_size` queued samples, one batch per step. `generate` runs a list to
completion through the same three methods.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..core import Sample
from ..device import TORCH_DTYPES
from ..engine.request import DEFAULT_MAX_INPUT_LENGTH, DEFAULT_MAX_OUTPUT_LENGTH
from ..inputs import ModelInput
from ..media import MediaSource
from .traits import BackendTraits

if TYPE_CHECKING:  # annotations only: the config layer imports backends' traits, not the reverse
    from ..config.schema import ModelConfig


@dataclass
class BackendSettings:
    """Everything a backend is built from. The harness builds it from the evaluation config
    (`from_eval`); run_pa and the benchmark build it from their own arguments."""

    model: ModelConfig  # model_path, backend, data_type (resolved), block_size, chat template
    device: str  # npu | cuda | cpu (resolved)
    max_batch_size: int = 8
    max_input_length: int = DEFAULT_MAX_INPUT_LENGTH
    max_output_length: int = DEFAULT_MAX_OUTPUT_LENGTH
    # Where images/videos are decoded (media.MediaSource); None: here, without a cache.
    media: Optional[MediaSource] = None
    fast_processor: bool = True  # media/fast_processor.py's bit-identical image processor (engine)

    @classmethod
    def from_eval(cls, cfg, device: str, max_new_tokens: int, media: Optional[MediaSource] = None) -> "BackendSettings":
        """cfg: an EvalConfig. The batch size is the run's; the limits are the task's."""
        return cls(
            model=cfg.model,
            device=device,
            max_batch_size=cfg.run.batch_size,
            max_input_length=cfg.task.requested_max_input_length,
            max_output_length=max_new_tokens,
            media=media,
            fast_processor=cfg.run.fast_processor,
        )


@dataclass
class Prepared:
    """One sample's model input before batching."""

    sample: Sample
    text: str  # the prompt after the chat template, placeholders unexpanded
    images: Optional[list] = None  # PIL images from qwen-vl-utils (hf: processed with the batch)
    videos: Optional[list] = None  # float tensors [T, C, H, W] from qwen-vl-utils (hf)
    second_per_grid_ts: Optional[Any] = None  # [n_videos] float32, where the model places videos by time (hf)
    model_input: Optional[ModelInput] = None  # the processor's tensors for this sample alone (engine)
    request: Optional[Dict[str, Any]] = None  # the chat request's messages and extra fields (openai)
    preprocess_time: float = 0.0
    input_length: int = 0  # prompt tokens with the vision placeholders expanded


@dataclass
class GenerationOutput:
    text: str  # decoded new tokens, up to (not including) the stop token
    token_ids: List[int] = field(default_factory=list)
    input_length: int = 0  # prompt tokens, vision placeholders expanded
    # Seconds this request spent being computed: from its admission into the engine (hf: the
    # start of its batch) to its last token. Excludes queue_time.
    e2e_time: float = 0.0
    queue_time: float = 0.0  # seconds from submit() until its computation started
    prefill_time: Optional[float] = None  # admission to first token (engine); first byte (openai)
    decode_time: Optional[float] = None  # the decode passes it was in, summed (engine)
    error: Optional[str] = None  # this request failed alone (e.g. too long); others ran
    num_tokens: Optional[int] = None  # generated tokens when token_ids are not known (a server's usage)
    transient: bool = False  # the error is the server's/network's: retry the sample on resume
    preprocessing: Optional[str] = None  # set when the input did not follow the task's options (openai)

    @property
    def output_tokens(self) -> int:
        return self.num_tokens if self.num_tokens is not None else len(self.token_ids)


Completed = Tuple[Prepared, GenerationOutput]


class Backend(abc.ABC):
    name = ""
    traits: BackendTraits  # what this backend can do (traits.py), declared by each subclass

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self.model_cfg = settings.model
        self.device = settings.device
        self.data_type = settings.model.data_type
        self.dtype = TORCH_DTYPES.get(self.data_type)  # None for a served model

    @property
    def rank(self) -> int:
        """Tensor-parallel rank of this process within its replica (0 without torchrun)."""
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @abc.abstractmethod
    def prepare(self, sample: Sample) -> Prepared:
        """The model input of one sample; raises SampleError for a bad image/video."""

    def prefetch(self, sample: Sample) -> None:
        """Start decoding the sample's media in the background (worker processes); prepare()
        collects it. Nothing to do for a backend that decodes nothing here."""

    @abc.abstractmethod
    def submit(self, prepared: Prepared, max_new_tokens: int, ignore_eos: bool = False) -> None:
        """Queue one sample; `ignore_eos` forces exactly max_new_tokens tokens (benchmarks)."""

    @abc.abstractmethod
    def step(self) -> List[Completed]:
        """Do one unit of work; return the submitted samples that ended in it, with outputs."""

    @abc.abstractmethod
    def pending(self) -> int:
        """Submitted samples not yet returned by step()."""

    def queue_depth(self, batch_size: int) -> int:
        """How many submitted samples the harness keeps in the backend before it steps: a batch
        running and one waiting, so a finished sequence's slot is refilled at once."""
        return 2 * batch_size

    def generate(self, batch: List[Prepared], max_new_tokens: int, ignore_eos: bool = False) -> List[GenerationOutput]:
        """Run `batch` to completion; outputs in the given order."""
        for p in batch:
            self.submit(p, max_new_tokens, ignore_eos)
        done: Dict[int, GenerationOutput] = {}
        while self.pending():
            for p, out in self.step():
                done[id(p)] = out
        return [done[id(p)] for p in batch]

    def close(self) -> None:
        """Give up work not yet started (Ctrl-C): nothing to do for in-process backends."""

    def reuse(self) -> Optional[Dict[str, Any]]:
        """What the backend's caches saved this run (prefix/vision cache hits, preemptions); None
        where the backend has no such caches."""
        return None

    def describe(self) -> Dict[str, Any]:
        """Facts about the loaded model for the saved configuration."""
        return {"backend": self.name, "device": self.device, "data_type": self.data_type}
