"""Window attention with a relative position bias and an optional shift mask: one entry point, several paths.

All paths compute, per window and head, `softmax(q @ k^T * scale + bias + mask) @ v`
(Liu et al., Swin Transformer, eq. 4; the 3-D form of MONAI's `WindowAttention`).

Shapes (einops names): `q, k, v: ((b nw), nh, wn, hd)` with the windows of one image consecutive, `bias: (nh, wn, wn)`
(gathered from the relative position table), `mask: (nw, wn, wn)` additive (0 or a large negative number) or None.

`attn_impl`:
- 'reference': eager PyTorch, the test oracle and benchmark baseline; stores the attention matrix for backward.
- 'sdpa': `F.scaled_dot_product_attention`. On CUDA its memory-efficient kernel handles the additive bias and its
  gradient itself. On the CPU, PyTorch's flash kernel accepts the bias but cannot give its gradient (with a bias
  that needs one, SDPA falls back to the math path that stores the attention matrix), so `_CPUWindowAttention`
  runs the flash kernel forward (storing no attention matrix) and a recomputing backward, in chunks of windows.
- 'triton': the fused Triton kernel of `window_attention_triton` (forward and backward). Its home is the grid
  layout (`window_attention_grid`, which the encoder's blocks call: roll, partition and shift mask in the kernel).
  Here, on window-ordered q, k, v, it runs for unshifted windows (`mask=None`); a precomputed shift mask is the
  eager paths' job.
- 'auto': 'sdpa', except on the CPU under autograd where an attention matrix of at most `AUTO_RECOMPUTE_BYTES`
  takes the eager path (measured faster there; see `resolve_attn_impl`). The encoder's blocks take 'triton' for
  'auto' on CUDA when Triton is installed and `fused_supported` accepts the window, head dim and dtype for the GPU
  (no register spills, shared memory within its limit: see `fused_config_supported`).

`window_attention(q, k, v, ...)` is the entry point; `window_attention_qkv(qkv, ...)` is the same for the packed
projection the encoder holds (no re-layout of q, k, v or of their gradients).

This module imports no fastai.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dagman_fast.core import check_option

__all__ = ['ATTN_IMPLS', 'window_attention', 'window_attention_qkv', 'window_attention_reference',
           'window_attention_sdpa', 'resolve_attn_impl']

ATTN_IMPLS = ('reference', 'sdpa', 'triton', 'auto')
AUTO_RECOMPUTE_BYTES = 32 * 2 ** 20  # see resolve_attn_impl


def _check(q, k, v, bias, mask):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f'q, k, v must share one shape ((b nw), nh, wn, hd); got {tuple(q.shape)}, '
                         f'{tuple(k.shape)}, {tuple(v.shape)}')
    _, nh, wn, _ = q.shape
    if bias.shape != (nh, wn, wn):
        raise ValueError(f'bias must have shape (nh, wn, wn) = {(nh, wn, wn)}; got {tuple(bias.shape)}')
    if mask is not None:
        if mask.ndim != 3 or mask.shape[1:] != (wn, wn) or q.shape[0] % mask.shape[0]:
            raise ValueError(f'mask must have shape (nw, {wn}, {wn}) with nw dividing the {q.shape[0]} windows; '
                             f'got {tuple(mask.shape)}')


def window_attention_reference(q, k, v, bias, mask=None, scale=None):
    """Eager window attention: the oracle for every other path.

    Args:
        q, k, v: `((b nw), nh, wn, hd)`.
        bias: `(nh, wn, wn)` relative position bias.
        mask: `(nw, wn, wn)` additive shift mask, or None.
        scale: logit scale, default `hd ** -0.5`.

    Returns:
        `((b nw), nh, wn, hd)`.
    """
    _check(q, k, v, bias, mask)
    bnw, nh, wn, hd = q.shape
    scale = hd ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(bnw // nw, nw, nh, wn, wn) + mask.unsqueeze(1)).view(bnw, nh, wn, wn)
    return attn.softmax(-1).to(v.dtype) @ v


def _combined_mask(bias, mask):
    "(nw, nh, wn, wn) bias plus mask, or (1, nh, wn, wn) without a mask."
    return bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)


def _cpu_flash(q, k, v, m, scale, nw: int):
    """PyTorch's CPU flash kernel on `((b nw), nh, wn, hd)` with the combined mask `m: (nw|1, nh, wn, wn)`.

    The kernel broadcasts a mask over the batch only by a size-1 dim, so with a shift mask it runs one image at a
    time: its nw windows meet the (nw, nh, wn, wn) mask exactly, with no expanded copy. (`F.scaled_dot_product_attention`
    on a 5-D view broadcasts it too, but takes the math path: the whole attention matrix, and a "safe" softmax that
    scans it for fully masked rows, which cost a third of the teacher's forward on the CPU.)
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if m.shape[0] == 1:
        return flash(q, k, v, attn_mask=m, scale=scale)[0]
    return torch.cat([flash(q[i:i + nw], k[i:i + nw], v[i:i + nw], attn_mask=m, scale=scale)[0]
                      for i in range(0, q.shape[0], nw)])


class _CPUWindowAttention(torch.autograd.Function):
    """Flash forward (stores the packed qkv and the output, never the attention matrix) and a backward that
    recomputes the attention of `chunk` window-heads at a time (128 was fastest on a 2-core AVX Xeon for stage 1 of
    `swin-smit`: larger chunks fall out of cache, smaller ones pay more per-call overhead).

    Hand-written because PyTorch's CPU SDPA gives no gradient for an additive bias without storing the full
    attention matrix. Backward (FlashAttention-2, Dao 2023, alg. 2, in exact arithmetic): `P = softmax(S)`
    (recomputed with `softmax`, whose vectorised exp is several times faster on the CPU than `exp(S - lse)`),
    `dV = P^T dO`, `dS = P * (dO V^T - rowsum(dO * O))`, `dQ = dS K s`, `dK = dS^T Q s`,
    `dbias = sum over windows and batch of dS`.

    It takes the packed projection `qkv: ((b nw), wn, 3, nh, hd)` and returns its gradient in that layout, so
    neither autograd's stack of three gradients nor a copy back to the projection's layout is needed; every
    re-layout happens on one chunk at a time, in cache.
    """

    @staticmethod
    def forward(ctx, qkv, bias, mask, scale, chunk):
        bnw, wn, _, nh, hd = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # ((b nw), nh, wn, hd) strided views
        nw = 1 if mask is None else mask.shape[0]
        out = _cpu_flash(q, k, v, _combined_mask(bias, mask).to(qkv.dtype), scale, nw)
        ctx.save_for_backward(qkv, bias, mask, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, bias, mask, out = ctx.saved_tensors
        bnw, wn, _, nh, hd = qkv.shape
        nw = 1 if mask is None else mask.shape[0]
        f32 = torch.float32  # recompute in fp32 whatever the input dtype
        m = _combined_mask(bias.to(f32), mask)  # (nw|1, nh, wn, wn)
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        dbias = torch.zeros((nh, wn, wn), dtype=f32, device=qkv.device)

        def heads_first(t):  # (c, wn, nh, hd) -> contiguous ((c nh), wn, hd)
            return t.transpose(1, 2).to(f32).reshape(-1, wn, hd)

        # With a shift mask, chunks never straddle two images, so each meets a plain slice of the mask.
        step = max(1, ctx.chunk // nh)
        i = 0
        while i < bnw:
            j = min(i + step, bnw if mask is None else (i // nw + 1) * nw)
            c = j - i
            mc = m if mask is None else m[i % nw:i % nw + c]
            blk = qkv[i:j]
            qs, kc, vc = heads_first(blk[:, :, 0]) * ctx.scale, heads_first(blk[:, :, 1]), heads_first(blk[:, :, 2])
            doc = dout[i:j].to(f32).reshape(-1, wn, hd)
            delta = (doc * out[i:j].to(f32).reshape(-1, wn, hd)).sum(-1, keepdim=True)  # rowsum(dO * O)
            p = torch.softmax(torch.bmm(qs, kc.transpose(1, 2)).view(c, nh, wn, wn).add_(mc), -1).view(-1, wn, wn)
            dv = torch.bmm(p.transpose(1, 2), doc)
            ds = p.mul_(torch.bmm(doc, vc.transpose(1, 2)).sub_(delta))  # ((c nh), wn, wn)
            dbias += ds.view(c, nh, wn, wn).sum(0)
            dq = torch.bmm(ds, kc).mul_(ctx.scale)
            dk = torch.bmm(ds.transpose(1, 2), qs)
            for idx, g in enumerate((dq, dk, dv)):
                dqkv[i:j, :, idx] = g.view(c, nh, wn, hd).transpose(1, 2)
            i = j
        return dqkv, dbias.to(bias.dtype), None, None, None


_HAS_CPU_FLASH = hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu')


def _cpu_grad_path(*tensors) -> bool:
    "True where `_CPUWindowAttention` runs: on the CPU, with autograd recording (PyTorch >= 2.3 has its flash kernel)."
    return (tensors[0].device.type == 'cpu' and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'))


def window_attention_sdpa(q, k, v, bias, mask=None, scale=None, chunk=128):
    "`F.scaled_dot_product_attention` path, same result as `window_attention_reference`."
    _check(q, k, v, bias, mask)
    bnw, nh, wn, hd = q.shape
    scale = hd ** -0.5 if scale is None else scale
    if _cpu_grad_path(q, k, v, bias):
        # The CPU backward works on the packed layout: separate q, k, v (this entry point) are packed with one
        # copy, ((b nw), nh, 3, wn, hd) -> ((b nw), wn, 3, nh, hd); the encoder calls `window_attention_qkv`.
        return _CPUWindowAttention.apply(torch.stack([q, k, v], 2).transpose(1, 3), bias, mask, scale, chunk)
    m = _combined_mask(bias, mask).to(q.dtype)
    if mask is not None:
        nw = mask.shape[0]
        if q.device.type == 'cuda':
            # The fused CUDA kernels take 4-D inputs, so the per-window mask is repeated over the batch (one copy
            # of the attention-matrix size; the Triton kernel will build the mask from window coordinates instead).
            m = m.unsqueeze(0).expand(bnw // nw, -1, -1, -1, -1).reshape(bnw, nh, wn, wn)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
        if q.device.type == 'cpu' and _HAS_CPU_FLASH and not grad:
            return _cpu_flash(q, k, v, m, scale, nw)  # no autograd here: the flash kernel has no backward
        # A 5-D view lets the (nw, nh, wn, wn) mask broadcast over the batch without a copy.
        shape = (bnw // nw, nw, nh, wn, hd)
        out = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=m,
                                             scale=scale)
        return out.view(bnw, nh, wn, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)


def _attn_matrix_bytes(bnw: int, nh: int, wn: int, dtype: torch.dtype) -> int:
    return bnw * nh * wn * wn * torch.finfo(dtype).bits // 8


def resolve_attn_impl(impl: str, attn_bytes: int | None = None, cpu_grad: bool = False) -> str:
    """Check `impl` against `ATTN_IMPLS` and turn 'auto' into the path that runs.

    'auto' is 'sdpa', except on the CPU under autograd (`cpu_grad`) with an attention matrix of at most
    `AUTO_RECOMPUTE_BYTES` (`attn_bytes`): there the eager path, which keeps the small matrix instead of
    recomputing it, was faster for every stage of `swin-smit` but the first (where recomputing wins on time and
    memory). 'triton' needs Triton installed.
    """
    check_option(impl, ATTN_IMPLS, 'attn_impl')
    if impl == 'triton':
        from dagman_fast.kernels.window_attention_triton import triton
        if triton is None:
            raise ImportError("attn_impl='triton' needs Triton (pip install triton, on Linux with an NVIDIA GPU); "
                              "use 'sdpa' or 'auto'")
    if impl != 'auto':
        return impl
    small = attn_bytes is not None and attn_bytes <= AUTO_RECOMPUTE_BYTES
    return 'reference' if cpu_grad and small else 'sdpa'


def window_attention(q, k, v, bias, mask=None, scale=None, impl: str = 'auto'):
    """Window attention through the path `impl` names (see the module docstring).

    Args:
        q, k, v: `((b nw), nh, wn, hd)`, the `nw` windows of each image consecutive.
        bias: `(nh, wn, wn)` relative position bias (gets a gradient).
        mask: `(nw, wn, wn)` additive shift mask, or None for unshifted windows.
        scale: logit scale, default `hd ** -0.5`.
        impl: one of `ATTN_IMPLS`.

    Returns:
        `((b nw), nh, wn, hd)`.
    """
    _check(q, k, v, bias, mask)
    bnw, nh, wn, _ = q.shape
    impl = resolve_attn_impl(impl, _attn_matrix_bytes(bnw, nh, wn, q.dtype), _cpu_grad_path(q, k, v, bias))
    if impl == 'triton':
        return window_attention_qkv(torch.stack([q, k, v], 2).transpose(1, 3), bias, mask, scale, 'triton')
    if impl == 'reference':
        return window_attention_reference(q, k, v, bias, mask, scale)
    return window_attention_sdpa(q, k, v, bias, mask, scale)


def window_attention_qkv(qkv, bias, mask=None, scale=None, impl: str = 'auto', chunk: int = 128):
    """`window_attention` on the packed projection `qkv: ((b nw), wn, 3, nh, hd)` (a free view of a
    `Linear(c, 3c)` output), the layout the encoder has. Same result and dispatch as `window_attention` on its
    three parts; on the CPU under autograd it avoids re-laying out q, k, v and their gradients.

    Returns:
        `((b nw), nh, wn, hd)`.
    """
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f'qkv must have shape ((b nw), wn, 3, nh, hd); got {tuple(qkv.shape)}')
    bnw, wn, _, nh, hd = qkv.shape
    cpu_grad = _cpu_grad_path(qkv, bias)
    impl = resolve_attn_impl(impl, _attn_matrix_bytes(bnw, nh, wn, qkv.dtype), cpu_grad)
    if impl == 'triton':
        if mask is not None:
            raise ValueError("impl='triton' builds the shift mask from window coordinates: call "
                             "window_attention_grid on the grid layout (the encoder does) instead of passing a mask")
        from dagman_fast.kernels.window_attention_triton import window_attention_grid
        # Each window is a 1 x 1 x wn grid of its own: the packed layout is already the kernel's grid layout.
        out = window_attention_grid(qkv.reshape(bnw, 1, 1, wn, 3 * nh * hd), bias, (1, 1, wn), (0, 0, 0), nh, scale)
        return out.view(bnw, wn, nh, hd).transpose(1, 2)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if impl == 'reference':
        return window_attention_reference(q, k, v, bias, mask, scale)
    if cpu_grad:
        _check(q, k, v, bias, mask)
        return _CPUWindowAttention.apply(qkv, bias, mask, hd ** -0.5 if scale is None else scale, chunk)
    return window_attention_sdpa(q, k, v, bias, mask, scale, chunk)
