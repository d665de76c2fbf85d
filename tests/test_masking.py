"""Tests for `dagman_fast.masking`: the cell-masking policies, their counts, randomness and shapes.

Every value is checked against a reference written here (exact rational counts, python sorts, numpy `kron`,
scipy connected components), never against the library's own helpers.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import ndimage

from dagman_fast.masking import (MASKINGS, MaskGenerator, attention_mask, block_mask, patch_dropout_mask,
                                 random_mask, upsample_mask)

GRIDS = [(2, 2, 2), (4, 4, 4), (3, 5, 4), (8, 8, 8)]
RATIOS = [0.0, 0.1, 0.3, 0.57, 0.7, 0.9, 1.0]
# 6-connectivity on the 3-D grid: face neighbours only.
SIX = ndimage.generate_binary_structure(3, 1)


def frac_floor(*factors) -> int:
    "floor of the product of decimal literals (and ints), in exact rational arithmetic: `int(r*N)` without round-off."
    p = Fraction(1)
    for f in factors:
        p *= Fraction(str(f)) if isinstance(f, float) else Fraction(f)
    return math.floor(p)


def ref_counts(policy, ratio, hint_ratio, hint_pool, n):
    "(k, n_hint, pool) written from the paper's definitions: k=int(rN), n_hint=int(h r N), pool=int(hint_pool N)."
    k = frac_floor(ratio, n)
    if policy != 'attention':
        return k, 0, 0
    pool = min(frac_floor(hint_pool, n), k)
    n_hint = min(frac_floor(hint_ratio, ratio, n), pool)
    return k, n_hint, pool


def distinct_attn(b, n, seed=0):
    "(b, n) attention with distinct values in every row (a random permutation of a strictly increasing sequence)."
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g).float() / n + 0.01 for _ in range(b)])


def ranked(row) -> list[int]:
    "Cell indices of one row by decreasing attention, with a plain python sort."
    vals = [float(v) for v in row]
    return sorted(range(len(vals)), key=lambda i: -vals[i])


# ---------------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize('policy', MASKINGS)
@pytest.mark.parametrize('grid', GRIDS)
def test_exact_masked_count(policy, grid):
    n = math.prod(grid)
    b = 3
    for ratio in RATIOS:
        for hint_ratio, hint_pool in [(0.1, 0.1), (0.2, 0.3), (0.0, 0.5), (0.5, 0.05)]:
            gen = MaskGenerator(policy, ratio, hint_ratio, hint_pool, generator=torch.Generator().manual_seed(1))
            attn = distinct_attn(b, n) if policy in ('attention', 'attention-no-hints', 'low') else None
            mask = gen(b, grid, attn)
            k, n_hint, _ = ref_counts(policy, ratio, hint_ratio, hint_pool, n)
            assert mask.dtype == torch.bool
            assert tuple(mask.shape) == (b, n)
            got = mask.sum(1).tolist()
            assert got == [k - n_hint] * b, (policy, grid, ratio, hint_ratio, hint_pool, got, k, n_hint)


def test_count_is_immune_to_float_round_off():
    # 0.57 * 100 == 56.99999999999999 in floating point; the paper's count is 57.
    n = 100
    assert 0.57 * n < 57
    mask = MaskGenerator('random', 0.57, generator=torch.Generator().manual_seed(0))(2, (4, 5, 5))
    assert mask.sum(1).tolist() == [57, 57]


def test_attention_hint_count_example():
    # Paper setting on an 8^3 grid: k = int(0.7*512) = 358, hints int(0.07*512) = 35 -> 323 masked.
    attn = distinct_attn(2, 512)
    mask = MaskGenerator('attention', 0.7, 0.1, 0.1, generator=torch.Generator().manual_seed(0))(2, 8, attn)
    assert mask.sum(1).tolist() == [358 - 35] * 2


# ---------------------------------------------------------------------------------------------------- attention policies


@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('policy,ratio', [('attention-no-hints', r) for r in (0.1, 0.5, 0.7, 1.0)] + [('low', r) for r in (0.1, 0.5, 0.7)])
def test_high_and_low_mask_exactly_the_top_or_bottom_k(grid, policy, ratio):
    n = math.prod(grid)
    attn = distinct_attn(4, n, seed=3 if policy == 'attention-no-hints' else 4)
    mask = MaskGenerator(policy, ratio)(4, grid, attn)
    k = frac_floor(ratio, n)
    for row, m in zip(attn, mask):
        order = ranked(row)  # most attended first
        expected = set(order[:k]) if policy == 'attention-no-hints' else set(order[n - k:]) if k else set()
        assert set(torch.nonzero(m).flatten().tolist()) == expected


def test_high_and_low_differ_and_are_disjoint_at_small_ratio():
    attn = distinct_attn(2, 64)
    hi = MaskGenerator('attention-no-hints', 0.3)(2, 4, attn)
    lo = MaskGenerator('low', 0.3)(2, 4, attn)
    assert not (hi & lo).any()


@pytest.mark.parametrize('grid', [(4, 4, 4), (3, 5, 4), (8, 8, 8)])
@pytest.mark.parametrize('ratio,hint_ratio,hint_pool', [(0.7, 0.1, 0.1), (0.5, 0.2, 0.3), (0.9, 0.3, 0.5)])
def test_attention_masks_top_k_minus_hints_from_pool(grid, ratio, hint_ratio, hint_pool):
    n = math.prod(grid)
    b = 5
    attn = distinct_attn(b, n, seed=7)
    mask = MaskGenerator('attention', ratio, hint_ratio, hint_pool, generator=torch.Generator().manual_seed(2))(
        b, grid, attn)
    k, n_hint, pool = ref_counts('attention', ratio, hint_ratio, hint_pool, n)
    assert n_hint > 0  # the cases are chosen so that there are hints
    for row, m in zip(attn, mask):
        order = ranked(row)
        topk, top_pool = set(order[:k]), set(order[:pool])
        masked = set(torch.nonzero(m).flatten().tolist())
        assert masked <= topk
        hints = topk - masked
        assert len(hints) == n_hint
        assert hints <= top_pool


def test_attention_hints_differ_between_samples():
    # identical attention rows: only the per-sample hint draws can tell the masks apart
    n = 512
    row = distinct_attn(1, n)[0]
    attn = row.expand(6, n).clone()
    mask = MaskGenerator('attention', 0.7, 0.1, 0.5, generator=torch.Generator().manual_seed(0))(6, 8, attn)
    distinct = {tuple(m.tolist()) for m in mask}
    assert len(distinct) == 6
    # ... and all of them still mask only inside the top-k of the common row
    topk = set(ranked(row)[:358])
    for m in mask:
        assert set(torch.nonzero(m).flatten().tolist()) <= topk


@pytest.mark.parametrize('k,n_hint,pool', [(10, 3, 5), (20, 4, 20), (12, 1, 1), (30, 7, 9)])
def test_attention_mask_hints_are_the_pool_cells_with_largest_noise(k, n_hint, pool):
    b, n = 3, 40
    attn = distinct_attn(b, n, seed=11)
    noise = torch.rand(b, pool)
    mask = attention_mask(attn, k, n_hint, pool, noise)
    for i in range(b):
        order = ranked(attn[i])
        pool_cells = order[:pool]  # most attended first
        by_noise = sorted(range(pool), key=lambda j: -float(noise[i, j]))
        hints = {pool_cells[j] for j in by_noise[:n_hint]}
        expected = [c in set(order[:k]) - hints for c in range(n)]
        assert mask[i].tolist() == expected


def test_attention_mask_without_hints_ignores_noise_and_accepts_largest_false():
    attn = distinct_attn(2, 20)
    m = attention_mask(attn, 5, largest=False)
    for row, mm in zip(attn, m):
        assert set(torch.nonzero(mm).flatten().tolist()) == set(ranked(row)[-5:])


def test_attention_mask_rejects_bad_arguments():
    attn = distinct_attn(2, 20)
    with pytest.raises(ValueError):
        attention_mask(attn, 21)
    with pytest.raises(ValueError):
        attention_mask(attn, 5, n_hint=3, pool=6)  # pool > k
    with pytest.raises(ValueError):
        attention_mask(attn, 5, n_hint=3, pool=4)  # no noise
    with pytest.raises(ValueError):
        attention_mask(attn, 5, n_hint=3, pool=4, hint_noise=torch.rand(2, 3))  # wrong noise shape


# ---------------------------------------------------------------------------------------------------- random


def test_random_mask_is_uniform():
    b, n = 3000, 64
    k = frac_floor(0.3, n)  # 19
    mask = MaskGenerator('random', 0.3, generator=torch.Generator().manual_seed(5))(b, 4).numpy()
    freq = mask.mean(0)
    p = k / n
    sd = math.sqrt(p * (1 - p) / b)
    assert np.abs(freq - p).max() < 5 * sd
    # and not degenerate: the rows differ
    assert len({r.tobytes() for r in mask[:50]}) == 50


def test_random_mask_pairs_are_uniform():
    # exactly k of n without replacement: two given cells are both masked with probability k(k-1)/(n(n-1))
    b, n, k = 4000, 8, 4
    mask = random_mask(b, n, k, generator=torch.Generator().manual_seed(9)).numpy().astype(float)
    both = (mask[:, 0] * mask[:, 5]).mean()
    p = k * (k - 1) / (n * (n - 1))
    assert abs(both - p) < 5 * math.sqrt(p * (1 - p) / b)


# ---------------------------------------------------------------------------------------------------- block


def components(mask3d: np.ndarray) -> np.ndarray:
    "Sizes of the 6-connected components of a boolean 3-D array."
    lab, nb = ndimage.label(mask3d, structure=SIX)
    return np.bincount(lab.ravel(), minlength=nb + 1)[1:]


@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('k_frac', [0.05, 0.3, 0.9, 1.0])
def test_block_mask_exact_count(grid, k_frac):
    n = math.prod(grid)
    k = frac_floor(k_frac, n)
    for seed in range(3):
        m = block_mask(4, grid, k, generator=torch.Generator().manual_seed(seed))
        assert m.dtype == torch.bool and tuple(m.shape) == (4, n)
        assert m.sum(1).tolist() == [k] * 4


@pytest.mark.parametrize('grid,ratio', [((8, 8, 8), 0.1), ((4, 4, 4), 0.25), ((8, 8, 8), 0.3)])
def test_block_mask_is_contiguous(grid, ratio):
    n = math.prod(grid)
    k = frac_floor(ratio, n)
    lo = min(4, k)
    b = 8
    block_nc, random_nc, big_enough = [], [], 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        blk = MaskGenerator('block', ratio, generator=g)(b, grid).view(b, *grid).numpy()
        rnd = MaskGenerator('random', ratio, generator=g)(b, grid).view(b, *grid).numpy()
        for i in range(b):
            sizes = components(blk[i])
            assert sizes.sum() == k
            block_nc.append(len(sizes))
            random_nc.append(len(components(rnd[i])))
            big_enough += sizes.min() >= lo
    assert np.mean(block_nc) * 3 < np.mean(random_nc)
    assert np.mean(block_nc) <= 3
    assert big_enough >= 0.75 * len(block_nc)


def test_block_mask_single_box_when_it_fits():
    # min_cells == k: every box has volume k, so a single box (a perfect cube here) does the job
    for seed in range(5):
        m = block_mask(4, (6, 6, 6), 8, generator=torch.Generator().manual_seed(seed), min_cells=8, aspect=1.0)
        for row in m.view(4, 6, 6, 6).numpy():
            assert components(row).tolist() == [8]
            idx = np.argwhere(row)
            assert (idx.max(0) - idx.min(0)).tolist() == [1, 1, 1]  # a 2x2x2 cube


def test_block_mask_rejects_bad_aspect():
    with pytest.raises(ValueError):
        block_mask(1, 4, 5, aspect=0.0)
    with pytest.raises(ValueError):
        block_mask(1, 4, 5, aspect=1.5)


# ---------------------------------------------------------------------------------------------------- reproducibility


def _make(policy, seed, b=4, grid=(4, 4, 4)):
    n = math.prod(grid)
    attn = distinct_attn(b, n, seed=123) if policy in ('attention', 'attention-no-hints', 'low') else None
    gen = MaskGenerator(policy, 0.5, 0.2, 0.4, generator=torch.Generator().manual_seed(seed))
    return gen(b, grid, attn)


@pytest.mark.parametrize('policy', ['random', 'block', 'attention'])
def test_same_seed_same_mask_different_seed_different_mask(policy):
    assert torch.equal(_make(policy, 3), _make(policy, 3))
    assert not torch.equal(_make(policy, 3), _make(policy, 4))


@pytest.mark.parametrize('policy', ['random', 'block', 'attention'])
def test_generator_leaves_global_rng_alone(policy):
    n = 64
    attn = distinct_attn(4, n, seed=1)  # built before the snapshot
    gen = MaskGenerator(policy, 0.5, 0.2, 0.4, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    gen(4, 4, attn if policy == 'attention' else None)
    gen(4, 4, attn if policy == 'attention' else None)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('policy', ['random', 'block', 'attention'])
def test_without_generator_uses_global_rng(policy):
    attn = distinct_attn(4, 64, seed=1)
    gen = MaskGenerator(policy, 0.5, 0.2, 0.4)
    torch.manual_seed(42)
    a = gen(4, 4, attn if policy == 'attention' else None)
    torch.manual_seed(42)
    b = gen(4, 4, attn if policy == 'attention' else None)
    assert torch.equal(a, b)
    c = gen(4, 4, attn if policy == 'attention' else None)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------- upsample / patch dropout


@pytest.mark.parametrize('grid,factor', [((2, 3, 4), 2), ((2, 2, 2), 1), ((2, 3, 2), (1, 2, 3)), ((3, 1, 2), (3, 1, 2))])
@pytest.mark.parametrize('flat', [True, False])
def test_upsample_mask_matches_kron(grid, factor, flat):
    b = 3
    m = torch.rand(b, *grid) < 0.5
    f = (factor,) * 3 if isinstance(factor, int) else factor
    out = upsample_mask(m.view(b, -1) if flat else m, grid, factor)
    ref = np.stack([np.kron(x.numpy().astype(np.int64), np.ones(f, dtype=np.int64)) for x in m]).astype(bool)
    assert out.dtype == torch.bool
    assert tuple(out.shape) == (b, grid[0] * f[0], grid[1] * f[1], grid[2] * f[2])
    assert np.array_equal(out.numpy(), ref)


def test_upsample_mask_by_index_loop():
    m = torch.rand(2, 2, 3, 2) < 0.5
    out = upsample_mask(m.view(2, -1), (2, 3, 2), (2, 1, 3))
    for bi in range(2):
        for z in range(4):
            for y in range(3):
                for x in range(6):
                    assert bool(out[bi, z, y, x]) == bool(m[bi, z // 2, y, x // 3])


@pytest.mark.parametrize('grid', [(2, 2, 2), (3, 5, 4), (4, 4, 4)])
@pytest.mark.parametrize('ratio', [0.0, 0.25, 0.5, 0.57, 0.99])
def test_patch_dropout_mask_count_and_shape(grid, ratio):
    b = 3
    m = patch_dropout_mask(b, grid, ratio, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool
    assert tuple(m.shape) == (b, *grid)
    assert m.view(b, -1).sum(1).tolist() == [frac_floor(ratio, math.prod(grid))] * b


@pytest.mark.parametrize('ratio', [1.0, 1.5, -0.1])
def test_patch_dropout_mask_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError):
        patch_dropout_mask(2, 4, ratio)


# ---------------------------------------------------------------------------------------------------- bad input


def test_unknown_policy_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'random'"):
        MaskGenerator('randm')
    with pytest.raises(ValueError, match='attention'):
        MaskGenerator('nonsense')  # lists the options


@pytest.mark.parametrize('policy', ['attention', 'attention-no-hints', 'low'])
def test_attention_policy_needs_attn(policy):
    with pytest.raises(ValueError, match=policy) as e:
        MaskGenerator(policy)(2, 4)
    assert 'None' in str(e.value)


@pytest.mark.parametrize('policy', ['attention', 'attention-no-hints', 'low'])
@pytest.mark.parametrize('shape', [(2, 63), (3, 64), (64,), (2, 4, 16)])
def test_attention_of_wrong_shape(policy, shape):
    with pytest.raises(ValueError) as e:
        MaskGenerator(policy)(2, 4, torch.rand(shape))
    assert '(2, 64)' in str(e.value)


@pytest.mark.parametrize('name', ['ratio', 'hint_ratio', 'hint_pool'])
@pytest.mark.parametrize('value', [-0.1, 1.01, float('nan')])
def test_ratios_out_of_range(name, value):
    with pytest.raises(ValueError, match=name):
        MaskGenerator('attention', **{name: value})


def test_hints_as_the_paper_words_them_and_attmasks_rule():
    """Default (`hint_pool=None`): int(0.1 * k) of the k selected cells are revealed, drawn from all of them; AttMask's
    rule (`hint_pool=0.1`) draws about as many from the top 10% of all cells only."""
    import torch

    from dagman_fast.masking import MaskGenerator
    from dagman_fast.model import METHODS, DAGMaNConfig
    attn = torch.rand(64, 512, generator=torch.Generator().manual_seed(0))
    order = attn.argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(512).expand(64, 512))  # rank of each cell, 0 = most attended
    for pool, top in ((None, 358), (0.1, 51)):
        gen = MaskGenerator('attention', hint_pool=pool, generator=torch.Generator().manual_seed(1))
        k, n_hint, drawn_from = gen.counts(512)
        assert (k, n_hint, drawn_from) == (358, 35, top)
        m = gen(64, (8, 8, 8), attn)
        revealed = (rank < k) & ~m
        assert revealed.sum(1).tolist() == [n_hint] * 64 and not (m & (rank >= k)).any()
        deepest = rank[revealed].max().item()
        assert deepest < top and (pool is not None or deepest > 51)  # the paper's reach beyond AttMask's pool
    assert DAGMaNConfig().hint_pool is None and METHODS['attmask']['hint_pool'] == 0.1
