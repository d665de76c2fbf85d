"""Kernel benchmarks (pytest-benchmark): window attention, the top-k mask and the whole encoder, every path.

    python -m pytest bench/bench_kernels.py                 # what this machine can run (CPU: no Triton)
    python -m pytest bench/bench_kernels.py --benchmark-json out.json

Groups (compare within one group, same run):
- `attn-fwd` / `attn-fwdbwd`: one block's window attention from the grid-ordered projection `qkv (b, D, H, W, 3c)`
  to the grid-ordered output, as the encoder needs it. The eager and SDPA paths include the roll + partition
  gather and its inverse (`window_order`); FlexAttention gets the windows as a block-diagonal mask with the
  bias as a score modification (compiled, CUDA only); Triton folds all of it into the kernel.
  Shapes: `swin-smit` stage 1 at a 128^3 crop on CUDA (b 2, 64^3 tokens, 4 heads of 12, 4^3 windows, shifted);
  a `swin-tiny` stage 1 at 64^3 on the CPU.
- `topk-mask`: the attention-guided mask from per-head SA attention `(b, nh, N)` (b 8, 8 heads, 8^3 cells).
- `encoder-fwdbwd`: the whole encoder's forward and backward for each `attn_impl` (peak memory in `extra_info`).

NATTEN's blocked neighbourhood attention (`na3d` with stride equal to the kernel: the same non-overlapping windows)
runs in the attention groups where `natten` is installed; it has no relative position bias and no shift mask, so
it is a lower bound on what the same windows cost, not the same computation. Without it the path is skipped.

Each result's `extra_info` holds the compulsory bytes (inputs read once, outputs written once) and, on CUDA, the
achieved share of the memory roofline (peak bandwidth from the environment variable `PEAK_GBS`, else from the
device name: H100 SXM 3350, H100 PCIe 2000,
H200 4800, A100 80GB 2039, A100 40GB 1555 GB/s).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from einops import rearrange

from dagman_fast.kernels.window_attention import window_attention_qkv
from dagman_fast.swin import build_encoder
from dagman_fast.windows import shift_attention_mask, window_order

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
try:
    from dagman_fast.kernels.window_attention_triton import triton, window_attention_grid
except ImportError:  # pragma: no cover
    triton = None
TRITON = CUDA and triton is not None
PEAK_GBS = {'H100 80GB HBM3': 3350, 'H100 PCIe': 2000, 'H200': 4800, 'A100-SXM4-80GB': 2039, 'A100-SXM4-40GB': 1555,
            'A100 80GB PCIe': 1935}

# (b, grid, heads, head dim, window, shift)
SHAPE = (2, (64, 64, 64), 4, 12, (4, 4, 4), (2, 2, 2)) if CUDA else (1, (32, 32, 32), 2, 12, (4, 4, 4), (2, 2, 2))
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _peak_gbs(request) -> float | None:
    if not CUDA:
        return None
    if os.environ.get('PEAK_GBS'):
        return float(os.environ['PEAK_GBS'])
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBS.items() if k in name), None)


def _warm_up(step):
    "One untimed call (compiles, autotunes) that also measures the step's peak memory on CUDA."
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if CUDA else None


def _record(benchmark, request, nbytes: int, peak_mib: float | None = None):
    if peak_mib is not None:
        benchmark.extra_info['peak_mib'] = round(peak_mib, 1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else 'cpu', torch=torch.__version__,
                                triton=getattr(triton, '__version__', None), dtype=str(DTYPE), bytes=nbytes)
    peak = _peak_gbs(request)
    if peak and benchmark.stats and nbytes:
        benchmark.extra_info['roofline_pct'] = round(100 * nbytes / benchmark.stats['median'] / (peak * 1e9), 1)


def _inputs(requires_grad=False):
    b, grid, nh, hd, window, shift = SHAPE
    c = nh * hd
    wn = window[0] * window[1] * window[2]
    qkv = torch.randn(b, *grid, 3 * c, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    bias = (torch.randn(nh, wn, wn, device=DEVICE) * 0.1).to(DTYPE).requires_grad_(requires_grad)
    return qkv, bias


def _windowed(impl):
    "Grid qkv -> roll + partition (one gather) -> window attention -> inverse gather: the encoder's non-fused path."
    b, grid, nh, hd, window, shift = SHAPE
    perm = window_order(grid, window, shift).to(DEVICE)
    inv = perm.argsort()
    mask = shift_attention_mask(grid, window, shift).to(DEVICE)
    wn = window[0] * window[1] * window[2]

    def run(qkv, bias):
        t = qkv.reshape(b, -1, qkv.shape[-1])[:, perm].view(-1, wn, 3, nh, hd)
        o = window_attention_qkv(t, bias, mask, impl=impl)  # (b nw) nh wn hd
        return rearrange(o, '(b nw) nh wn hd -> b (nw wn) (nh hd)', b=b)[:, inv].view(b, *grid, nh * hd)
    return run


def _flex(compile=True):
    "FlexAttention over the rolled, partitioned tokens: windows and shift regions as a block mask, bias as a score mod."
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    b, grid, nh, hd, window, shift = SHAPE
    wn = window[0] * window[1] * window[2]
    n = grid[0] * grid[1] * grid[2]
    perm = window_order(grid, window, shift).to(DEVICE)
    inv = perm.argsort()
    region = (shift_attention_mask(grid, window, shift) == 0).to(DEVICE)  # (nw, wn, wn) allowed pairs

    def allowed(bb, h, qi, ki):
        same = qi // wn == ki // wn
        return same & region[qi // wn, qi % wn, ki % wn]
    block = create_block_mask(allowed, None, None, n, n, device=DEVICE, _compile=True)  # not an n x n dense mask
    fn = torch.compile(flex_attention) if compile else flex_attention
    pad = max(0, 16 - hd)  # FlexAttention needs a head dim of at least 16 (swin-smit has 12): zero-pad, slice back

    def run(qkv, bias):
        t = rearrange(qkv.reshape(b, n, -1)[:, perm], 'b n (three nh hd) -> three b nh n hd', three=3, nh=nh)
        if pad:
            t = torch.nn.functional.pad(t, (0, pad))  # zero q/k columns add nothing to the scores

        def score(s, bb, h, qi, ki):
            return s + bias[h, qi % wn, ki % wn]
        o = fn(t[0], t[1], t[2], score_mod=score, block_mask=block, scale=hd ** -0.5)[..., :hd]
        return rearrange(o, 'b nh n hd -> b n (nh hd)')[:, inv].view(b, *grid, nh * hd)
    return run


def _natten():
    "NATTEN's blocked 3D neighbourhood attention on the rolled grid (no bias, no shift mask: see the module doc)."
    from natten import na3d
    b, grid, nh, hd, window, shift = SHAPE

    def run(qkv, bias):
        t = torch.roll(qkv, [-s for s in shift], dims=(1, 2, 3)) if any(shift) else qkv
        q, k, v = rearrange(t, 'b d h w (three nh hd) -> three b d h w nh hd', three=3, nh=nh).unbind(0)
        o = na3d(q.contiguous(), k.contiguous(), v.contiguous(), kernel_size=window, stride=window)
        o = rearrange(o, 'b d h w nh hd -> b d h w (nh hd)')
        return torch.roll(o, list(shift), dims=(1, 2, 3)) if any(shift) else o
    return run


def _triton(qkv, bias):
    b, grid, nh, hd, window, shift = SHAPE
    return window_attention_grid(qkv, bias, window, shift, nh, windows_per_program=8)


PATHS = {
    'eager': lambda: _windowed('reference'),
    'sdpa': lambda: _windowed('sdpa'),
    'flex': _flex,
    'triton': lambda: _triton,
    'natten': _natten,
}


def _available(path):
    if path == 'triton' and not TRITON:
        pytest.skip('Triton needs CUDA')
    if path == 'flex' and not CUDA:
        pytest.skip('FlexAttention has no CPU backward and compiles for CUDA here')
    if path == 'natten':
        pytest.importorskip('natten', reason="NATTEN is not installed (pip install natten, built for this torch/CUDA)")
        if not CUDA:
            pytest.skip('NATTEN is compared on CUDA only')


@pytest.mark.parametrize('path', list(PATHS))
def test_attention_forward(benchmark, request, path):
    _available(path)
    benchmark.group = 'attn-fwd'
    fn, (qkv, bias) = PATHS[path](), _inputs()

    def step():
        with torch.no_grad():
            fn(qkv, bias)
        _sync()
    peak = _warm_up(step)  # compile / warm up
    benchmark(step)
    _record(benchmark, request, qkv.numel() * qkv.element_size() * 4 // 3, peak)  # read qkv, write out (c = 3c / 3)


@pytest.mark.parametrize('path', list(PATHS))
def test_attention_forward_backward(benchmark, request, path):
    _available(path)
    benchmark.group = 'attn-fwdbwd'
    fn, (qkv, bias) = PATHS[path](), _inputs(requires_grad=True)
    grad = torch.randn(*qkv.shape[:4], qkv.shape[-1] // 3, device=DEVICE, dtype=DTYPE)

    def step():
        torch.autograd.grad(fn(qkv, bias), (qkv, bias), grad, allow_unused=True)  # NATTEN takes no bias
        _sync()
    peak = _warm_up(step)
    benchmark(step)
    # forward: qkv in, out out; backward: qkv, out, dout in, dqkv out
    size = qkv.numel() * qkv.element_size()
    _record(benchmark, request, size * 4 // 3 + size + 2 * size // 3 + size, peak)


@pytest.mark.parametrize('impl', ['torch', 'triton'])
def test_topk_mask(benchmark, request, impl):
    from dagman_fast.kernels.topk_mask import attention_mask_triton
    from dagman_fast.masking import attention_mask
    if impl == 'triton' and not TRITON:
        pytest.skip('Triton needs CUDA')
    benchmark.group = 'topk-mask'
    b, nh, n = 8, 8, 512
    attn = torch.rand(b, nh, n, device=DEVICE)
    k, pool = int(0.7 * n), int(0.1 * n)
    n_hint = min(int(0.07 * n), pool)
    noise = torch.rand(b, pool, device=DEVICE)
    fn = attention_mask_triton if impl == 'triton' else attention_mask

    def step():
        fn(attn, k, n_hint, pool, noise)
        _sync()
    step()
    benchmark(step)
    _record(benchmark, request, attn.numel() * 4 + noise.numel() * 4 + b * n)


@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'triton', 'auto', 'compiled'])
def test_encoder_forward_backward(benchmark, request, impl):
    """The whole encoder's forward and backward; 'compiled': the 'auto' path with `compile_blocks` (its compile time
    is spent in the untimed warm-up and recorded). `extra_info['flops']`: the step's FLOPs, counted once on the
    reference path (`count_flops`), from which `gpu_summary.py` gives TFLOP/s and MFU."""
    if impl == 'triton' and not TRITON:
        pytest.skip('Triton needs CUDA')
    from dagman_fast.swin import compile_blocks
    from dagman_fast.train_utils import count_flops
    benchmark.group = 'encoder-fwdbwd'
    preset, crop, bs = ('swin-smit', 128, 2) if CUDA else ('swin-tiny', 64, 1)
    enc = build_encoder(preset, attn_impl='auto' if impl == 'compiled' else impl, drop_path_rate=0.0).to(DEVICE)
    if impl == 'compiled':
        compile_blocks(enc)
    x = torch.randn(bs, 1, crop, crop, crop, device=DEVICE)

    def step(model=enc):
        with torch.autocast(DEVICE, dtype=DTYPE, enabled=CUDA):
            out = model(x)
        sum(f.float().mean() for f in out.features).backward()
        _sync()
    t0 = time.perf_counter()
    peak = _warm_up(step)
    benchmark.extra_info['warmup_s'] = round(time.perf_counter() - t0, 1)
    benchmark(step)
    counted = build_encoder(preset, attn_impl='reference', drop_path_rate=0.0).to(DEVICE)
    benchmark.extra_info['flops'] = count_flops(step, counted)[1]
    benchmark.extra_info['shape'] = f'{preset} {crop}^3 bs {bs}'
    _record(benchmark, request, 0, peak)
