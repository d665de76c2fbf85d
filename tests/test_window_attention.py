"""Tests of `dagman_fast.kernels.window_attention`: every path against an eager oracle written here, gradients
included, plus argument checking.

Shapes: `q, k, v: ((b nw), nh, wn, hd)`, `bias: (nh, wn, wn)`, `mask: (nw, wn, wn)` additive or None.
"""
from __future__ import annotations

import os

import pytest
import torch
from einops import rearrange

from dagman_fast.kernels.window_attention import (ATTN_IMPLS, AUTO_RECOMPUTE_BYTES, resolve_attn_impl, window_attention,
                                                  window_attention_qkv, window_attention_reference,
                                                  window_attention_sdpa)
from dagman_fast.windows import shift_attention_mask

OUT_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)
CUSTOM_BACKWARD = '_CPUWindowAttentionBackward'


def oracle(q, k, v, bias, mask=None, scale=None):
    "Window attention written out per image and window, independently of the library: softmax(qk^T s + B + M) v."
    bnw, nh, wn, hd = q.shape
    s = hd ** -0.5 if scale is None else scale
    logits = torch.einsum('bhid,bhjd->bhij', q, k) * s + bias
    if mask is not None:
        nw = mask.shape[0]
        logits = logits + mask.repeat(bnw // nw, 1, 1)[:, None]  # window w of each image meets mask[w]
    return torch.einsum('bhij,bhjd->bhid', torch.softmax(logits, -1), v)


def _mask_for(wn: int, nw_grid: int = 2):
    """A shift mask with `wn`-token windows (64: window 4^3, 8: window 2^3) over a grid of `nw_grid`^3 windows."""
    w = round(wn ** (1 / 3))
    g = w * nw_grid
    return shift_attention_mask((g, g, g), (w, w, w), (w // 2,) * 3)


def _inputs(bnw, nh, wn, hd, dtype=torch.float32):
    q, k, v = (torch.randn(bnw, nh, wn, hd, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = (0.5 * torch.randn(nh, wn, wn, dtype=dtype)).requires_grad_()
    return q, k, v, bias


# ---------------------------------------------------------------------------------------------------------------
# Outputs and gradients of every path
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('hd', [
    12,  # head dim of stage 1 of a 12-channel tiny model
    24,  # swin-tiny / a different SIMD tail
    32,  # a power of two
])
@pytest.mark.parametrize('wn', [
    64,  # full 4^3 windows
    8,  # small 2^3 windows (clipped stages)
])
@pytest.mark.parametrize('masked', [
    False,  # unshifted blocks
    True,  # shifted blocks: 8 windows per image, 2 images
])
def test_sdpa_matches_reference_with_grad(hd, wn, masked):
    mask = _mask_for(wn) if masked else None
    nw = 8 if masked else 4
    q, k, v, bias = _inputs(2 * nw, 2, wn, hd)
    g = torch.randn(q.shape)
    expected = oracle(q, k, v, bias, mask)
    exp_grads = torch.autograd.grad(expected, (q, k, v, bias), g)
    for impl in ('reference', 'sdpa'):
        out = window_attention(q, k, v, bias, mask, impl=impl)
        if impl == 'sdpa':  # the CPU custom-autograd path ran (flash forward, recomputing backward)
            assert type(out.grad_fn).__name__ == CUSTOM_BACKWARD
        torch.testing.assert_close(out, expected, **OUT_TOL)
        grads = torch.autograd.grad(out, (q, k, v, bias), g)
        for name, a, b in zip('q k v bias'.split(), grads, exp_grads):
            torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f'{impl} d{name}: {m}')


@pytest.mark.parametrize('wn,masked', [
    (64, False),  # plain SDPA, 4-D
    (64, True),  # plain SDPA with a 5-D view so the mask broadcasts over images
    (8, True),  # small windows with a mask
])
def test_sdpa_no_grad_matches_reference(wn, masked):
    mask = _mask_for(wn) if masked else None
    q, k, v, bias = _inputs(3 * 8, 3, wn, 16)
    with torch.no_grad():
        out = window_attention(q, k, v, bias, mask, impl='sdpa')
        ref = window_attention(q, k, v, bias, mask, impl='reference')
    assert out.grad_fn is None and out.shape == q.shape
    torch.testing.assert_close(out, oracle(q, k, v, bias, mask).detach(), **OUT_TOL)
    torch.testing.assert_close(ref, oracle(q, k, v, bias, mask).detach(), **OUT_TOL)


def test_monai_style_mask_value():
    "MONAI's -100 mask and our -inf mask give the same attention to float32 precision."
    q, k, v, bias = _inputs(16, 2, 64, 8)
    m_inf = _mask_for(64)
    m_100 = torch.where(torch.isfinite(m_inf), m_inf, torch.full_like(m_inf, -100.0))
    with torch.no_grad():
        for impl in ('reference', 'sdpa'):
            torch.testing.assert_close(window_attention(q, k, v, bias, m_100, impl=impl),
                                       window_attention(q, k, v, bias, m_inf, impl=impl), **OUT_TOL)


@pytest.mark.parametrize('impl', ['reference', 'sdpa'])  # both paths honour an explicit scale
def test_explicit_scale(impl):
    q, k, v, bias = _inputs(4, 2, 8, 16)
    out = window_attention(q, k, v, bias, scale=0.3, impl=impl)
    torch.testing.assert_close(out, oracle(q, k, v, bias, scale=0.3), **OUT_TOL)
    assert (out - oracle(q, k, v, bias)).abs().max() > 1e-3  # the default scale (1/4) differs


@pytest.mark.parametrize('masked', [
    False,  # unshifted
    True,  # shifted, two images
])
@pytest.mark.parametrize('impl', [
    'reference',  # eager on strided views
    'sdpa',  # custom backward must hand back gradients for non-contiguous views
])
def test_strided_views_from_packed_qkv(impl, masked):
    "q, k, v as the encoder makes them: views into one Linear(c, 3c) output; gradients flow to the packed tensor."
    nh, wn, hd, nw = 2, 64, 12, 8
    mask = _mask_for(wn) if masked else None
    packed = torch.randn(2 * nw, wn, 3 * nh * hd, requires_grad=True)
    bias = torch.randn(nh, wn, wn, requires_grad=True)
    q, k, v = rearrange(packed, 'b n (three nh hd) -> three b nh n hd', three=3, nh=nh).unbind(0)
    assert not q.is_contiguous()
    out = window_attention(q, k, v, bias, mask, impl=impl)
    g = torch.randn_like(out)
    d_packed, d_bias = torch.autograd.grad(out, (packed, bias), g)
    # oracle on contiguous copies
    p2 = packed.detach().clone().requires_grad_()
    q2, k2, v2 = (t.contiguous() for t in rearrange(p2, 'b n (three nh hd) -> three b nh n hd', three=3, nh=nh))
    b2 = bias.detach().clone().requires_grad_()
    ref = oracle(q2, k2, v2, b2, mask)
    e_packed, e_bias = torch.autograd.grad(ref, (p2, b2), g)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    torch.testing.assert_close(d_packed, e_packed, **GRAD_TOL)
    torch.testing.assert_close(d_bias, e_bias, **GRAD_TOL)


@pytest.mark.parametrize('impl', [
    'reference',  # eager
    'sdpa',  # custom autograd on the packed layout
    'auto',  # picks a path by the size of the attention matrix
])
@pytest.mark.parametrize('masked', [False, True])  # unshifted / shifted with two images
def test_window_attention_qkv_matches_parts(impl, masked):
    "The packed entry point the encoder uses: same result and gradients as the oracle on its three parts."
    nh, wn, hd, nw = 3, 8, 8, 8
    mask = _mask_for(wn) if masked else None
    lin = torch.nn.Linear(nh * hd, 3 * nh * hd)
    x = torch.randn(2 * nw, wn, nh * hd, requires_grad=True)
    bias = torch.randn(nh, wn, wn, requires_grad=True)
    qkv = rearrange(lin(x), 'b n (three nh hd) -> b n three nh hd', three=3, nh=nh)
    out = window_attention_qkv(qkv, bias, mask, impl=impl)
    assert out.shape == (2 * nw, nh, wn, hd)
    q, k, v = rearrange(lin(x), 'b n (three nh hd) -> three b nh n hd', three=3, nh=nh).unbind(0)
    ref = oracle(q, k, v, bias, mask)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    g = torch.randn_like(out)
    params = (x, bias, lin.weight, lin.bias)
    for name, a, b in zip('x bias weight b'.split(), torch.autograd.grad(out, params, g),
                          torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f'd{name}: {m}')


def test_window_attention_qkv_bad_shape():
    with pytest.raises(ValueError, match='qkv'):
        window_attention_qkv(torch.zeros(4, 8, 2, 2, 4), torch.zeros(2, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# The CPU backward's chunking
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('chunk,masked', [
    (2, True),  # one window (2 heads) per step: always aligned
    (8, True),  # 4 windows per step: divides the 8 windows of an image
    (10_000, True),  # step capped at nw: one image per step
    (6, False),  # no mask: chunks may straddle images, 3 windows per step over 24
    (10_000, False),  # no mask, one chunk
    (6, True),  # 3 windows per step do not divide the 8 windows of an image
    (10, True),  # 5 windows per step do not divide 8
])
def test_cpu_backward_chunks(chunk, masked):
    # A seed of its own per case: a chunk that skipped windows would leave uninitialised memory, which must not
    # happen to hold the gradients an earlier case computed from the very same inputs.
    torch.manual_seed(1000 * chunk + masked)
    nh, wn, hd = 2, 8, 4
    mask = _mask_for(wn) if masked else None
    q, k, v, bias = _inputs(3 * 8, nh, wn, hd)  # 3 images of 8 windows
    out = window_attention_sdpa(q, k, v, bias, mask, chunk=chunk)
    assert type(out.grad_fn).__name__ == CUSTOM_BACKWARD
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    ref = oracle(q, k, v, bias, mask)
    expected = torch.autograd.grad(ref, (q, k, v, bias), g)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, a, b in zip('q k v bias'.split(), got, expected):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f'd{name}: {m}')


# ---------------------------------------------------------------------------------------------------------------
# float64 gradcheck
# ---------------------------------------------------------------------------------------------------------------

def test_reference_gradcheck_float64():
    q, k, v, bias = _inputs(4, 2, 8, 4, dtype=torch.float64)
    mask = _mask_for(8, nw_grid=1).to(torch.float64)  # one 2^3 window whose shift regions split it 8 ways
    assert torch.autograd.gradcheck(lambda *t: window_attention_reference(*t, mask), (q, k, v, bias))


@pytest.mark.parametrize('masked', [
    False,  # unshifted
    True,  # shifted, one image of 8 windows
])
def test_sdpa_gradcheck_float64(masked):
    nw = 8 if masked else 2
    q, k, v, bias = _inputs(nw, 2, 8, 4, dtype=torch.float64)
    mask = _mask_for(8).to(torch.float64) if masked else None
    try:
        with torch.no_grad():
            window_attention_sdpa(q.detach(), k.detach(), v.detach(), bias.detach(), mask)
        out = window_attention_sdpa(q, k, v, bias, mask)
    except RuntimeError as e:  # pragma: no cover - depends on the PyTorch build
        pytest.skip(f'the CPU flash kernel does not take float64 here: {e}')
    assert out.dtype == torch.float64 and type(out.grad_fn).__name__ == CUSTOM_BACKWARD
    # The backward recomputes in float32 by design, so gradcheck's default tolerances (atol 1e-5, rtol 1e-3)
    # are the ones that apply, not float64 precision.
    assert torch.autograd.gradcheck(lambda *t: window_attention_sdpa(*t, mask), (q, k, v, bias))


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------

_Q = torch.zeros(4, 2, 8, 16)
_B = torch.zeros(2, 8, 8)


@pytest.mark.parametrize('q,k,v,bias,mask,match', [
    (_Q[0], _Q[0], _Q[0], _B, None, 'q, k, v must share one shape'),  # 3-D q, k, v
    (_Q, _Q[:, :, :4], _Q, _B, None, 'q, k, v must share one shape'),  # k with fewer tokens
    (_Q, _Q, _Q[..., :8], _B, None, 'q, k, v must share one shape'),  # v with another head dim
    (_Q, _Q, _Q, torch.zeros(3, 8, 8), None, r'bias must have shape \(nh, wn, wn\) = \(2, 8, 8\)'),  # wrong heads
    (_Q, _Q, _Q, torch.zeros(8, 8), None, r'bias must have shape'),  # bias without a head axis
    (_Q, _Q, _Q, _B, torch.zeros(2, 4, 4), r'mask must have shape \(nw, 8, 8\)'),  # mask for other windows
    (_Q, _Q, _Q, _B, torch.zeros(3, 8, 8), r'nw dividing the 4 windows'),  # 3 does not divide 4 windows
    (_Q, _Q, _Q, _B, torch.zeros(8, 8), r'mask must have shape'),  # 2-D mask
])
@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'auto'])  # every path checks its arguments
def test_bad_shapes(q, k, v, bias, mask, match, impl):
    with pytest.raises(ValueError, match=match):
        window_attention(q, k, v, bias, mask, impl=impl)


def test_bad_shapes_under_grad():
    "The CPU autograd path checks shapes too (before packing anything)."
    q = torch.zeros(4, 2, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match='bias must have shape'):
        window_attention_sdpa(q, q, q, torch.zeros(2, 4, 4))


def test_unknown_impl():
    q, k, v, bias = _inputs(2, 2, 8, 4)
    with pytest.raises(ValueError) as info:
        window_attention(q, k, v, bias, impl='nope')
    for name in ATTN_IMPLS:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match=r"Did you mean 'sdpa'"):
        resolve_attn_impl('sdap')


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') == '1', reason='the interpreter runs Triton on the CPU')
def test_triton_on_cpu_tensors_says_what_to_use():
    "Without the interpreter, 'triton' on CPU tensors (or without Triton installed) fails with a clear message."
    q, k, v, bias = _inputs(2, 2, 8, 4)
    with pytest.raises((ImportError, RuntimeError), match="attn_impl='sdpa'"):
        window_attention(q, k, v, bias, impl='triton')


def test_resolve_attn_impl():
    assert ATTN_IMPLS == ('reference', 'sdpa', 'triton', 'auto')
    assert resolve_attn_impl('reference') == 'reference'
    assert resolve_attn_impl('sdpa', attn_bytes=1, cpu_grad=True) == 'sdpa'  # an explicit choice is kept
    assert resolve_attn_impl('auto') == 'sdpa'
    # 'auto' keeps small attention matrices on the CPU under autograd (eager), recomputes large ones (sdpa)
    assert resolve_attn_impl('auto', attn_bytes=AUTO_RECOMPUTE_BYTES, cpu_grad=True) == 'reference'
    assert resolve_attn_impl('auto', attn_bytes=AUTO_RECOMPUTE_BYTES + 1, cpu_grad=True) == 'sdpa'
    assert resolve_attn_impl('auto', attn_bytes=1, cpu_grad=False) == 'sdpa'


def test_auto_dispatch_by_size():
    "Under autograd on the CPU, 'auto' stores a small attention matrix (eager) and recomputes a large one."
    small = torch.randn(4, 8, 3, 2, 4, requires_grad=True)  # 4 windows x 2 heads x 8^2
    bias = torch.zeros(2, 8, 8, requires_grad=True)
    assert type(window_attention_qkv(small, bias).grad_fn).__name__ != CUSTOM_BACKWARD
    big_windows = AUTO_RECOMPUTE_BYTES // (2 * 8 * 8 * 4) + 1
    big = torch.randn(big_windows, 8, 3, 2, 4, requires_grad=True)
    assert type(window_attention_qkv(big, bias).grad_fn).__name__ == CUSTOM_BACKWARD
    with torch.no_grad():  # no autograd: SDPA whatever the size
        assert window_attention_qkv(small, bias).grad_fn is None


def test_output_dtype_and_shape_follow_input():
    q, k, v, bias = _inputs(6, 3, 8, 4)
    for impl in ('reference', 'sdpa'):
        out = window_attention(q, k, v, bias, impl=impl)
        assert out.shape == (6, 3, 8, 4) and out.dtype == torch.float32
