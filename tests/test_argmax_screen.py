"""The int8 argmax screen must return exactly what a full-vocabulary argmax returns."""
import pytest
import torch
import torch.nn.functional as F

from modeltest.engine.argmax_screen import Int8ArgmaxScreen

pytestmark = pytest.mark.skipif(not Int8ArgmaxScreen.supported(torch.zeros(4, 64)),
                                reason="torch._int_mm is not available on this CPU build")


def full_argmax(h, w, valid=None):
    logits = F.linear(h, w[:valid] if valid else w).float()
    return logits.max(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_matches_full_argmax_on_random_heads(dtype, batch):
    g = torch.Generator().manual_seed(batch)
    w = (torch.randn(5000, 96, generator=g) * 0.02).to(dtype)
    screen = Int8ArgmaxScreen(w, 5000, chunk_rows=1024)   # several chunks
    for _ in range(20):
        h = (torch.randn(batch, 96, generator=g) * 3).to(dtype)
        best, idx = screen.argmax(h)
        ref_best, ref_idx = full_argmax(h, w)
        assert torch.equal(idx, ref_idx)
        if dtype == torch.bfloat16:   # exact values are rounded to bf16 as the full GEMM's are
            assert torch.equal(best, ref_best)
        else:                         # a smaller GEMM may sum in another order
            torch.testing.assert_close(best, ref_best, rtol=1e-6, atol=1e-6)
    assert screen.fallbacks == 0 and screen.screened == 20
    assert screen.stats()["mean_candidates"] < 5000 / 4      # it actually screens


def test_near_ties_and_exact_ties():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2000, 64, generator=g) * 0.02
    h = torch.randn(2, 64, generator=g)
    # Row 1500 beats row 700 by far less than int8 can resolve; rows 300 and 1800 tie exactly
    # and are the best for the second query: the first of them must win.
    w[700] = h[0] / h[0].norm() * 0.5
    w[1500] = w[700] + 1e-6 * torch.sign(h[0])
    w[300] = h[1] / h[1].norm() * 0.6
    w[1800] = w[300]
    screen = Int8ArgmaxScreen(w, 2000)
    best, idx = screen.argmax(h)
    ref_best, ref_idx = full_argmax(h, w)
    assert idx.tolist() == [1500, 300] == ref_idx.tolist()
    assert torch.equal(best, ref_best)


def test_outlier_activations_fall_back_to_the_full_product():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3000, 64, generator=g) * 0.02
    h = torch.randn(1, 64, generator=g) * 0.01
    h[0, 5] = 1e4          # one massive channel: int8 of h then loses every other channel,
    w[:, 5] = 0.0          # and that channel says nothing about which row wins
    screen = Int8ArgmaxScreen(w, 3000, max_candidates=64)
    _, idx = screen.argmax(h)
    assert idx.tolist() == full_argmax(h, w)[1].tolist()
    assert screen.fallbacks == 1


def test_padding_rows_are_never_chosen():
    w = torch.zeros(10, 32)
    w[:7] = -1.0                    # every real row scores below the zero padding rows
    h = torch.ones(2, 32)
    screen = Int8ArgmaxScreen(w, 7)
    best, idx = screen.argmax(h)
    ref_best, ref_idx = full_argmax(h, w, valid=7)
    assert torch.equal(idx, ref_idx) and idx.tolist() == [0, 0]
    assert torch.equal(best, ref_best)
