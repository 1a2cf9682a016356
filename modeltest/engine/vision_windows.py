"""Qwen2.5-VL's windowed vision attention: the order its tower visits patches in, window by window.

Qwen2.5-VL's vision blocks attend within windows of `window_size` pixels (except the blocks in
`fullatt_block_indexes`, which see the whole medium). The tower permutes its patch rows so each
window's rows are contiguous — in units of merged cells (spatial_merge_size² patches, which the
merger later turns into one token) — attends within `cu_window_seqlens`, and undoes the
permutation after the merger. This is transformers' `get_vision_window_index`, written without its
padding trick (a window row of -100s when a side divides evenly, removed again by
`unique_consecutive`): the same order and boundaries (tests/test_vision_windows.py).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def vision_windows(
    grid_thw: Sequence[Sequence[int]], merge: int, window_size: int, patch_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order [cells] long: merged-cell indices, window after window, row-major inside each,
    media and frames in order; cu [windows + 1] int32: window boundaries in patch rows)."""
    side = window_size // merge // patch_size  # merged cells per window side
    unit = merge * merge  # patches per merged cell
    orders, bounds, base, end = [], [torch.zeros(1, dtype=torch.long)], 0, 0
    for t, h, w in grid_thw:
        gh, gw = int(h) // merge, int(w) // merge
        cells = torch.arange(int(t) * gh * gw).reshape(int(t), gh, gw)  # [t, gh, gw]
        ph, pw = (-gh) % side, (-gw) % side  # pad each side up to whole windows, with -1
        padded = F.pad(cells, (0, pw, 0, ph), value=-1)
        wins = padded.reshape(int(t), (gh + ph) // side, side, (gw + pw) // side, side)
        wins = wins.permute(0, 1, 3, 2, 4).reshape(-1, side * side)  # [windows, side²]
        sizes = (wins >= 0).sum(dim=1)  # [windows], none empty (padding is only ever partial)
        orders.append(wins[wins >= 0] + base)
        bounds.append(sizes.cumsum(0) * unit + end)
        base += int(t) * gh * gw
        end = int(bounds[-1][-1])
    return torch.cat(orders), torch.cat(bounds).to(torch.int32)
