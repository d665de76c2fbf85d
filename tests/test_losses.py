"""Tests for `dagman_fast.losses`: the DINO distillation loss and head, the 3-D pixel shuffle and the AMIP loss.

Values are checked against references written here (plain formulas, loops, numpy).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dagman_fast.losses import DINOHead, DistillLoss, ReconHead, amip_loss, entropy, pixel_shuffle_3d

TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- references


def ref_ce(s, t, c, ts, tt):
    "Per-token cross-entropy of the centred, sharpened teacher to the student, in float64."
    s, t, c = s.double(), t.double(), c.double()
    return -(torch.softmax((t - c) / tt, -1) * torch.log_softmax(s / ts, -1)).sum(-1)


def np_entropy(p):
    p = np.asarray(p, dtype=np.float64)
    return float(-sum(x * math.log(x) for x in p.ravel() if x > 0))


# ---------------------------------------------------------------------------------------------------- DistillLoss


@pytest.mark.parametrize('shape', [(6, 10), (3, 5, 10)])
def test_distill_loss_value(shape):
    K = shape[-1]
    loss_fn = DistillLoss(K, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(K))
    loss_fn.center_ready.fill_(True)  # a centre already in use (not the first batch)
    c = loss_fn.center.clone()
    s, t = torch.randn(shape), torch.randn(shape)
    loss = loss_fn(s, t, 0.04)
    ref = ref_ce(s, t, c, 0.1, 0.04).mean()
    assert loss.shape == ()
    torch.testing.assert_close(loss.double(), ref, **TOL)


def test_distill_loss_hand_computed():
    # two classes, zero centre: teacher (0, log 3)/1 -> targets (1/4, 3/4); student (0, 0)/1 -> log 1/2 both
    loss_fn = DistillLoss(2, student_temp=1.0).eval()
    loss = loss_fn(torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]]), 1.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_distill_loss_weighted_mean_per_image():
    b, n, K = 3, 5, 7
    loss_fn = DistillLoss(K, student_temp=0.2)
    loss_fn.center.copy_(torch.randn(K) * 0.1)
    loss_fn.center_ready.fill_(True)  # a centre already in use (not the first batch)
    c = loss_fn.center.clone()
    s, t = torch.randn(b, n, K), torch.randn(b, n, K)
    w = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = loss_fn(s, t, 0.05, weight=w)
    ce = ref_ce(s, t, c, 0.2, 0.05)
    per_image = []
    for i in range(b):
        num, den = 0.0, 0
        for j in range(n):
            if w[i, j]:
                num += float(ce[i, j])
                den += 1
        per_image.append(num / den)
    assert loss.item() == pytest.approx(sum(per_image) / b, rel=1e-5)
    # this is not the plain masked mean over all tokens (which weighs images by their masked counts)
    flat = float(ce[w].mean())
    assert abs(loss.item() - flat) > 1e-3


def test_distill_loss_zero_weight_row_contributes_zero():
    b, n, K = 2, 4, 6
    loss_fn = DistillLoss(K).eval()
    s, t = torch.randn(b, n, K), torch.randn(b, n, K)
    w = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    loss = loss_fn(s, t, 0.04, weight=w)
    assert torch.isfinite(loss)
    ce = ref_ce(s, t, loss_fn.center, 0.1, 0.04)
    first = float((ce[0, 0] + ce[0, 1] + ce[0, 3]) / 3)
    # the empty image counts as 0 in the mean over images
    assert loss.item() == pytest.approx(first / 2, rel=1e-5)
    # and its tokens get no gradient
    s.requires_grad_(True)
    loss_fn(s, t, 0.04, weight=w).backward()
    assert s.grad[1].abs().max() == 0
    assert s.grad[0, 2].abs().max() == 0
    assert s.grad[0, 0].abs().max() > 0


def test_distill_loss_all_ones_weight_equals_unweighted():
    loss_fn = DistillLoss(8).eval()
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(loss_fn(s, t, 0.04, weight=torch.ones(2, 3)), loss_fn(s, t, 0.04), **TOL)


def test_distill_loss_weight_shape_mismatch():
    loss_fn = DistillLoss(8)
    with pytest.raises(ValueError, match='weight'):
        loss_fn(torch.randn(2, 3, 8), torch.randn(2, 3, 8), 0.04, weight=torch.ones(2, 4))


def test_distill_loss_shape_mismatch():
    loss_fn = DistillLoss(8)
    with pytest.raises(ValueError):
        loss_fn(torch.randn(2, 3, 8), torch.randn(2, 4, 8), 0.04)
    with pytest.raises(ValueError):
        loss_fn(torch.randn(6, 8), torch.randn(2, 3, 8), 0.04)


@pytest.mark.parametrize('shape', [(6, 5), (2, 3, 5)])
def test_distill_loss_center_update_in_train_mode(shape):
    K = shape[-1]
    m = 0.8
    loss_fn = DistillLoss(K, center_momentum=m).train()
    c0 = torch.randn(K)
    loss_fn.center.copy_(c0)
    loss_fn.center_ready.fill_(True)  # a centre already in use (not the first batch)
    t = torch.randn(shape) + 3.0
    loss_fn(torch.randn(shape), t, 0.04)
    tm = t.double().numpy().reshape(-1, K)
    mean = np.array([sum(tm[i, j] for i in range(tm.shape[0])) / tm.shape[0] for j in range(K)])
    expected = m * c0.double().numpy() + (1 - m) * mean
    np.testing.assert_allclose(loss_fn.center.double().numpy(), expected, atol=1e-5)
    # a second step moves it again
    loss_fn(torch.randn(shape), t, 0.04)
    np.testing.assert_allclose(loss_fn.center.double().numpy(), m * expected + (1 - m) * mean, atol=1e-5)


def test_distill_loss_uses_center_before_update():
    K = 6
    loss_fn = DistillLoss(K).train()
    c0 = torch.randn(K)
    loss_fn.center.copy_(c0)
    loss_fn.center_ready.fill_(True)  # a centre already in use (not the first batch)
    s, t = torch.randn(4, K), torch.randn(4, K) * 3
    loss = loss_fn(s, t, 0.04)
    assert loss.item() == pytest.approx(float(ref_ce(s, t, c0, 0.1, 0.04).mean()), rel=1e-5)
    assert not torch.allclose(loss_fn.center, c0)


def test_distill_loss_no_center_update_in_eval_mode():
    loss_fn = DistillLoss(5).eval()
    c0 = torch.randn(5)
    loss_fn.center.copy_(c0)
    loss_fn.center_ready.fill_(True)  # a centre already in use (not the first batch)
    loss_fn(torch.randn(4, 5), torch.randn(4, 5) + 2, 0.04)
    assert torch.equal(loss_fn.center, c0)
    assert loss_fn.stats == {}


def test_distill_loss_gradient_only_to_student():
    K = 7
    loss_fn = DistillLoss(K)
    s = torch.randn(3, 4, K, requires_grad=True)
    t = torch.randn(3, 4, K, requires_grad=True)
    loss = loss_fn(s, t, 0.04)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    # the student's gradient of a mean cross-entropy: (softmax(s/ts) - targets) / (ts * n_tokens)
    c = t.detach().reshape(-1, K).mean(0)  # a first training batch is centred on its own mean
    tgt = torch.softmax((t.detach() - c) / 0.04, -1)
    ref = (torch.softmax(s.detach() / 0.1, -1) - tgt) / (0.1 * 12)
    torch.testing.assert_close(s.grad, ref, **TOL)


def test_distill_loss_tensor_teacher_temp():
    K = 9
    s, t = torch.randn(5, K), torch.randn(5, K)
    a = DistillLoss(K).eval()(s, t, torch.tensor(0.07))
    b = DistillLoss(K).eval()(s, t, 0.07)
    torch.testing.assert_close(a, b)
    assert a.item() == pytest.approx(float(ref_ce(s, t, torch.zeros(K), 0.1, 0.07).mean()), rel=1e-5)


def test_distill_loss_stats():
    K, m = 6, 0.9
    loss_fn = DistillLoss(K, center_momentum=m).train()
    c0 = torch.randn(K) * 0.5
    loss_fn.center.copy_(c0)
    loss_fn.center_ready.fill_(True)  # a centre already in use (not the first batch)
    t = torch.randn(2, 3, K)
    loss_fn(torch.randn(2, 3, K), t, 0.5)
    st = loss_fn.stats
    assert set(st) >= {'entropy', 'mean_entropy', 'center_norm'}
    # targets recomputed independently from the centre before the update
    tgt = torch.softmax((t.double() - c0.double()) / 0.5, -1).reshape(-1, K).numpy()
    ent = np.mean([np_entropy(row) for row in tgt])
    mean_ent = np_entropy(tgt.mean(0))
    new_c = m * c0.double().numpy() + (1 - m) * t.double().reshape(-1, K).numpy().mean(0)
    assert float(st['entropy']) == pytest.approx(ent, rel=1e-5)
    assert float(st['mean_entropy']) == pytest.approx(mean_ent, rel=1e-5)
    assert float(st['center_norm']) == pytest.approx(float(np.sqrt((new_c ** 2).sum())), rel=1e-5)
    assert float(st['mean_entropy']) >= float(st['entropy']) - 1e-6  # entropy is concave


def test_distill_loss_minimised_by_matching_student():
    # for a fixed target, cross-entropy is smallest when the student's distribution equals it
    K = 5
    loss_fn = DistillLoss(K, student_temp=1.0).eval()
    t = torch.randn(3, K)
    match = loss_fn(t.clone(), t, 1.0)
    other = loss_fn(t + torch.randn(3, K), t, 1.0)
    assert match < other
    tgt = torch.softmax(t.double(), -1)
    assert match.item() == pytest.approx(float(np.mean([np_entropy(r) for r in tgt.numpy()])), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize('K', [1, 2, 7, 100])
def test_entropy_uniform_and_one_hot(K):
    u = torch.full((3, K), 1.0 / K)
    torch.testing.assert_close(entropy(u), torch.full((3,), math.log(K)), **TOL)
    oh = F.one_hot(torch.tensor([0, K - 1]), K).float()
    e = entropy(oh)
    assert torch.isfinite(e).all()
    torch.testing.assert_close(e, torch.zeros(2), atol=1e-6, rtol=0)


def test_entropy_values_and_dim():
    p = torch.softmax(torch.randn(4, 6), -1)
    ref = [np_entropy(r) for r in p.numpy()]
    np.testing.assert_allclose(entropy(p).numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(entropy(p.T, dim=0).numpy(), ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- DINOHead


@pytest.mark.parametrize('nlayers', [1, 2, 3])
def test_dino_head_shapes_and_layers(nlayers):
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, nlayers=nlayers)
    assert head(torch.randn(5, 12)).shape == (5, 20)
    assert head(torch.randn(2, 5, 12)).shape == (2, 5, 20)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == nlayers
    assert linears[0].in_features == 12 and linears[-1].out_features == 8
    for a in linears[:-1]:
        assert a.out_features == 16
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == nlayers - 1
    assert not isinstance(head.mlp[-1], nn.GELU)


@pytest.mark.parametrize('nlayers', [0, -1])
def test_dino_head_rejects_no_layers(nlayers):
    with pytest.raises(ValueError):
        DINOHead(12, 20, 16, 8, nlayers=nlayers)


@pytest.mark.parametrize('norm_last_layer', [True, False])
def test_dino_head_weight_norm(norm_last_layer):
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, nlayers=2, norm_last_layer=norm_last_layer)
    ll = head.last_layer
    assert torch.nn.utils.parametrize.is_parametrized(ll, 'weight')
    g = ll.parametrizations.weight.original0
    v = ll.parametrizations.weight.original1
    assert tuple(v.shape) == (20, 8)
    assert torch.equal(g, torch.ones_like(g))
    assert g.requires_grad is (not norm_last_layer)
    assert v.requires_grad
    assert ll.bias is None
    with torch.no_grad():
        v.add_(torch.randn_like(v) * 3.0)
        v.mul_(torch.rand(20, 1) * 10 + 0.1)  # rows of very different norms
    rows = ll.weight.detach().double().numpy()
    np.testing.assert_allclose(np.sqrt((rows ** 2).sum(1)), np.ones(20), atol=1e-5)
    # the effective weight is original1's rows normalised
    vv = v.detach().double().numpy()
    np.testing.assert_allclose(rows, vv / np.linalg.norm(vv, axis=1, keepdims=True), atol=1e-6)


def test_dino_head_magnitude_gets_no_grad_when_fixed():
    head = DINOHead(12, 20, 16, 8, nlayers=2, norm_last_layer=True)
    head(torch.randn(4, 12)).pow(2).sum().backward()
    assert head.last_layer.parametrizations.weight.original0.grad is None
    assert head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0


def test_dino_head_normalises_bottleneck():
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    with torch.no_grad():
        for p in head.mlp.parameters():
            p.add_(torch.randn_like(p))
    seen = {}
    def hook(mod, inp, out):
        seen['in'] = inp[0].detach()  # returns None: the output is left alone

    head.last_layer.register_forward_hook(hook)
    x = torch.randn(2, 5, 12)
    out = head(x)
    z = head.mlp(x).detach()
    assert not torch.allclose(z.norm(dim=-1), torch.ones(2, 5), atol=1e-2)  # the mlp output itself is not unit
    norms = seen['in'].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), **TOL)
    torch.testing.assert_close(seen['in'], z / z.norm(dim=-1, keepdim=True), **TOL)
    # and the forward is exactly last_layer(normalize(mlp(x))): logits are cosines with unit prototypes
    w = head.last_layer.weight.detach()
    ref = (z / z.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(out.detach(), ref, **TOL)
    assert out.abs().max() <= 1 + 1e-5


def test_dino_head_scale_invariant_bottleneck():
    # normalisation before the last layer: scaling the final mlp linear does not change the logits
    head = DINOHead(12, 20, 16, 8, nlayers=2)
    x = torch.randn(3, 12)
    a = head(x).detach()
    with torch.no_grad():
        head.mlp[-1].weight.mul_(5.0)
        head.mlp[-1].bias.mul_(5.0)
    torch.testing.assert_close(head(x).detach(), a, **TOL)


# ---------------------------------------------------------------------------------------------------- pixel shuffle / ReconHead


def ref_pixel_shuffle(x: np.ndarray, f) -> np.ndarray:
    b, cin, d, h, w = x.shape
    f0, f1, f2 = f
    c = cin // (f0 * f1 * f2)
    out = np.zeros((b, c, d * f0, h * f1, w * f2), dtype=x.dtype)
    for bi in range(b):
        for ci in range(c):
            for z in range(d):
                for y in range(h):
                    for xx in range(w):
                        for p in range(f0):
                            for q in range(f1):
                                for r in range(f2):
                                    ch = ((ci * f0 + p) * f1 + q) * f2 + r
                                    out[bi, ci, z * f0 + p, y * f1 + q, xx * f2 + r] = x[bi, ch, z, y, xx]
    return out


@pytest.mark.parametrize('factor', [1, 2, (1, 2, 3), (3, 1, 2)])
def test_pixel_shuffle_3d_matches_loops(factor):
    f = (factor,) * 3 if isinstance(factor, int) else factor
    c = 2
    x = torch.randn(2, c * math.prod(f), 2, 3, 2)
    out = pixel_shuffle_3d(x, factor)
    assert tuple(out.shape) == (2, c, 2 * f[0], 3 * f[1], 2 * f[2])
    np.testing.assert_array_equal(out.numpy(), ref_pixel_shuffle(x.numpy(), f))


def test_pixel_shuffle_3d_reduces_to_torch_2d():
    # with factor (1, r, r) and depth 1, the 3-D shuffle is torch's 2-D PixelShuffle
    x = torch.randn(2, 3 * 4, 1, 3, 5)
    out = pixel_shuffle_3d(x, (1, 2, 2))
    ref = nn.PixelShuffle(2)(x[:, :, 0])
    torch.testing.assert_close(out[:, :, 0], ref)


@pytest.mark.parametrize('stride,out_channels', [(2, 1), ((1, 2, 3), 2), (4, 3)])
def test_recon_head_shape(stride, out_channels):
    s = (stride,) * 3 if isinstance(stride, int) else stride
    head = ReconHead(6, stride, out_channels)
    y = head(torch.randn(2, 6, 2, 3, 1))
    assert tuple(y.shape) == (2, out_channels, 2 * s[0], 3 * s[1], 1 * s[2])


def test_recon_head_values():
    # each output voxel is an affine function of its token alone: check one voxel by hand
    head = ReconHead(4, (1, 2, 3), out_channels=2)
    x = torch.randn(1, 4, 2, 2, 2)
    y = head(x).detach()
    W = head.proj.weight.detach()[:, :, 0, 0, 0]  # (2*6, 4)
    bias = head.proj.bias.detach()
    for c in range(2):
        for p in range(1):
            for q in range(2):
                for r in range(3):
                    ch = ((c * 1 + p) * 2 + q) * 3 + r
                    z, yy, xx = 1, 0, 1
                    val = float(W[ch] @ x[0, :, z, yy, xx] + bias[ch])
                    assert y[0, c, z * 1 + p, yy * 2 + q, xx * 3 + r].item() == pytest.approx(val, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- amip_loss


@pytest.mark.parametrize('c', [1, 3])
def test_amip_loss_value(c):
    b, D, H, W = 2, 3, 4, 2
    pred, target = torch.randn(b, c, D, H, W), torch.randn(b, c, D, H, W)
    mask = torch.rand(b, D, H, W) < 0.4
    loss = amip_loss(pred, target, mask)
    p, t, m = pred.numpy().astype(np.float64), target.numpy().astype(np.float64), mask.numpy()
    total, nm = 0.0, 0
    for bi in range(b):
        for z in range(D):
            for y in range(H):
                for x in range(W):
                    if m[bi, z, y, x]:
                        nm += 1
                        for ci in range(c):
                            total += abs(p[bi, ci, z, y, x] - t[bi, ci, z, y, x])
    assert nm > 0
    assert loss.item() == pytest.approx(total / (nm * c), rel=1e-5)


def test_amip_loss_full_mask_is_l1():
    pred, target = torch.randn(2, 2, 3, 3, 3), torch.randn(2, 2, 3, 3, 3)
    loss = amip_loss(pred, target, torch.ones(2, 3, 3, 3, dtype=torch.bool))
    torch.testing.assert_close(loss, F.l1_loss(pred, target), **TOL)


def test_amip_loss_zero_mask_is_zero():
    pred = torch.randn(2, 1, 2, 2, 2, requires_grad=True)
    loss = amip_loss(pred, torch.randn(2, 1, 2, 2, 2), torch.zeros(2, 2, 2, 2, dtype=torch.bool))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


def test_amip_loss_shape_errors():
    pred = torch.randn(2, 1, 4, 4, 4)
    with pytest.raises(ValueError):
        amip_loss(pred, torch.randn(2, 1, 4, 4, 2), torch.ones(2, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        amip_loss(pred, torch.randn(2, 2, 4, 4, 4), torch.ones(2, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        amip_loss(pred, pred.detach().clone(), torch.ones(2, 4, 4, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        amip_loss(pred, pred.detach().clone(), torch.ones(2, 2, 2, 2, dtype=torch.bool))


def test_amip_loss_gradient_only_at_masked_voxels():
    b, c, D = 2, 2, 3
    pred = torch.randn(b, c, D, D, D, requires_grad=True)
    target = torch.randn(b, c, D, D, D)
    mask = torch.rand(b, D, D, D) < 0.5
    amip_loss(pred, target, mask).backward()
    g = pred.grad
    m = mask.unsqueeze(1).expand_as(g)
    assert g[~m].abs().max() == 0
    assert (g[m] != 0).all()
    # d|p - t| / dp = sign(p - t), divided by the number of masked values
    ref = torch.sign(pred.detach() - target) * m / (int(mask.sum()) * c)
    torch.testing.assert_close(g, ref, **TOL)


def test_distill_loss_first_batch_centres_on_its_own_mean():
    """The centre starts from the first training batch's mean (no zero-start EMA bias), then follows the EMA."""
    K = 12
    loss_fn = DistillLoss(K, center_momentum=0.9).train()
    s, t = torch.randn(6, K), torch.randn(6, K)
    expected = ref_ce(s, t, t.mean(0), 0.1, 0.04).mean()
    assert float(loss_fn(s, t, 0.04)) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, t.mean(0))
    assert bool(loss_fn.center_ready)
    t2 = torch.randn(6, K)
    loss_fn(s, t2, 0.04)
    torch.testing.assert_close(loss_fn.center, 0.9 * t.mean(0) + 0.1 * t2.mean(0))
    fresh = DistillLoss(K).eval()  # eval before any training: the zero centre, no update
    fresh(s, t, 0.04)
    assert not bool(fresh.center_ready) and torch.equal(fresh.center, torch.zeros(K))


