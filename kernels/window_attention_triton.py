"""Fused 3-D (shifted) window attention in Triton, forward and backward, on the grid layout of the projection.

`window_attention_grid(qkv, bias, window, shift, num_heads)` takes the packed projection of a Swin block *in grid
order*, `qkv: (b, D, H, W, 3 * nh * hd)` (the output of `Linear(c, 3c)` on the normed map, no roll, no window
partition), and returns the attention output in grid order, `(b, D, H, W, nh * hd)`, ready for the output
projection. Per window and head it computes `softmax(q k^T * scale + bias + shift_mask) v` (Liu et al., Swin
Transformer, eq. 4, in 3-D), exactly what the eager reference computes on the rolled, partitioned tokens:

- The cyclic roll and the window partition are address arithmetic: token `t` of window `w` (window order after
  the roll by `-shift`, as `window_order`) reads grid position `(w * window + t + shift) mod grid` per axis, and
  its output goes back to that position. Nothing is copied or permuted.
- The shift mask is computed in the kernel from window coordinates: a token's region along a shifted axis is
  0, 1 or 2 as in `shift_attention_mask` (rolled coordinate `< G - window`, `< G - shift`, else); tokens of
  different regions do not attend to each other (`-inf`, as the reference).
- Each program takes `WPP` windows of one head (the heads of a window are neighbouring programs) (`tl.dot` on `(wn, hd)` tiles, the whole `wn x wn` score tile in
  registers, so windows of up to 128 tokens: 4^3 = 64 in this project's presets). Head dims are padded to a
  power of two (at least 16) inside the kernel: 12, 24, 32, 48, 96 all work.
- The backward recomputes the attention (FlashAttention-2's backward with the whole row in one tile) and writes
  `dq, dk, dv` straight into the gradient of `qkv` in the same grid layout. The gradient of the bias is summed
  over a program's windows in registers and written once per program; the partial sums are added in a fixed
  order by PyTorch afterwards: deterministic, no atomics.
- fp32 (IEEE dot products), fp16 and, on the GPU, bf16 inputs; softmax and accumulations in fp32.

The reference it is tested against is `window_attention_reference` on `window_order` / `shift_attention_mask`
(`dagman_fast.windows`). Runs on CUDA tensors, or on the CPU when `TRITON_INTERPRET=1` is set before Triton is
imported (tests only: the interpreter is slow and cannot time anything).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the PyTorch paths run everywhere
    triton = tl = None

__all__ = ['MAX_WINDOW_TOKENS', 'MAX_HEAD_DIM', 'PROGRAMS_PER_HEAD', 'fused_supported', 'fused_config_supported',
           'kernel_dtype', 'window_attention_config', 'window_attention_grid']

MAX_WINDOW_TOKENS = 128  # the whole score tile of a window lives in registers
MAX_HEAD_DIM = 128       # q, k, v tiles of (128, 128) at most
PROGRAMS_PER_HEAD = 256  # default split of the windows: 256 x heads programs (about 8 per SM on an H100) and as
                         # many (wn x wn) fp32 partial sums of the bias gradient (4 MB per head at wn = 64)


if triton is not None:
    @triton.jit
    def _window_tokens(win, D, H, W, nwd, nwh, nww, sd, sh, sw, t,
                       WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr):
        "Grid token index (flattened over b, D, H, W) of token `t` of window `win`, after the roll by -shift."
        per_img = nwd * nwh * nww
        b = win // per_img
        r = win % per_img
        wz = r // (nwh * nww)
        wy = (r // nww) % nwh
        wx = r % nww
        rz = wz * WD + t // (WH * WW)
        ry = wy * WH + (t // WW) % WH
        rx = wx * WW + t % WW
        gz = (rz + sd) % D
        gy = (ry + sh) % H
        gx = (rx + sw) % W
        tok = ((b.to(tl.int64) * D + gz) * H + gy) * W + gx
        return tok, rz, ry, rx

    @triton.jit
    def _region(r, G, WIN, S):
        "Region label (0, 1, 2) of rolled coordinate `r` along an axis shifted by S (0 when unshifted)."
        lab = (r >= G - WIN).to(tl.int32) + (r >= G - S).to(tl.int32)
        return tl.where(S > 0, lab, 0)

    @triton.jit
    def _scores(q, k, bias_tile, rz, ry, rx, D, H, W, sd, sh, sw, valid, scale,
                WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, PREC: tl.constexpr):
        "Masked logits of one window-head, fp32 `(BLOCK_WN, BLOCK_WN)`."
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bias_tile
        keep = valid[None, :]
        if SHIFTED:
            lab = (_region(rz, D, WD, sd) * 9 + _region(ry, H, WH, sh) * 3 + _region(rx, W, WW, sw))
            # padding rows keep their (finite) scores: they are never stored, and must not make NaN
            keep = keep & ((lab[:, None] == lab[None, :]) | ~valid[:, None])
        return tl.where(keep, s, float('-inf'))

    @triton.jit
    def _window(qkv_ptr, bias_tile, win, n_windows, D, H, W, nwd, nwh, nww, sd, sh, sw, scale, h, t, e, valid, ve,
                C: tl.constexpr, HD: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                SHIFTED: tl.constexpr, PREC: tl.constexpr):
        "One window-head: its grid tokens, load mask, q, k, v and the attention probabilities `p` (fp32)."
        ok = (tl.zeros_like(t) + win) < n_windows  # a window past the end (the last program's spare slots)
        tok, rz, ry, rx = _window_tokens(win, D, H, W, nwd, nwh, nww, sd, sh, sw, t, WD, WH, WW)
        m2 = (valid & ok)[:, None] & ve[None, :]
        base = tok[:, None] * (3 * C) + h * HD + e[None, :]
        q = tl.load(qkv_ptr + base, mask=m2, other=0.0)
        k = tl.load(qkv_ptr + base + C, mask=m2, other=0.0)
        v = tl.load(qkv_ptr + base + 2 * C, mask=m2, other=0.0)
        s = _scores(q, k, bias_tile, rz, ry, rx, D, H, W, sd, sh, sw, valid, scale, WD, WH, WW, SHIFTED, PREC)
        p = tl.exp(s - tl.max(s, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        return tok, m2, base, q, k, v, p

    @triton.jit
    def _kernel(qkv_ptr, out_ptr, bias_ptr, dout_ptr, dqkv_ptr, dbias_ptr, n_windows, D, H, W, nwd, nwh, nww,
                sd, sh, sw, scale, NH,
                C: tl.constexpr, HD: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                BLOCK_WN: tl.constexpr, BLOCK_HD: tl.constexpr, WPP: tl.constexpr, SHIFTED: tl.constexpr,
                PREC: tl.constexpr, BACKWARD: tl.constexpr):
        "`WPP` windows of head `program_id(1)`: the forward, or (BACKWARD) the recomputing backward."
        WN: tl.constexpr = WD * WH * WW
        h = tl.program_id(0)  # the fast axis: the heads of a window run side by side and share its cache lines
        g = tl.program_id(1)
        t = tl.arange(0, BLOCK_WN)
        e = tl.arange(0, BLOCK_HD)
        valid = t < WN
        ve = e < HD
        vv = valid[:, None] & valid[None, :]
        bias_tile = tl.load(bias_ptr + h * WN * WN + t[:, None] * WN + t[None, :], mask=vv, other=0.0).to(tl.float32)
        dbias = tl.zeros([BLOCK_WN, BLOCK_WN], dtype=tl.float32)
        for i in range(WPP):
            tok, m2, base, q, k, v, p = _window(qkv_ptr, bias_tile, g * WPP + i, n_windows, D, H, W, nwd, nwh, nww,
                                                sd, sh, sw, scale, h, t, e, valid, ve, C, HD, WD, WH, WW, SHIFTED,
                                                PREC)
            obase = tok[:, None] * C + h * HD + e[None, :]
            if BACKWARD:
                o = tl.load(out_ptr + obase, mask=m2, other=0.0).to(tl.float32)
                do = tl.load(dout_ptr + obase, mask=m2, other=0.0)
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                delta = tl.sum(do.to(tl.float32) * o, 1)
                ds = p * (dp - delta[:, None])  # zero in spare slots and padding: do and o load as zeros there
                dq = tl.dot(ds.to(q.dtype), k, input_precision=PREC) * scale
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
                dbias += ds
                ty = dqkv_ptr.dtype.element_ty
                tl.store(dqkv_ptr + base, dq.to(ty), mask=m2)
                tl.store(dqkv_ptr + base + C, dk.to(ty), mask=m2)
                tl.store(dqkv_ptr + base + 2 * C, dv.to(ty), mask=m2)
            else:
                o = tl.dot(p.to(v.dtype), v, input_precision=PREC)
                tl.store(out_ptr + obase, o.to(out_ptr.dtype.element_ty), mask=m2)
        if BACKWARD:  # one partial sum per program; PyTorch adds them in a fixed order
            tl.store(dbias_ptr + (g.to(tl.int64) * NH + h) * WN * WN + t[:, None] * WN + t[None, :], dbias, mask=vv)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _dtype_name(dtype) -> str:
    return {torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.float32: 'fp32'}.get(dtype, dtype)


def window_attention_config(wn: int, head_dim: int, dtype, backward: bool = False) -> dict:
    """Tiles and warps of one direction of the kernel for windows of `wn` tokens and head dim `head_dim`:
    `block_wn`, `block_hd` (powers of two of at least 16) and `num_warps`.

    Eight warps where four spill registers on 64- and 128-token windows (measured with `bench/kernel_resources.py`
    for sm_80 and sm_90, Triton 3.9): fp32 tiles (the forward spills from head dim 24 with four), the backward at
    64-wide head tiles (sm_90) and 128-token windows."""
    block_wn, block_hd = max(16, _pow2(wn)), max(16, _pow2(head_dim))
    # (small windows keep four: with eight, ptxas gives their tiny tiles a few bytes of stack)
    wide = block_wn >= 64 and (_dtype_name(dtype) == 'fp32' or block_wn >= 128 or (backward and block_hd >= 64))
    # fp32 on 27-token (padded to 32) windows: four warps leave a 16-byte stack on sm_90, two none
    narrow = _dtype_name(dtype) == 'fp32' and block_wn == 32
    return dict(block_wn=block_wn, block_hd=block_hd, num_warps=8 if wide else 2 if narrow else 4)


def fused_config_supported(wn: int, head_dim: int, dtype, capability: int) -> bool:
    """Whether 'auto' may take the kernel for windows of `wn` tokens, head dim `head_dim` and `dtype` ('fp16',
    'bf16', 'fp32' or a torch dtype) on a GPU of compute capability `capability` (80 for sm_80, 90 for sm_90): only
    where both directions compile without register spills and within the shared memory of the GPU, as
    `bench/kernel_resources.py` measures (its table is in BENCHMARKS.md). Elsewhere 'auto' takes the PyTorch path.

    - Windows of at most 64 tokens (every preset's 4^3): 128-token windows spill in the backward.
    - fp16 / bf16: head dims up to 32 everywhere (swin-smit and swin-tiny have 12 and 24); 48 and 64 on Hopper
      (sm_90) only, where the backward fits with eight warps and 112 KB of shared memory; on an A100 it spills.
    - fp32: head dims up to 16 (from 24 the backward spills even with eight warps).
    """
    dtype = _dtype_name(dtype)
    if capability < 80 or dtype not in ('fp16', 'bf16', 'fp32') or wn > 64 or head_dim > MAX_HEAD_DIM:
        return False
    if dtype == 'fp32':
        return head_dim <= 16
    return head_dim <= 32 or (head_dim <= 64 and capability == 90)


def _geometry(qkv, bias, window, shift, num_heads):
    if qkv.ndim != 5:
        raise ValueError(f'qkv must be (b, D, H, W, 3 * nh * hd) in grid order; got {tuple(qkv.shape)}')
    b, D, H, W, c3 = qkv.shape
    if c3 % (3 * num_heads):
        raise ValueError(f'the last dim of qkv ({c3}) must be 3 * num_heads ({num_heads}) * head_dim')
    window, shift = tuple(int(w) for w in window), tuple(int(s) for s in shift)
    if len(window) != 3 or len(shift) != 3:
        raise ValueError(f'window and shift need 3 values each; got {window}, {shift}')
    for g, w, s, name in zip((D, H, W), window, shift, 'DHW'):
        if w < 1 or g % w:
            raise ValueError(f'grid axis {name} ({g}) must be a multiple of the window ({w}): pad the map first')
        if not 0 <= s < w:
            raise ValueError(f'shift {shift} must be in [0, window) per axis; window {window}')
    wn = window[0] * window[1] * window[2]
    if wn > MAX_WINDOW_TOKENS:
        raise ValueError(f'windows of {wn} tokens exceed the kernel limit of {MAX_WINDOW_TOKENS}; use the sdpa path')
    if bias.shape != (num_heads, wn, wn):
        raise ValueError(f'bias must be (nh, wn, wn) = {(num_heads, wn, wn)}; got {tuple(bias.shape)}')
    hd = c3 // 3 // num_heads
    if hd > MAX_HEAD_DIM:
        raise ValueError(f'head dim {hd} exceeds the kernel limit of {MAX_HEAD_DIM}; use the sdpa path')
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f'the kernel takes float16, bfloat16 or float32; got {qkv.dtype}')
    return b, (D, H, W), window, shift, c3 // 3, hd, wn


def _launch_args(qkv, bias, window, shift, num_heads, scale, wpp):
    b, grid, window, shift, c, hd, wn = _geometry(qkv, bias, window, shift, num_heads)
    nwin = tuple(g // w for g, w in zip(grid, window))
    n_windows = b * nwin[0] * nwin[1] * nwin[2]
    if wpp is None:  # at most PROGRAMS_PER_HEAD programs per head: enough to fill a GPU, few bias partial sums
        wpp = max(1, triton.cdiv(n_windows, PROGRAMS_PER_HEAD))
    n_prog = triton.cdiv(n_windows, wpp)
    prec = 'ieee' if qkv.dtype == torch.float32 else 'tf32'  # fp32: exact products; 16-bit: ignored
    common = (n_windows, *grid, *nwin, *shift, scale if scale is not None else hd ** -0.5)
    cfg = window_attention_config(wn, hd, qkv.dtype)
    meta = dict(C=c, HD=hd, WD=window[0], WH=window[1], WW=window[2], BLOCK_WN=cfg['block_wn'],
                BLOCK_HD=cfg['block_hd'], WPP=wpp, SHIFTED=any(shift), PREC=prec)
    return common, meta, (num_heads, n_prog), c


# The kernel as two PyTorch custom operators with an autograd formula: `torch.compile` keeps each as one opaque node
# of its graph (the compiled blocks of `compile_blocks` call it without a graph break, and the compiler never traces
# into the Triton launch); eager calls go through the same operators.
@torch.library.custom_op('dagman_fast::window_attention_grid', mutates_args=())
def _window_attention_grid_op(qkv: torch.Tensor, bias: torch.Tensor, window: list[int], shift: list[int],
                              num_heads: int, scale: float | None, wpp: int | None) -> torch.Tensor:
    qkv = qkv.contiguous()
    common, meta, grid, c = _launch_args(qkv, bias, window, shift, num_heads, scale, wpp)
    out = torch.empty(*qkv.shape[:4], c, dtype=qkv.dtype, device=qkv.device)
    warps = window_attention_config(bias.shape[-1], meta['HD'], qkv.dtype)['num_warps']
    _kernel[grid](qkv, out, bias.contiguous(), out, out, out, *common, num_heads, **meta, BACKWARD=False,
                  num_warps=warps)
    return out


@_window_attention_grid_op.register_fake
def _(qkv, bias, window, shift, num_heads, scale, wpp):
    return qkv.new_empty(*qkv.shape[:4], qkv.shape[-1] // 3)


@torch.library.custom_op('dagman_fast::window_attention_grid_backward', mutates_args=())
def _window_attention_grid_backward_op(qkv: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                                       window: list[int], shift: list[int], num_heads: int, scale: float | None,
                                       wpp: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    qkv, bias = qkv.contiguous(), bias.contiguous()
    common, meta, grid, c = _launch_args(qkv, bias, window, shift, num_heads, scale, wpp)
    dqkv = torch.empty_like(qkv)
    wn = bias.shape[-1]
    partial = torch.empty(grid[1], num_heads, wn, wn, dtype=torch.float32, device=qkv.device)
    warps = window_attention_config(wn, meta['HD'], qkv.dtype, backward=True)['num_warps']
    _kernel[grid](qkv, out.contiguous(), bias, dout.contiguous(), dqkv, partial, *common, num_heads, **meta,
                  BACKWARD=True, num_warps=warps)
    return dqkv, partial.sum(0).to(bias.dtype)


@_window_attention_grid_backward_op.register_fake
def _(qkv, bias, out, dout, window, shift, num_heads, scale, wpp):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    qkv, bias, window, shift, num_heads, scale, wpp = inputs
    ctx.save_for_backward(qkv, bias, output)
    ctx.args = (window, shift, num_heads, scale, wpp)


def _backward(ctx, dout):
    qkv, bias, out = ctx.saved_tensors
    dqkv, dbias = _window_attention_grid_backward_op(qkv, bias, out, dout, *ctx.args)
    return dqkv, dbias, None, None, None, None, None


_window_attention_grid_op.register_autograd(_backward, setup_context=_setup_context)


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    "The dtype the kernel gets for a projection of `x`: CUDA autocast's where it is on (bf16 under fastai's AMP)."
    if x.is_cuda and x.is_floating_point() and torch.is_autocast_enabled('cuda'):
        return torch.get_autocast_dtype('cuda')
    return x.dtype


def fused_supported(x: torch.Tensor, wn: int, head_dim: int) -> bool:
    """Whether 'auto' may take the fused kernel for a block on `x` (the input of its qkv projection): Triton
    installed, a CUDA tensor, and a window size, head dim and dtype (`kernel_dtype`: the autocast dtype under
    autocast) that `fused_config_supported` accepts for the GPU's compute capability (no register spills, shared
    memory within the GPU's limit)."""
    if triton is None or not x.is_cuda:
        return False
    major, minor = torch.cuda.get_device_capability(x.device)
    return fused_config_supported(wn, head_dim, kernel_dtype(x), 10 * major + minor)


def window_attention_grid(qkv: torch.Tensor, bias: torch.Tensor, window, shift, num_heads: int,
                          scale: float | None = None, windows_per_program: int | None = None) -> torch.Tensor:
    """Fused (shifted) window attention on the grid-ordered projection (see the module docstring).

    Args:
        qkv: `(b, D, H, W, 3 * nh * hd)`, the `Linear(c, 3c)` output in grid order; D, H, W multiples of `window`.
        bias: `(nh, wn, wn)` relative position bias (gets a gradient), `wn = prod(window) <= 128`.
        window, shift: 3 ints each, `0 <= shift < window` (the block's effective window and shift).
        scale: logit scale, default `hd ** -0.5`.
        windows_per_program: windows one program takes (and sums the bias gradient over); default: enough for
            at most `PROGRAMS_PER_HEAD` programs per head.

    Returns:
        `(b, D, H, W, nh * hd)` in grid order.
    """
    if triton is None:
        raise RuntimeError("window_attention_grid needs Triton (pip install triton); use attn_impl='sdpa'")
    if windows_per_program is not None and windows_per_program < 1:
        raise ValueError(f'windows_per_program must be at least 1; got {windows_per_program}')
    if not qkv.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        raise RuntimeError("the Triton window attention runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, "
                           "for tests); on the CPU use attn_impl='sdpa' or 'auto'")
    return _window_attention_grid_op(qkv, bias, list(window), list(shift), num_heads, scale, windows_per_program)
