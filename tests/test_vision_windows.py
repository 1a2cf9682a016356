"""Qwen2.5-VL's window order (engine/vision_windows.py) = transformers' get_vision_window_index
(transformers 5: the suite's .venv-t5 pass), on grids that divide into windows, that do not, that
are smaller than one window, a video, and several media at once."""

from __future__ import annotations

import pytest
import torch

from modeltest.engine.vision_windows import vision_windows

GRIDS = [
    [(1, 16, 16)],  # 8x8 merged cells: exactly 2x2 windows of 4x4
    [(1, 10, 14)],  # 5x7 cells: windows cut at the edges
    [(1, 4, 6)],  # 2x3 cells: smaller than one window
    [(3, 8, 12)],  # a video of 3 temporal patches
    [(1, 16, 16), (2, 10, 6), (1, 4, 4)],  # two images and a video in one prompt
]


@pytest.mark.parametrize("grids", GRIDS)
def test_window_order_and_bounds_equal_transformers(grids):
    vision_utils = pytest.importorskip("transformers.vision_utils", reason="transformers 5 (the .venv-t5 pass)")
    want_order, want_cu = vision_utils.get_vision_window_index(
        torch.tensor(grids), spatial_merge_size=2, window_size=112, patch_size=14
    )
    order, cu = vision_windows(grids, merge=2, window_size=112, patch_size=14)
    assert torch.equal(order, want_order)
    assert torch.equal(cu, want_cu)


def test_every_cell_once_and_windows_within_bounds():
    order, cu = vision_windows([(1, 10, 14), (2, 4, 6)], merge=2, window_size=112, patch_size=14)
    cells = 5 * 7 + 2 * 2 * 3
    assert sorted(order.tolist()) == list(range(cells))
    assert cu[0] == 0 and cu[-1] == cells * 4 and bool((cu[1:] > cu[:-1]).all())
    assert int((cu[1:] - cu[:-1]).max()) <= 4 * 4 * 4  # a window holds at most 4x4 cells of 4 patches
