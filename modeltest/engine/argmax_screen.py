"""Exact greedy argmax over the LM head with a quarter of its memory traffic (CPU decode).

A decode step on CPU is bound by reading weights from DRAM, and the LM head is the largest single
read (vocab x hidden: 233 MB of a 367 MB step for the `mid` preset). Greedy decoding only needs
the argmax of the logits, not the logits, so we screen with an int8 copy of the head and then
compute exact logits for the few rows that can still win:

  1. h ~ s_h * q_h (int8 per row), W_i ~ s_i * q_i (int8 per vocabulary row, built at load).
  2. A = s_h * s_i * (q_h . q_i): one int8 GEMM (`torch._int_mm`, VNNI on x86), 1/4 of the bytes.
  3. Rigorous error bound, by Cauchy-Schwarz on h.W - hq.Wq = hq.(W - Wq) + (h - hq).W:
       |L_i - A_i| <= ||hq|| * max_i ||W_i - Wq_i|| + ||h - hq|| * max_i ||W_i|| =: b
  4. Every row with A_i >= max_j A_j - 2b (plus a rounding margin) is a candidate; the true
     argmax is always one of them. Exact logits of the union of candidates over the batch are
     computed from the original weights with the model's own dtype and rounding, and their
     argmax (first index on ties, candidates sorted) is the answer.

The answer is the argmax of exact logits, never of approximate ones, so greedy outputs do not
change. When the bound admits too many candidates (e.g. activation outliers make the int8 copy of
h coarse) the step falls back to the full GEMM. `torch._int_mm` has no fused dequantising GEMM
on CPU that is fast at batch > 1 (`_weight_int8pack_mm` is compute-bound there), hence the
int8 x int8 product. Not used on GPU: data-dependent shapes cannot be captured in a CUDA graph,
and the GPU decode step is not dominated by this one read.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Relative slack for rounding: exact logits are rounded to the model dtype (bf16: half an ulp is
# 2^-9 relative) before the argmax, as the full GEMM's output would be.
_ROUNDING = 2.0 ** -7


class Int8ArgmaxScreen:
    def __init__(self, weight: torch.Tensor, valid_rows: int, max_candidates: int = 2048,
                 chunk_rows: int = 8192):
        """weight: [N, K] LM-head rows (this rank's slice); rows >= valid_rows are padding."""
        self.weight = weight
        self.valid = valid_rows
        self.max_candidates = max_candidates
        n, k = weight.shape
        self.q = torch.empty(valid_rows, k, dtype=torch.int8)          # [N, K]
        self.scale = torch.empty(valid_rows, dtype=torch.float32)        # [N]
        err_max, norm_max = 0.0, 0.0
        # In chunks: a float32 copy of a whole 7B head would be 2 GB of load-time peak memory.
        for s in range(0, valid_rows, chunk_rows):
            w = weight[s:min(s + chunk_rows, valid_rows)].float()
            sc = w.abs().amax(dim=1).clamp_min(1e-30) / 127.0
            q = torch.round(w / sc[:, None]).clamp_(-127, 127)
            err_max = max(err_max, float((w - q * sc[:, None]).norm(dim=1).max()))
            norm_max = max(norm_max, float(w.norm(dim=1).max()))
            self.q[s:s + len(w)] = q.to(torch.int8)
            self.scale[s:s + len(w)] = sc
        self.err_max, self.norm_max = err_max, norm_max
        self.qt = self.q.t()                                              # [K, N] view for _int_mm
        self.screened = 0        # steps answered by the screen
        self.fallbacks = 0       # steps that needed the full GEMM
        self.candidates = 0      # exact rows computed over all screened steps

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        if weight.device.type != "cpu" or not hasattr(torch, "_int_mm"):
            return False
        try:   # _int_mm needs a VNNI/oneDNN path on this build and some shape alignment
            torch._int_mm(torch.zeros(1, weight.shape[1], dtype=torch.int8),
                          torch.zeros(weight.shape[1], 8, dtype=torch.int8))
            return True
        except RuntimeError:
            return False

    def argmax(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """h: [B, K] -> (best logit [B] float32, index [B] into this slice); first index on ties."""
        hf = h.float()
        s_h = hf.abs().amax(dim=1).clamp_min(1e-30) / 127.0                    # [B]
        qh = torch.round(hf / s_h[:, None]).clamp_(-127, 127)                   # [B, K]
        hq = qh * s_h[:, None]
        bound = hq.norm(dim=1) * self.err_max + (hf - hq).norm(dim=1) * self.norm_max   # [B]
        approx = torch._int_mm(qh.to(torch.int8), self.qt).float().mul_(self.scale)    # [B, N] / s_h
        top = approx.max(dim=1).values                                          # [B]
        # Thresholds in the unscaled units of `approx` (one fewer pass over [B, N]).
        thr = top - (2 * bound + _ROUNDING * (top.abs() * s_h + 2 * bound)) / s_h
        cand = (approx >= thr[:, None]).any(dim=0).nonzero().squeeze(1)        # [U] sorted
        if cand.numel() > self.max_candidates or cand.numel() == 0:   # 0: NaNs
            self.fallbacks += 1
            return self._full(h)
        self.screened += 1
        self.candidates += cand.numel()
        exact = F.linear(h, self.weight.index_select(0, cand)).float()         # [B, U]
        best, j = exact.max(dim=1)
        return best, cand[j]

    def _full(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(h, self.weight[: self.valid]).float()
        return logits.max(dim=1)

    def stats(self) -> dict:
        steps = self.screened + self.fallbacks
        return {"steps": steps, "fallbacks": self.fallbacks,
                "mean_candidates": self.candidates / self.screened if self.screened else None}
