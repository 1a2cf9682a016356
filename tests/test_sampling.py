"""The sampler draws from the distribution it claims: softmax(logits / temperature), cut to the
top-k tokens and to the top-p nucleus, renormalised — checked by frequency over many seeds
against the closed-form probabilities (not only reproducibility)."""

import numpy as np
import pytest
import torch

from modeltest.engine.model_runner import sample_token
from modeltest.engine.request import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
DRAWS = 6000


def frequencies(params_for_seed) -> np.ndarray:
    counts = np.zeros(len(LOGITS))
    for seed in range(DRAWS):
        counts[sample_token(LOGITS, params_for_seed(seed), step=0)] += 1
    return counts / DRAWS


def expected(temperature=1.0, keep=None) -> np.ndarray:
    p = np.exp(LOGITS.numpy() / temperature)
    if keep is not None:
        p[[i for i in range(len(p)) if i not in keep]] = 0
    return p / p.sum()


def close(freq: np.ndarray, p: np.ndarray) -> None:
    # 5 standard errors of a frequency over DRAWS draws: a wrong distribution is far outside
    tol = 5 * np.sqrt(p * (1 - p) / DRAWS) + 1e-9
    assert np.all(np.abs(freq - p) <= tol), (freq.round(4), p.round(4))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_draws_follow_the_softmax(temperature):
    close(frequencies(lambda s: SamplingParams(temperature=temperature, seed=s)), expected(temperature))


def test_top_k_keeps_the_k_largest_renormalised():
    freq = frequencies(lambda s: SamplingParams(temperature=1.0, top_k=3, seed=s))
    assert freq[3:].sum() == 0
    close(freq, expected(keep={0, 1, 2}))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    p = expected()
    # cumulative mass before each token: 0, .44, .71, .87, .93, .99: top_p 0.8 keeps the first three
    assert np.cumsum(p)[1] < 0.8 <= np.cumsum(p)[2]
    freq = frequencies(lambda s: SamplingParams(temperature=1.0, top_p=0.8, seed=s))
    assert freq[3:].sum() == 0
    close(freq, expected(keep={0, 1, 2}))


def test_a_draw_depends_on_its_seed_and_step_only():
    params = SamplingParams(temperature=1.0, seed=123)
    draws = [sample_token(LOGITS, params, step) for step in range(50)]
    assert draws == [sample_token(LOGITS.clone(), params, step) for step in range(50)]
    assert len(set(draws)) > 1  # the step changes the stream