# ---------------------------------------------------------------------------------------------------- against collapse


def test_feature_stats_match_the_pairwise_cosines_and_simsiams_std():
    from dagman_fast.losses import feature_stats
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g)
    z = F.normalize(x.double(), dim=-1)
    cos = z @ z.t()
    ref_cos = (cos.sum() - cos.diagonal().sum()) / (7 * 6)
    st = feature_stats(x)
    assert float(st['cos']) == pytest.approx(float(ref_cos), abs=1e-6)
    assert float(st['std']) == pytest.approx(float(z.std(0).mean()), abs=1e-6)
    assert float(st['std_rel']) == pytest.approx(float(z.std(0).mean()) * math.sqrt(12), abs=1e-5)
    same = feature_stats(torch.ones(5, 12) + 1e-4 * torch.randn(5, 12, generator=g))  # identical features: collapsed
    assert float(same['cos']) > 0.999 and float(same['std']) < 1e-3
    tokens = feature_stats(x.view(1, 7, 12))  # leading dimensions are samples
    assert float(tokens['cos']) == pytest.approx(float(st['cos']), abs=1e-6)
    assert math.isnan(float(feature_stats(x[:1])['cos']))  # one sample: no pair


def test_koleo_is_minus_the_mean_log_nearest_neighbour_distance():
    from dagman_fast.losses import koleo_loss
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g, requires_grad=True)
    z = F.normalize(x.double(), dim=-1)
    d = torch.cdist(z, z) + torch.eye(9, dtype=torch.float64) * 10  # not its own neighbour
    ref = -(d.min(1).values + 1e-8).log().mean()
    loss = koleo_loss(x)
    assert float(loss.detach()) == pytest.approx(float(ref), abs=1e-5)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    spread, clumped = torch.eye(4), torch.eye(4) * 0.01 + 1  # spread samples cost less than clumped ones
    assert float(koleo_loss(spread)) < float(koleo_loss(clumped))


