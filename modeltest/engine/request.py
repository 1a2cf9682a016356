"""A request to the engine: its inputs, its sampling parameters and its explicit lifecycle.

    WAITING --admitted--> RUNNING --stop token / length--> FINISHED
       |      <--preempted--    |
       +--- rejected on arrival or failed in a pass ---> FAILED
       +--- abort(id) -----------------------------------> ABORTED

A RUNNING request first prefills (in one or several chunks, `num_computed` growing towards
`prefill_target`), then decodes a token per pass. Preempted (its KV blocks taken back when the
cache runs out), it waits again and on readmission prefills its prompt *and* the tokens it had
generated — most of it found in the prefix cache — then goes on where it stopped.

Timestamps are `time.perf_counter()` seconds: arrival (add_request), admission (blocks given),
first token, finish. `queue_time` is what a request spent waiting for a batch slot and blocks;
`run_time` is its own time in the engine from admission to its last token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .kv_cache import MediaSpan

# The output-length limit where a caller names none: the reference runner's default (run_pa.sh).
# Evaluation runs take the model config's max_output_length (100, the reference's), and
# `modeltest serve` its own --max-output-length (2048: a chat server's answers run longer).
DEFAULT_MAX_OUTPUT_LENGTH = 256
DEFAULT_MAX_INPUT_LENGTH = 4096
STOP_TOKEN_IDS = (151645, 151643)  # Qwen2's <|im_end|>, <|endoftext|>: where a checkpoint names none


def visible_ids(ids: Sequence[int], stop_token_ids: Sequence[int], ignore_eos: bool) -> List[int]:
    """The one stop-token rule: the tokens a user reads are the generated ones without a final stop
    token (kept with ignore_eos, where stop tokens do not stop)."""
    ids = list(ids)
    if ids and not ignore_eos and ids[-1] in stop_token_ids:
        ids = ids[:-1]
    return ids


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def is_done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.ABORTED)


@dataclass
class SamplingParams:
    """How a request's tokens are chosen and when it stops.

    temperature 0 is greedy (the only mode the harness uses: scores must be reproducible).
    With temperature > 0 a token is drawn after top-k and top-p filtering, from a random stream
    that depends on `seed` and the token's index only (model_runner.sample_token): the same seed
    gives the same tokens whatever else is in the batch.
    """

    max_new_tokens: int = DEFAULT_MAX_OUTPUT_LENGTH
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: Optional[int] = None
    # None: the checkpoint's (engine/config.checkpoint_stop_ids), filled in by the engine on arrival.
    stop_token_ids: Optional[Tuple[int, ...]] = None
    # Log-probabilities of each chosen token and of this many most likely ones (0..20); None: off.
    # The model's log-softmax before temperature / top-k / top-p (what vLLM returns by default).
    logprobs: Optional[int] = None
    # Log-probabilities of each prompt token after the first, given the tokens before it, and of
    # this many most likely tokens there (0..20); None: off. Such a request reads nothing from the
    # prefix cache (every prompt row must be computed) — a log-likelihood request.
    prompt_logprobs: Optional[int] = None
    # Logit adjustments (engine/logits.py says how each is applied); the defaults change nothing.
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = None
    min_tokens: int = 0
    # Structured output: an llguidance grammar (engine/grammar.py) the tokens must follow; None: free.
    grammar: Optional[str] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)
            or self.min_tokens > 0
        )


@dataclass
class Request:
    id: object
    input_ids: List[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    pixel_values: Optional[torch.Tensor] = None  # [N_img_patches, C*T*P*P]
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3]
    pixel_values_videos: Optional[torch.Tensor] = None  # [N_vid_patches, C*T*P*P]
    video_grid_thw: Optional[torch.Tensor] = None  # [n_videos, 3]
    # Per video, seconds per temporal grid step (temporal patch size / sampled fps): where the
    # model numbers frames by time (Qwen2.5-VL), it places them. None: 1.0 each.
    second_per_grid_ts: Optional[List[float]] = None
    # Content key per medium (images, then videos; media_spans.content_keys); None: the engine
    # hashes the pixels itself on arrival.
    media_keys: Optional[List[str]] = None
    # ---- state, owned by the engine -------------------------------------------------------
    status: RequestStatus = RequestStatus.WAITING
    output_ids: List[int] = field(default_factory=list)
    # With params.logprobs: per output token, (its logprob, [(token id, logprob)] most likely first).
    output_logprobs: List[Tuple[float, List[Tuple[int, float]]]] = field(default_factory=list)
    # With params.prompt_logprobs: for prompt tokens 1..n-1 in order, the same pairs (token 0 has
    # nothing before it). Filled as the prefill's chunks run.
    prompt_logprobs: List[Tuple[float, List[Tuple[int, float]]]] = field(default_factory=list)
    matcher: Any = None  # with params.grammar: its llguidance matcher, fed each token (engine/grammar.py)
    error: Optional[str] = None
    retryable: bool = False  # FAILED by something not its own (a decode pass of its batch): compute again
    positions: Optional[torch.Tensor] = None  # [3, prompt_len] M-RoPE positions
    delta: int = 0  # decode position offset (M-RoPE)
    blocks: List[int] = field(default_factory=list)  # KV cache blocks, in token order
    spans: List[MediaSpan] = field(default_factory=list)  # where each medium's placeholders are
    block_hashes: List[bytes] = field(default_factory=list)  # of the full blocks prefilled so far
    num_computed: int = 0  # tokens whose K/V are in the cache
    prefill_target: int = 0  # tokens to prefill since admission (prompt, + outputs after a preemption)
    vision_embeds: Dict[int, torch.Tensor] = field(default_factory=dict)  # span index -> [n, hidden]
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    preemptions: int = 0
    t_arrival: float = 0.0
    t_admitted: Optional[float] = None
    t_first_token: Optional[float] = None
    t_finish: Optional[float] = None
    prefill_time: float = 0.0  # admission to first token: its prefill passes (chunks), vision included
    decode_time: float = 0.0  # sum of the decode passes it was in

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def is_done(self) -> bool:
        return self.status.is_done

    @property
    def all_ids(self) -> List[int]:
        return self.input_ids + self.output_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt rows must still be computed for their logprobs."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.input_ids) - 1

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_target

    def reached_stop(self) -> bool:
        """Whether the tokens so far end this request (length, or a stop token unless ignored)."""
        if len(self.output_ids) >= self.params.max_new_tokens:
            return True
        return (
            not self.params.ignore_eos
            and bool(self.output_ids)
            and self.output_ids[-1] in (self.params.stop_token_ids or ())
        )

    def generated_ids(self) -> List[int]:
        """Output tokens without the final stop token (what a user reads)."""
        return visible_ids(self.output_ids, self.params.stop_token_ids or (), self.params.ignore_eos)

    @property
    def queue_time(self) -> float:
        """Seconds from arrival to admission (the whole life of one never admitted)."""
        end = self.t_admitted if self.t_admitted is not None else (self.t_finish or time.perf_counter())
        return end - self.t_arrival

    @property
    def run_time(self) -> float:
        """Seconds from admission to finish: the request's own time in the engine."""
        if self.t_admitted is None:
            return 0.0
        return (self.t_finish or time.perf_counter()) - self.t_admitted

    @property
    def e2e_time(self) -> float:
        """Seconds from arrival to finish (queue + run)."""
        return (self.t_finish or time.perf_counter()) - self.t_arrival
