"""Logit adjustments a request may ask for, applied to its own row of fp32 logits before the
token is chosen (greedy or sampled) — never to another request's, so they are batch-independent.

    repetition_penalty   transformers' definition (vLLM's extension): every token already in the
                         prompt or the output has its logit divided by p where positive, multiplied
                         by p where negative
    frequency_penalty    OpenAI's: minus penalty x how often the token was generated so far
    presence_penalty     OpenAI's: minus penalty once the token was generated at all
    logit_bias           OpenAI's: a bias (-100..100) added to named token ids
    min_tokens           vLLM's: stop tokens impossible until this many tokens were generated

Logprobs are reported from the logits before these (model_runner.token_logprobs).
"""

from __future__ import annotations

import torch

from .request import Request


def adjust_logits(logits: torch.Tensor, r: Request) -> torch.Tensor:
    """logits [vocab] fp32 of request r's next token -> adjusted copy."""
    p = r.params
    x = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.input_ids) | set(r.output_ids)), dtype=torch.long, device=x.device)
        seen = seen[seen < x.shape[0]]
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
        ids = torch.tensor(r.output_ids, dtype=torch.long, device=x.device)
        counts = torch.zeros_like(x).index_add_(0, ids, torch.ones_like(ids, dtype=x.dtype))
        x -= counts * p.frequency_penalty + (counts > 0).to(x.dtype) * p.presence_penalty
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=x.device)
        x[ids] += torch.tensor(list(p.logit_bias.values()), dtype=x.dtype, device=x.device)
    if len(r.output_ids) < p.min_tokens and p.stop_token_ids:
        x[list(p.stop_token_ids)] = float("-inf")
    return x
