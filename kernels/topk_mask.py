"""Fused attention-guided top-k masking: head average, top-k, hint sampling and the mask scatter in one kernel.

The reference is `dagman_fast.masking.attention_mask` (PyTorch). Both define the mask the same way, so that the
kernel gives *exactly* the reference's mask for the same random draws:

1. The cells are ranked by the head average of the teacher's [CLS] attention `(b, nh, n)`, that is by its sum
   over the heads (the same order), added in head order in float32 (`head_sum`): both paths see bit-identical
   scores. A division by `nh` would not be: CUDA PyTorch multiplies by `1/nh`, Triton's `/` is not correctly
   rounded, and cells an ulp apart at the `k` or pool boundary could swap.
2. Cells are ranked by score, highest first (lowest first for `largest=False`), ties by cell index: the order of a
   stable sort. The `k` first cells are masked.
3. The hints are `n_hint` of the first `pool` ranked cells: pool position `p` draws `hint_noise[:, p]`, and the
   positions with the largest draws (ties by position) are revealed again.

The kernel never sorts: the rank of a cell is the number of cells ahead of it, counted in blocks of `BLOCK_J` cells
(`O(n^2)` comparisons, which for the paper's 8^3 = 512 cells is far less work than one attention layer), and a hint's
rank among the pool draws is counted the same way. Ranks are independent per cell, so each program takes `BLOCK_I`
cells of one sample (`topk_mask_config`): its tiles fit in registers at any cell count. Ranks are distinct, so the
masked and revealed sets are exact. NaN scores have no defined order (in either path).

`attention_mask_triton` runs on CUDA tensors, or on CPU tensors when `TRITON_INTERPRET=1` was set before Triton was
imported (the correctness tests do that).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the PyTorch path runs everywhere
    triton = tl = None

__all__ = ['head_sum', 'triton_available', 'attention_mask_triton', 'topk_mask_config']


def head_sum(attn: torch.Tensor) -> torch.Tensor:
    """`(b, n)` float32 sum over the heads of `(b, nh, n)`, added in head order (the kernel's order: the same bits;
    it ranks cells as the head average does); `(b, n)` input is returned as float32."""
    if attn.ndim == 2:
        return attn.float()
    acc = attn[:, 0].float()
    for h in range(1, attn.shape[1]):
        acc = acc + attn[:, h].float()
    return acc


def triton_available(device: torch.device | str | None = None) -> bool:
    "Triton is installed and can run on `device` (CUDA, or any device under `TRITON_INTERPRET=1`)."
    if triton is None:
        return False
    if os.environ.get('TRITON_INTERPRET') == '1':
        return True
    return device is not None and torch.device(device).type == 'cuda'


if triton is not None:
    @triton.jit
    def _scores(attn_ptr, row, offs, n, nh, stride_b, stride_h, NEG: tl.constexpr):
        "Head-sum scores of cells `offs` of one row, in head order; negated for the least-attended policy."
        valid = offs < n
        s = tl.load(attn_ptr + row * stride_b + offs, mask=valid, other=0.0).to(tl.float32)
        for h in range(1, nh):
            s = s + tl.load(attn_ptr + row * stride_b + h * stride_h + offs, mask=valid, other=0.0).to(tl.float32)
        if NEG:
            s = -s
        return s

    @triton.jit
    def _topk_mask_kernel(attn_ptr, noise_ptr, out_ptr, n, nh, k, n_hint, pool,
                          stride_b, stride_h, stride_nb, stride_ob,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, NEG: tl.constexpr, HINTS: tl.constexpr):
        "Cells `BLOCK_I * program_id(1)` onwards of sample `program_id(0)`: ranked against all `n` cells of the row."
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        valid = offs < n
        s_i = _scores(attn_ptr, row, offs, n, nh, stride_b, stride_h, NEG)
        # rank_i: cells ahead of cell i (a higher score, or the same score at a lower index)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, n, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            s_j = _scores(attn_ptr, row, offs_j, n, nh, stride_b, stride_h, NEG)
            ahead = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (offs_j[None, :] < offs[:, None]))
            ahead = ahead & (offs_j[None, :] < n)
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        masked = valid & (rank < k)
        if HINTS:
            # cell i sits at pool position p = rank_i; its draw u_p; hint when fewer than n_hint draws beat it
            in_pool = valid & (rank < pool)
            u_i = tl.load(noise_ptr + row * stride_nb + rank, mask=in_pool, other=0.0)
            hrank = tl.zeros([BLOCK_I], dtype=tl.int32)
            for q0 in range(0, pool, BLOCK_J):
                offs_q = q0 + tl.arange(0, BLOCK_J)
                u_q = tl.load(noise_ptr + row * stride_nb + offs_q, mask=offs_q < pool, other=0.0)
                beats = (u_q[None, :] > u_i[:, None]) | ((u_q[None, :] == u_i[:, None]) & (offs_q[None, :] < rank[:, None]))
                beats = beats & (offs_q[None, :] < pool)
                hrank += tl.sum(beats.to(tl.int32), axis=1)
            masked = masked & ~(in_pool & (hrank < n_hint))
        tl.store(out_ptr + row * stride_ob + offs, masked.to(tl.int8), mask=valid)


def topk_mask_config(n: int, block_j: int = 32) -> dict:
    """Launch configuration for `n` cells: programs of `block_i` cells (each ranked against the whole row in steps
    of `block_j`), so that a program's tiles stay in registers for any cell count (SA after stage 1 at a 160^3
    crop has 64,000 cells; a whole row per program would spill). `bench/kernel_resources.py` checks it."""
    return dict(block_i=min(128, max(16, triton.next_power_of_2(n))), block_j=block_j, num_warps=4)


def attention_mask_triton(attn: torch.Tensor, k: int, n_hint: int = 0, pool: int = 0,
                          hint_noise: torch.Tensor | None = None, largest: bool = True,
                          block_j: int = 32) -> torch.Tensor:
    """`attention_mask` in one Triton kernel: bool `(b, n)` from the attention `(b, nh, n)` (or `(b, n)`).

    Arguments as `dagman_fast.masking.attention_mask`; `block_j` is the number of cells compared per step.
    """
    if triton is None:
        raise RuntimeError('attention_mask_triton needs Triton (pip install triton)')
    if not triton_available(attn.device):
        raise RuntimeError('the Triton top-k mask runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, for '
                           "tests); on the CPU use MaskGenerator(impl='torch') or 'auto'")
    if attn.ndim == 2:
        attn = attn[:, None]
    if attn.ndim != 3:
        raise ValueError(f'attention must be (b, n) or (b, nh, n); got {tuple(attn.shape)}')
    b, nh, n = attn.shape
    if not 0 <= k <= n:
        raise ValueError(f'cannot mask k={k} of {n} cells')
    if n_hint and not n_hint <= pool <= k:
        raise ValueError(f'hints need n_hint <= pool <= k; got n_hint={n_hint}, pool={pool}, k={k}')
    if n_hint and (hint_noise is None or tuple(hint_noise.shape) != (b, pool)):
        raise ValueError(f'hint_noise must be (b, pool) = {(b, pool)} uniform draws')
    if block_j < 16 or block_j & (block_j - 1):
        raise ValueError(f'block_j must be a power of two of at least 16; got {block_j}')
    out = torch.empty(b, n, dtype=torch.int8, device=attn.device)
    if b == 0 or n == 0:
        return out.bool()
    attn = attn if attn.stride(-1) == 1 else attn.contiguous()
    noise = (hint_noise.float().contiguous() if n_hint else torch.zeros(b, 1, device=attn.device))
    cfg = topk_mask_config(n, block_j)
    _topk_mask_kernel[(b, triton.cdiv(n, cfg['block_i']))](
        attn, noise, out, n, nh, k, n_hint, pool, attn.stride(0), attn.stride(1), noise.stride(0), out.stride(0),
        BLOCK_I=cfg['block_i'], BLOCK_J=block_j, NEG=not largest, HINTS=bool(n_hint), num_warps=cfg['num_warps'])
    return out.bool()