def ref_sinkhorn(logits, temp, iters):
    "SwAV / DINOv2's Sinkhorn-Knopp, written plainly in float64."
    q = torch.exp(logits.double() / temp).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_knopp_matches_the_reference_and_equipartitions():
    from dagman_fast.losses import sinkhorn_knopp
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 10, generator=g)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, 3).double(), ref_sinkhorn(logits, 0.1, 3), atol=1e-5, rtol=1e-4)
    big = torch.randn(64, 8, generator=g)
    q = sinkhorn_knopp(big, 0.5, 50)
    torch.testing.assert_close(q.sum(1), torch.ones(64), atol=1e-5, rtol=0)  # each sample a distribution
    torch.testing.assert_close(q.sum(0), torch.full((8,), 64 / 8), atol=1e-3, rtol=0)  # each prototype 1/K of the batch
    # with a queue: the batch's rows of the Sinkhorn-Knopp over queue + batch
    queue = torch.randn(20, 10, generator=g)
    withq = sinkhorn_knopp(logits, 0.1, 3, queue=queue)
    torch.testing.assert_close(withq.double(), ref_sinkhorn(torch.cat([queue, logits]), 0.1, 3)[20:], atol=1e-5, rtol=1e-4)
    assert sinkhorn_knopp(logits.view(2, 3, 10), 0.1, 3).shape == (2, 3, 10)


