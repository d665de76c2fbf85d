"""The Triton kernels against their eager PyTorch references.

On a CPU-only machine these run under Triton's interpreter, which must be switched on before Triton is imported,
hence their own pytest run (the README's test command does it):

    TRITON_INTERPRET=1 python -m pytest tests/test_triton.py

Without that variable and without CUDA the module skips. Shapes are tiny: the interpreter runs a few ms per
window-head. Tests marked `gpu` (bf16, compile limits, shapes too large for the interpreter) run only on CUDA,
without the interpreter.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip('Triton kernels: run with TRITON_INTERPRET=1 on the CPU, or on CUDA', allow_module_level=True)
pytest.importorskip('triton')

from einops import rearrange  # noqa: E402

from dagman_fast.encoder_configs import SwinConfig  # noqa: E402
from dagman_fast.kernels.topk_mask import attention_mask_triton  # noqa: E402
from dagman_fast.kernels.window_attention import window_attention, window_attention_reference  # noqa: E402
from dagman_fast.kernels.window_attention_triton import window_attention_grid  # noqa: E402
from dagman_fast.masking import MaskGenerator, attention_mask  # noqa: E402
from dagman_fast.swin import SwinEncoder  # noqa: E402
from dagman_fast.windows import shift_attention_mask, window_order  # noqa: E402

DEVICE = 'cpu' if INTERPRET else 'cuda'
gpu = pytest.mark.skipif(INTERPRET, reason='needs a GPU (compiled kernels), not the interpreter')


def grid_reference(qkv, bias, window, shift, nh, scale=None):
    """Independent reference: roll and partition with `window_order`, the precomputed `shift_attention_mask`, eager
    attention in fp32, and back to grid order."""
    b, d, h, w, c3 = qkv.shape
    c, wn = c3 // 3, window[0] * window[1] * window[2]
    perm = window_order((d, h, w), window, shift).to(qkv.device)
    t = rearrange(qkv.reshape(b, d * h * w, c3)[:, perm], 'b (nw wn) (three nh hd) -> three (b nw) nh wn hd',
                  wn=wn, three=3, nh=nh)
    mask = shift_attention_mask((d, h, w), window, shift).to(qkv.device) if any(shift) else None
    o = rearrange(window_attention_reference(t[0], t[1], t[2], bias, mask, scale), '(b nw) nh wn hd -> b (nw wn) (nh hd)',
                  b=b)
    out = torch.empty_like(o)
    out[:, perm] = o
    return out.view(b, d, h, w, c)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


CASES = [  # grid, window, shift, heads, head dim: head dims 12, 24, 32, 48, 96 padded to powers of two inside
    ((4, 4, 4), (2, 2, 2), (0, 0, 0), 2, 12),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1), 2, 24),
    ((8, 4, 4), (4, 4, 4), (2, 2, 2), 1, 32),
    ((4, 6, 4), (2, 3, 2), (1, 1, 0), 3, 48),  # a 12-token window (padded to 16), shift on two axes only
    ((4, 4, 6), (4, 4, 2), (0, 2, 1), 1, 96),
]


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize('grid,window,shift,nh,hd', CASES)
def test_window_attention_grid_matches_eager_forward_and_gradients(grid, window, shift, nh, hd, dtype, tol):
    torch.manual_seed(0)
    wn = window[0] * window[1] * window[2]
    qkv = torch.randn(2, *grid, 3 * nh * hd, device=DEVICE).to(dtype).requires_grad_()
    bias = (torch.randn(nh, wn, wn, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    out = window_attention_grid(qkv, bias, window, shift, nh, windows_per_program=3)  # 3 does not divide the count
    g = torch.randn_like(out)
    dqkv, dbias = torch.autograd.grad(out, (qkv, bias), g)
    q32, b32 = qkv.detach().float().requires_grad_(), bias.detach().float().requires_grad_()
    ref = grid_reference(q32, b32, window, shift, nh)
    rq, rb = torch.autograd.grad(ref, (q32, b32), g.float())
    assert out.dtype == dtype and dqkv.dtype == dtype and dbias.dtype == dtype
    assert rel_err(out, ref) < tol and rel_err(dqkv, rq) < tol and rel_err(dbias, rb) < tol


def test_kernel_is_one_custom_op_inside_a_compiled_graph():
    """`torch.compile` with `fullgraph=True` (any graph break is an error) over the kernel's forward and backward: the
    kernel is the custom operator `dagman_fast::window_attention_grid` (and its backward), opaque to the compiler,
    and the compiled result equals the eager one. Without the custom op the compiler would have to trace the
    Triton launch itself."""
    torch.manual_seed(0)
    grid, window, shift, nh, hd = CASES[1]
    wn = window[0] * window[1] * window[2]
    qkv = torch.randn(2, *grid, 3 * nh * hd, device=DEVICE, requires_grad=True)
    bias = (torch.randn(nh, wn, wn, device=DEVICE) * 0.5).requires_grad_()

    def f(qkv, bias):
        return window_attention_grid(qkv, bias, window, shift, nh).square().sum()

    seen = []

    def backend(gm, example_inputs):  # records the graph dynamo hands over, then runs it as it is
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    loss = compiled(qkv, bias)
    dqkv, dbias = torch.autograd.grad(loss, (qkv, bias))
    rq, rb = torch.autograd.grad(f(qkv, bias), (qkv, bias))
    assert len(seen) == 1
    ops = {str(n.target) for n in seen[0].graph.nodes if n.op == 'call_function'}
    assert any('window_attention_grid' in o for o in ops), ops
    torch.testing.assert_close(dqkv, rq)
    torch.testing.assert_close(dbias, rb)
    assert hasattr(torch.ops.dagman_fast, 'window_attention_grid_backward')


def test_shift_mask_in_the_kernel_matters():
    "The same inputs without the shift give another result: the kernel's mask is not a no-op."
    torch.manual_seed(1)
    qkv, bias = torch.randn(1, 4, 4, 4, 3 * 16, device=DEVICE), torch.randn(1, 8, 8, device=DEVICE)
    a = window_attention_grid(qkv, bias, (2, 2, 2), (1, 1, 1), 1)
    assert rel_err(a, grid_reference(qkv, bias, (2, 2, 2), (1, 1, 1), 1)) < 1e-5
    assert rel_err(a, grid_reference(qkv, bias, (2, 2, 2), (0, 0, 0), 1)) > 1e-2


@gpu
def test_bias_gradient_is_deterministic():
    """Partial sums per program, added by PyTorch in a fixed order: two backward passes agree bit for bit (on the GPU,
    where programs run concurrently; the interpreter runs them one after another)."""
    torch.manual_seed(2)
    qkv = torch.randn(2, 4, 4, 4, 3 * 2 * 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(2, 8, 8, device=DEVICE, requires_grad=True)
    grads = [torch.autograd.grad(window_attention_grid(qkv, bias, (2, 2, 2), (1, 1, 1), 2, windows_per_program=2).sum(),
                                 bias)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_window_ordered_entry_point_and_errors():
    torch.manual_seed(3)
    q, k, v = (torch.randn(6, 2, 8, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 8, 8, device=DEVICE, requires_grad=True)
    out = window_attention(q, k, v, bias, impl='triton')
    ref = window_attention_reference(q, k, v, bias)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, bias), g), torch.autograd.grad(ref, (q, k, v, bias), g)):
        assert rel_err(a, b) < 1e-5
    with pytest.raises(ValueError, match='window_attention_grid'):
        window_attention(q, k, v, bias, mask=torch.zeros(3, 8, 8, device=DEVICE), impl='triton')
    qkv = torch.randn(1, 4, 4, 4, 48, device=DEVICE)
    with pytest.raises(ValueError, match='multiple of the window'):
        window_attention_grid(qkv, torch.randn(1, 27, 27), (3, 3, 3), (0, 0, 0), 1)
    with pytest.raises(ValueError, match='shift'):
        window_attention_grid(qkv, torch.randn(1, 8, 8), (2, 2, 2), (2, 0, 0), 1)
    with pytest.raises(ValueError, match='kernel limit'):
        window_attention_grid(torch.randn(1, 8, 8, 8, 48, device=DEVICE), torch.randn(1, 512, 512), (8, 8, 8),
                              (0, 0, 0), 1)


@pytest.mark.parametrize('window', [4, 3])  # 3: padded stage grids (16 -> 18, 8 -> 9) and clipped windows
def test_encoder_with_triton_attention_matches_reference(window):
    "A whole tiny Swin (shifted blocks, padding, clipped windows, SA): maps and every parameter gradient."
    torch.manual_seed(4)
    cfg = dict(img_size=32, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=3, sa_num_heads=4,
               window_size=window)
    ref = SwinEncoder(SwinConfig(**cfg, attn_impl='reference')).to(DEVICE)
    tri = SwinEncoder(SwinConfig(**cfg, attn_impl='triton')).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 1, 32, 32, 32, device=DEVICE)
    outs = [m.forward_features(x) for m in (ref, tri)]
    for a, b in zip(*outs):
        assert rel_err(b, a) < 1e-5
    weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i, f in enumerate(outs[0])]
    for o in outs:
        sum((f * w).sum() for f, w in zip(o, weights)).backward()
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        if p.grad is not None and p.grad.abs().max() > 0:
            assert rel_err(q.grad, p.grad) < 1e-4, name


def test_attention_stats_on_the_fused_path_equal_the_reference():
    "AttentionStats on a Triton-attention encoder (the forward never forms the matrix) records what eager records."
    from dagman_fast.analysis import attention_stats
    torch.manual_seed(5)
    cfg = dict(img_size=32, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=3, sa_num_heads=4,
               window_size=4)
    ref = SwinEncoder(SwinConfig(**cfg, attn_impl='reference')).to(DEVICE)
    tri = SwinEncoder(SwinConfig(**cfg, attn_impl='triton')).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 1, 32, 32, 32, device=DEVICE)
    a, b = attention_stats(ref, x).rows(), attention_stats(tri, x).rows()
    assert len(a) == len(b) == 2 * (1 + 2 + 2 + 4) + 2 * 4
    for r, t in zip(a, b):
        assert (r['stage'], r['block'], r['head']) == (t['stage'], t['block'], t['head'])
        assert t['distance'] == pytest.approx(r['distance'], rel=1e-4)
        assert t['entropy'] == pytest.approx(r['entropy'], rel=1e-4)


def _scores_with_ties(b, nh, n, gen):
    attn = torch.rand(b, nh, n, generator=gen)
    attn[:, :, ::5] = 0.25  # equal scores: the order falls back to the cell index ...
    attn[:, :, 1::7] = 0.99  # ... among the most attended cells too (the pool and the k boundary)
    return attn.to(DEVICE)


@pytest.mark.parametrize('n', [8, 27, 64, 100, 343, 512])
@pytest.mark.parametrize('largest', [True, False])
@pytest.mark.parametrize('nh', [3, 4])
def test_topk_mask_kernel_equals_reference(n, largest, nh):
    gen = torch.Generator().manual_seed(n)
    b = 3
    attn = _scores_with_ties(b, nh, n, gen)
    k, pool = int(0.7 * n), max(1, int(0.1 * n))
    n_hint = min(int(0.07 * n), pool)
    noise = torch.rand(b, pool, generator=gen)
    noise[:, ::2] = 0.5  # tied draws: the order falls back to the pool position
    noise = noise.to(DEVICE)
    got = attention_mask_triton(attn, k, n_hint, pool, noise if n_hint else None, largest)
    assert torch.equal(got, attention_mask(attn, k, n_hint, pool, noise if n_hint else None, largest))
    assert (got.sum(1) == k - n_hint).all()


def test_topk_reference_against_a_hand_computed_mask():
    "Independent of both paths: ranks by hand on 6 cells with a tie, one hint from a pool of 2."
    attn = torch.tensor([[[0.1, 0.5, 0.3, 0.5, 0.0, 0.2]], [[0.3, 0.1, 0.5, 0.5, 0.0, 0.2]]]).to(DEVICE)
    # scores  0.1 0.5 0.3 0.5 0.0 0.2 -> order 1, 3 (tie: lower index first), 2, 5, 0, 4; k=4 masks 1, 3, 2, 5
    # pool = first 2 = cells 1, 3; draws (0.2, 0.9): position 1 (cell 3) is the hint
    noise = torch.tensor([[0.2, 0.9], [0.7, 0.7]]).to(DEVICE)  # row 2 tie: position 0 wins
    # row 2: scores 0.3 0.1 0.5 0.5 0.0 0.2 -> order 2, 3, 0, 5, 1, 4; masks 2, 3, 0, 5; hint = position 0 = cell 2
    expected = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 0, 1]], dtype=torch.bool, device=DEVICE)
    for fn in (attention_mask, attention_mask_triton):
        assert torch.equal(fn(attn, 4, 1, 2, noise), expected), fn.__name__


def test_mask_generator_triton_and_torch_agree_with_the_same_generator():
    attn = torch.rand(4, 3, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    masks = [MaskGenerator('attention', impl=impl, generator=torch.Generator(DEVICE).manual_seed(7))(4, (4, 4, 4), attn)
             for impl in ('torch', 'triton')]
    assert torch.equal(masks[0], masks[1]) and masks[0].sum(1).tolist() == [40] * 4


def test_topk_mask_errors():
    attn = torch.rand(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match='k=11'):
        attention_mask_triton(attn, 11)
    with pytest.raises(ValueError, match='n_hint <= pool <= k'):
        attention_mask_triton(attn, 5, 3, 6)
    with pytest.raises(ValueError, match='hint_noise'):
        attention_mask_triton(attn, 5, 2, 3)


@gpu
def test_bf16_on_gpu():
    "bf16 only on the GPU: the interpreter's bf16 dot products are wrong."
    torch.manual_seed(6)
    qkv = torch.randn(2, 8, 8, 8, 3 * 4 * 32, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(4, 64, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    out = window_attention_grid(qkv, bias, (4, 4, 4), (2, 2, 2), 4)
    q32, b32 = qkv.detach().float().requires_grad_(), bias.detach().float().requires_grad_()
    ref = grid_reference(q32, b32, (4, 4, 4), (2, 2, 2), 4)
    assert rel_err(out, ref) < 2e-2
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (qkv, bias), g), torch.autograd.grad(ref, (q32, b32), g.float())):
        assert rel_err(a, b) < 3e-2


@gpu
@pytest.mark.parametrize('hd', [12, 24, 32, 48, 96])
def test_paper_scale_shapes_compile_on_gpu(hd):
    "swin-smit's first stage at a 128^3 crop (a 64^3 grid of 4^3 windows) for every head dim: compiles and matches."
    nh = 2
    qkv = torch.randn(1, 64, 64, 64, 3 * nh * hd, device='cuda', dtype=torch.float16)
    bias = torch.randn(nh, 64, 64, device='cuda', dtype=torch.float16)
    qkv.requires_grad_()
    out = window_attention_grid(qkv, bias, (4, 4, 4), (2, 2, 2), nh)  # the default split, as the encoder runs it
    assert rel_err(out, grid_reference(qkv.detach().float(), bias.float(), (4, 4, 4), (2, 2, 2), nh)) < 5e-3
    out.float().sum().backward()  # the backward compiles and runs at this size (register limits, partial sums)
    assert torch.isfinite(qkv.grad).all()


@gpu
def test_auto_takes_the_kernel_on_cuda():
    from dagman_fast.swin import build_encoder
    enc = build_encoder('swin-tiny', attn_impl='auto').cuda()
    x = torch.randn(1, 24 * 4, 8, 8, 8, device='cuda')
    assert enc.stages[0].blocks[0]._fused(x.movedim(1, -1), 64)


@gpu
def test_auto_follows_the_autocast_dtype():
    """The block's input is fp32 under autocast (LayerNorm), but the kernel gets the bf16 projection: 'auto' decides
    on bf16 (head dim 24 fused), and without autocast on fp32 (head dim 24 spills in fp32: the PyTorch path)."""
    from dagman_fast.swin import build_encoder
    enc = build_encoder('swin-smit', attn_impl='auto').cuda()
    block = enc.stages[1].blocks[0]  # 96 channels, 4 heads of 24
    y = torch.randn(1, 8, 8, 8, 96, device='cuda')
    assert not block._fused(y, 64)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        assert block._fused(y, 64)

