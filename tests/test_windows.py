"""Tests of `dagman_fast.windows`: the window order, shift mask and relative position index against MONAI's
window partition, `compute_mask` and `WindowAttention`; the token permutation's backward; window plans."""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets.swin_unetr import WindowAttention as MonaiWindowAttention
from monai.networks.nets.swin_unetr import compute_mask, window_partition

from dagman_fast.windows import permute_tokens, relative_position_index, shift_attention_mask, window_order, window_plan


# ---------------------------------------------------------------------------------------------------------------
# Helpers against MONAI's window partition and mask
# ---------------------------------------------------------------------------------------------------------------

HELPER_GRIDS = [
    # cubic grid, cubic window, half-window shift
    pytest.param((8, 8, 8), (4, 4, 4), (2, 2, 2), id='cubic'),
    # non-cubic grid
    pytest.param((4, 8, 12), (4, 4, 4), (2, 2, 2), id='noncubic-grid'),
    # non-cubic window and shift
    pytest.param((8, 8, 4), (4, 4, 2), (2, 2, 1), id='noncubic-window'),
    # one axis clipped to the grid (window 2, no shift on that axis), as get_window_size does for small stages
    pytest.param((8, 8, 2), (4, 4, 2), (2, 2, 0), id='clipped-axis'),
    # shift other than half a window
    pytest.param((6, 6, 6), (3, 3, 3), (1, 1, 1), id='odd-window'),
]


@pytest.mark.parametrize('grid,window,shift', HELPER_GRIDS)
def test_window_order_matches_roll_and_partition(grid, window, shift):
    x = torch.randn(2, *grid, 5)
    expected = window_partition(torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3)), window)
    perm = window_order(grid, window, shift)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(grid[0] * grid[1] * grid[2]))
    wn = window[0] * window[1] * window[2]
    got = x.flatten(1, 3)[:, perm].reshape(-1, wn, 5)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_window_order_without_shift():
    "The default shift is zero: plain partition."
    x = torch.randn(1, 4, 4, 8, 3)
    got = x.flatten(1, 3)[:, window_order((4, 4, 8), (2, 2, 4))].reshape(-1, 16, 3)
    torch.testing.assert_close(got, window_partition(x, (2, 2, 4)), atol=0, rtol=0)


@pytest.mark.parametrize('grid,window,shift', HELPER_GRIDS)
def test_shift_attention_mask_matches_monai(grid, window, shift):
    expected = compute_mask(list(grid), window, shift, 'cpu')
    got = shift_attention_mask(grid, window, shift, value=-100.0)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # with the default -inf: the same pattern, zeros where MONAI has 0 and -inf where it has -100
    inf_mask = shift_attention_mask(grid, window, shift)
    assert torch.equal(torch.isfinite(inf_mask), expected == 0)
    assert (inf_mask[torch.isfinite(inf_mask)] == 0).all()
    assert (inf_mask[~torch.isfinite(inf_mask)] == float('-inf')).all()
    # a token always attends to itself: no row is fully masked
    assert (torch.diagonal(inf_mask, dim1=1, dim2=2) == 0).all()


@pytest.mark.parametrize('window', [
    (4, 4, 4),  # the default cubic window
    (4, 4, 2),  # non-cubic
    (2, 3, 5),  # all axes different
])
def test_relative_position_index_matches_monai(window):
    monai_idx = MonaiWindowAttention(8, 2, window).relative_position_index
    torch.testing.assert_close(relative_position_index(window), monai_idx, atol=0, rtol=0)


def test_permute_tokens_forward_and_backward():
    perm = torch.randperm(24)
    inv = perm.argsort()
    x = torch.randn(3, 24, 5, dtype=torch.float64, requires_grad=True)
    y = permute_tokens(x, perm, inv)
    torch.testing.assert_close(y, x[:, perm], atol=0, rtol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, torch.autograd.grad(x[:, perm], x, g)[0], atol=0, rtol=0)
    torch.testing.assert_close(gx[:, perm], g, atol=0, rtol=0)
    assert torch.autograd.gradcheck(lambda t: permute_tokens(t, perm, inv), (x,))
    # applying the inverse undoes the permutation
    torch.testing.assert_close(permute_tokens(y, inv, perm), x, atol=0, rtol=0)


@pytest.mark.parametrize('grid,window,win,pad,shifted', [
    # grid a multiple of the window: no padding, shifted plan has a mask
    ((8, 8, 8), (4, 4, 4), (4, 4, 4), (0, 0, 0), True),
    # 6 is padded to 8 for windows of 4
    ((6, 6, 6), (4, 4, 4), (4, 4, 4), (2, 2, 2), True),
    # a grid smaller than the window: the window is clipped and the shift dropped, so no mask
    ((2, 2, 2), (4, 4, 4), (2, 2, 2), (0, 0, 0), False),
    # mixed: one axis clipped, one padded
    ((2, 6, 8), (4, 4, 4), (2, 4, 4), (0, 2, 0), True),
])
def test_window_plan(grid, window, win, pad, shifted):
    plan = window_plan(grid, window, tuple(w // 2 for w in window), 'cpu')
    assert plan.window == win and plan.pad == pad
    n = (grid[0] + pad[0]) * (grid[1] + pad[1]) * (grid[2] + pad[2])
    assert torch.equal(plan.perm[plan.inv], torch.arange(n))
    assert (plan.mask is not None) == shifted
    unshifted = window_plan(grid, window, (0, 0, 0), 'cpu')
    assert unshifted.mask is None