def test_distill_loss_with_sinkhorn_targets_and_a_queue():
    from dagman_fast.losses import sinkhorn_knopp
    loss = DistillLoss(10, centering='sinkhorn', queue=6).train()
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    ref = -(sinkhorn_knopp(t, 0.04, 3) * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()  # empty queue: the batch alone
    assert float(loss(s, t, 0.04)) == pytest.approx(float(ref), rel=1e-5)
    assert loss.queue.shape == (4, 10)
    t2 = torch.randn(4, 10, generator=g)
    ref2 = -(sinkhorn_knopp(t2, 0.04, 3, queue=t) * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert float(loss(s, t2, 0.04)) == pytest.approx(float(ref2), rel=1e-5)
    assert loss.queue.shape == (6, 10)  # the newest 6 rows
    torch.testing.assert_close(loss.queue, torch.cat([t, t2])[-6:])
    assert 'queue' not in loss.state_dict()  # run state, not in checkpoints
    with pytest.raises(ValueError, match='centering'):
        DistillLoss(10, centering='median')


def test_distill_stats_give_the_entropy_gap_over_the_tokens_the_loss_uses():
    loss = DistillLoss(8).train()
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    w = torch.tensor([[1., 0, 0], [0, 1, 1]])
    loss(s, t, 0.04, weight=w)
    p = loss.targets(t, 0.04, t.reshape(-1, 8).mean(0))[w.bool()]  # the first batch centres on its own mean
    st = loss.stats
    assert float(st['entropy']) == pytest.approx(float(entropy(p).mean()), rel=1e-5)
    assert float(st['mean_entropy']) == pytest.approx(float(entropy(p.mean(0))), rel=1e-5)
    assert float(st['gap']) == pytest.approx(float(st['mean_entropy'] - st['entropy']), abs=1e-6)


def test_heads_with_batchnorm_and_the_linear_head():
    from dagman_fast.losses import LinearHead, TokenBatchNorm
    h = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3, use_bn=True)
    assert sum(isinstance(m, TokenBatchNorm) for m in h.mlp) == 2  # after each hidden Linear, as DINO's use_bn
    x = torch.randn(4, 5, 16)
    assert h(x).shape == (4, 5, 32)
    bn = TokenBatchNorm(16).train()  # normalises each channel over every token of the batch
    y = bn(x)
    torch.testing.assert_close(y.reshape(-1, 16).mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    lin = LinearHead(16, 32, use_bn=False)
    torch.testing.assert_close(lin(x), x @ lin.last_layer.weight.t() + lin.last_layer.bias)
    assert isinstance(LinearHead(16, 32, use_bn=True).norm, TokenBatchNorm)


def test_token_batchnorm_survives_the_conversion_to_syncbatchnorm():
    "fastai's data-parallel training converts BatchNorm layers to SyncBatchNorm; the channels must stay last."
    from dagman_fast.losses import TokenBatchNorm
    h = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, use_bn=True)
    conv = nn.SyncBatchNorm.convert_sync_batchnorm(h)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in conv.modules()) == 2
    assert all(isinstance(m.bn, nn.SyncBatchNorm) for m in conv.modules() if isinstance(m, TokenBatchNorm))
