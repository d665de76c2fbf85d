"""Tests of `dagman_fast.swin`: the maps and parameter gradients against MONAI's, semantic attention, masking, errors,
checkpointing, presets and the ViT baseline.

The oracle for the Swin encoder is MONAI's `SwinTransformer`, built by MONAI itself and given our weights through
`to_monai` with a strict `load_state_dict` (its attention is eager PyTorch, `use_flash_attention=False`).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from conftest import (GRAD_TOL, MAP_TOL, assert_maps_close, map_loss, monai_twin, ours_to_monai_name, randomize_,
                      tiny_config, tiny_encoder)
from dagman_fast.encoder_configs import PRESETS, encoder_config
from dagman_fast.swin import EncoderOutput, SwinEncoder, ViTEncoder, build_encoder


# ---------------------------------------------------------------------------------------------------------------
# 1. MONAI equivalence of forward_features
# ---------------------------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # cubic input, each merging variant against its MONAI downsample, the eager oracle path
    pytest.param('v2', (64, 64, 64), 4, True, 'reference', id='v2-cubic64-reference'),
    pytest.param('legacy', (64, 64, 64), 4, True, 'reference', id='legacy-cubic64-reference'),
    # the same with the SDPA path (flash forward under no_grad)
    pytest.param('v2', (64, 64, 64), 4, True, 'sdpa', id='v2-cubic64-sdpa'),
    pytest.param('legacy', (64, 64, 64), 4, True, 'sdpa', id='legacy-cubic64-sdpa'),
    # non-cubic input: the window order and merging must keep d, h, w apart
    pytest.param('v2', (32, 64, 96), 4, True, 'sdpa', id='v2-noncubic-sdpa'),
    pytest.param('legacy', (32, 64, 96), 4, True, 'reference', id='legacy-noncubic-reference'),
    # stage grids 48, 24, 12, 6: the 6^3 stage is padded to 8^3 for windows of 4 (padding after norm1, masks)
    pytest.param('v2', (96, 96, 96), 4, True, 'sdpa', id='v2-padded96-sdpa'),
    pytest.param('legacy', (96, 96, 96), 4, True, 'reference', id='legacy-padded96-reference'),
    # stage grids 16, 8, 4, 2: the last stage is smaller than the window (clipped window, no shift)
    pytest.param('v2', (32, 32, 32), 4, True, 'sdpa', id='v2-clipped32-sdpa'),
    pytest.param('legacy', (32, 32, 32), 4, True, 'reference', id='legacy-clipped32-reference'),
    # non-cubic window: relative position index and shift mask with unequal axes (and clipping on the last axis)
    pytest.param('v2', (64, 64, 64), (4, 4, 2), True, 'sdpa', id='v2-window442-sdpa'),
    pytest.param('legacy', (32, 64, 64), (4, 4, 2), True, 'reference', id='legacy-window442-reference'),
    # no LayerNorm after the patch embedding
    pytest.param('v2', (64, 64, 64), 4, False, 'sdpa', id='v2-nopatchnorm-sdpa'),
    pytest.param('legacy', (32, 64, 96), 4, False, 'reference', id='legacy-nopatchnorm-reference'),
]


@pytest.mark.parametrize('merging,shape,window,patch_norm,impl', FORWARD_CASES)
def test_forward_features_matches_monai(merging, shape, window, patch_norm, impl):
    enc = randomize_(tiny_encoder(merging=merging, window_size=window, patch_norm=patch_norm, attn_impl=impl)).eval()
    twin = monai_twin(enc).eval()
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        ours, theirs = enc.forward_features(x), twin(x, normalize=True)
    assert len(ours) == 5
    assert_maps_close(ours, theirs)


@pytest.mark.parametrize('impl', [
    'reference',  # eager path
    'sdpa',  # flash forward, with the shift mask broadcast over a batch of two
])
def test_forward_features_matches_monai_unnormalized_batch2(impl):
    "normalize=False (the raw stage outputs) and two images in the batch (masks broadcast over images)."
    enc = randomize_(tiny_encoder(merging='legacy', attn_impl=impl)).eval()
    twin = monai_twin(enc).eval()
    x = torch.randn(2, 1, 32, 64, 64)
    with torch.no_grad():
        ours, theirs = enc.forward_features(x, normalize=False), twin(x, normalize=False)
    scale = max(t.abs().max().item() for t in theirs)
    assert_maps_close(ours, theirs, atol=1e-5 * max(1.0, scale), rtol=1e-5)


def test_forward_features_equals_forward_features_of_forward():
    "forward (SA off) returns the same maps as forward_features, and nothing else."
    enc = randomize_(tiny_encoder()).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out, maps = enc(x), enc.forward_features(x)
    assert isinstance(out, EncoderOutput)
    assert out.tokens is None and out.attn is None and out.attn_heads is None and out.cls is None
    assert_maps_close(out.features, maps, atol=0, rtol=0)


def test_merging_variants_differ():
    "v2 and legacy concatenate the 8 sub-voxels in different orders: the same weights give different stage maps."
    a = randomize_(tiny_encoder(merging='v2')).eval()
    b = tiny_encoder(merging='legacy').eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        fa, fb = a.forward_features(x), b.forward_features(x)
    torch.testing.assert_close(fa[0], fb[0], atol=0, rtol=0)  # before any merging: identical
    assert (fa[1] - fb[1]).abs().max() > 1e-3


GRAD_CASES = [
    # eager path, clipped last stage, batch 2
    pytest.param('v2', (32, 32, 32), 4, 'reference', 2, id='v2-clipped32-reference-b2'),
    # the default 'auto' (on the CPU under autograd: eager or recomputing backward by attention-matrix size)
    pytest.param('legacy', (32, 32, 32), 4, 'auto', 2, id='legacy-clipped32-auto-b2'),
    # CPU custom-autograd SDPA path, backward chunks (32 or 64 windows) that divide the windows of every stage
    pytest.param('legacy', (32, 64, 64), 4, 'sdpa', 2, id='legacy-32x64x64-sdpa-b2'),
    # padded stage (6^3 -> 8^3) through the eager path
    pytest.param('v2', (96, 96, 96), 4, 'reference', 1, id='v2-padded96-reference-b1'),
    # padded stage through the SDPA backward (one image, so the chunking bug below cannot show)
    pytest.param('legacy', (96, 96, 96), 4, 'sdpa', 1, id='legacy-padded96-sdpa-b1'),
    # non-cubic window through the SDPA backward
    pytest.param('v2', (32, 32, 32), (4, 4, 2), 'sdpa', 2, id='v2-window442-sdpa-b2'),
    # non-cubic input, SDPA backward, one image: stage 1 has 384 windows, several backward chunks
    pytest.param('v2', (32, 64, 96), 4, 'sdpa', 1, id='v2-noncubic-sdpa-b1'),
    # the same with two images: chunks must restart at each image's first window (shift mask slices)
    pytest.param('v2', (32, 64, 96), 4, 'sdpa', 2, id='v2-noncubic-sdpa-b2'),
]


@pytest.mark.parametrize('merging,shape,window,impl,batch', GRAD_CASES)
def test_parameter_gradients_match_monai(merging, shape, window, impl, batch):
    _check_gradients_against_monai(tiny_encoder(merging=merging, window_size=window, attn_impl=impl), shape, batch)


@pytest.mark.parametrize('batch', [
    1,  # one image: the backward chunks cover the windows whatever their size
    2,  # two images: a backward chunk meets the end of the first image (42 does not divide 64)
])
def test_parameter_gradients_match_monai_three_heads(batch):
    "Three heads in stage 1: backward chunks of 128 // 3 = 42 windows against 64 windows per image (32^3 input)."
    _check_gradients_against_monai(tiny_encoder(num_heads=(3, 2, 2, 4), attn_impl='sdpa'), (32, 32, 32), batch)


def _check_gradients_against_monai(enc, shape, batch):
    enc = randomize_(enc).eval()
    twin = monai_twin(enc).eval()
    x = torch.randn(batch, 1, *shape)
    ours, theirs = enc.forward_features(x), twin(x, normalize=True)
    assert_maps_close([o.detach() for o in ours], [t.detach() for t in theirs])
    map_loss(ours).backward()
    map_loss(theirs).backward()
    theirs_grads = {n: p.grad for n, p in twin.named_parameters()}
    checked = 0
    for name, p in enc.named_parameters():
        if name.startswith('mask_token'):
            assert p.grad is None  # no mask given: the mask token takes no part
            continue
        g = theirs_grads[ours_to_monai_name(name)]
        assert p.grad is not None and g is not None, name
        torch.testing.assert_close(p.grad, g, **GRAD_TOL, msg=lambda m, name=name: f'{name}: {m}')
        checked += 1
    assert checked == len(theirs_grads)


# ---------------------------------------------------------------------------------------------------------------
# 2. Semantic attention
# ---------------------------------------------------------------------------------------------------------------

def _capture_input(store: dict, key: str):
    "A forward pre-hook (with kwargs) that keeps the first positional input; returns None, so changes nothing."
    def hook(module, args, kwargs):
        store[key] = args[0].detach()
    return hook


def _capture_output(store: dict, key: str, index: int | None = None):
    "A forward hook that keeps the output (or its `index`-th element); returns None, so changes nothing."
    def hook(module, args, output):
        store[key] = (output if index is None else output[index]).detach()
    return hook


def _sa_encoder(**kw) -> SwinEncoder:
    return randomize_(tiny_encoder(sa_stage=kw.pop('sa_stage', 3), **kw), std=0.05).eval()


@pytest.mark.parametrize('sa_stage,channels,grid', [
    (3, 96, (4, 4, 4)),  # the paper's choice: after stage 3
    (1, 24, (16, 16, 16)),  # early stage, many tokens
    (2, 48, (8, 8, 8)),  # another middle stage
    (4, 192, (2, 2, 2)),  # after the last stage
])
def test_sa_output_shapes(sa_stage, channels, grid):
    enc = _sa_encoder(sa_stage=sa_stage)
    captured = {}
    enc.sa.blocks[-1].register_forward_hook(_capture_output(captured, 'last', index=0))
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        out = enc(x)
    n = grid[0] * grid[1] * grid[2]
    assert out.grid == grid
    assert out.tokens.shape == (2, 1 + n, channels)
    assert out.cls.shape == (2, channels) and out.patch_tokens.shape == (2, n, channels)
    assert out.attn.shape == (2, n) and out.attn_heads.shape == (2, 4, n)
    assert out.features[sa_stage].shape == (2, channels, *grid)
    torch.testing.assert_close(out.attn, out.attn_heads.mean(1), atol=1e-7, rtol=1e-6)
    # softmax rows over 1 + n keys: the patch part is positive and sums to less than one ([CLS] keeps some)
    assert (out.attn_heads > 0).all() and (out.attn_heads.sum(-1) < 1).all()
    # the tokens are the SA's final LayerNorm applied to its last block's output
    with torch.no_grad():
        expected = enc.sa.norm(captured['last'])
    torch.testing.assert_close(out.tokens, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('impl', [
    'reference',  # Attention computes the full matrix and reads row 0
    'sdpa',  # Attention computes one extra [CLS] row beside SDPA
])
def test_sa_cls_attention_by_hand(impl):
    enc = _sa_encoder(attn_impl=impl)
    captured = {}
    last = enc.sa.blocks[-1]
    last.register_forward_pre_hook(_capture_input(captured, 'x'), with_kwargs=True)
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        out = enc(x)
    t = captured['x']  # (b, 1 + n, c) tokens entering the last SA block
    nh = enc.config.sa_num_heads
    y = F.layer_norm(t, t.shape[-1:], last.norm1.weight, last.norm1.bias)
    qkv = y @ last.attn.qkv.weight.T + last.attn.qkv.bias
    q, k, _ = rearrange(qkv, 'b n (three nh hd) -> three b nh n hd', three=3, nh=nh)
    scale = (t.shape[-1] // nh) ** -0.5
    logits = torch.einsum('bhd,bhnd->bhn', q[:, :, 0] * scale, k)
    expected = torch.softmax(logits, -1)[:, :, 1:]
    torch.testing.assert_close(out.attn_heads, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.attn, expected.mean(1), atol=1e-6, rtol=1e-5)


def _without_sa(enc: SwinEncoder) -> SwinEncoder:
    "The same encoder with SA off, holding the same weights minus sa.*."
    plain = SwinEncoder(replace(enc.config, sa_stage=None)).eval()
    sd = {k: v for k, v in enc.state_dict().items() if not k.startswith('sa.')}
    plain.load_state_dict(sd, strict=True)
    return plain


def test_sa_side_mode_leaves_maps_unchanged():
    enc = _sa_encoder(sa_mode='side')
    plain = _without_sa(enc)
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        ref = plain.forward_features(x)
        assert_maps_close(enc.forward_features(x), ref, atol=0, rtol=0)
        out = enc(x)  # forward runs SA beside the stages: same maps, plus SA outputs
    assert_maps_close(out.features, ref, atol=0, rtol=0)
    assert out.tokens is not None and out.attn.shape == (2, 64)


@pytest.mark.parametrize('sa_stage', [
    3,  # the default
    2,  # SA earlier: maps 0..1 unchanged, 2..4 changed
])
def test_sa_inline_mode_changes_only_later_maps(sa_stage):
    enc = _sa_encoder(sa_mode='inline', sa_stage=sa_stage)
    plain = _without_sa(enc)
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        ref, ff, fwd = plain.forward_features(x), enc.forward_features(x), enc(x).features
    assert_maps_close(ff, fwd, atol=0, rtol=0)  # forward_features runs SA inline too
    for i in range(sa_stage):  # the patch embedding and the stages before the SA stage
        torch.testing.assert_close(ff[i], ref[i], atol=0, rtol=0)
    for i in range(sa_stage, 5):  # the SA stage's own map is the SA output; the later stages take it as input
        assert (ff[i] - ref[i]).abs().max() > 1e-3, f'map {i} should change'


def test_sa_inline_residual_continues():
    "Inline: the map after the SA stage is the stage's merging applied to the SA patch tokens before the final norm."
    enc = _sa_encoder(sa_mode='inline', sa_stage=3)
    captured = {}
    enc.sa.blocks[-1].register_forward_hook(_capture_output(captured, 't', index=0))
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        feats = enc.forward_features(x)
        t = captured['t'][:, 1:].reshape(1, 4, 4, 4, -1)
        torch.testing.assert_close(feats[3], F.layer_norm(t, t.shape[-1:]).permute(0, 4, 1, 2, 3),
                                   atol=1e-6, rtol=1e-5)
        expected4 = enc.stages[3](t)
        torch.testing.assert_close(feats[4], F.layer_norm(expected4, expected4.shape[-1:]).permute(0, 4, 1, 2, 3),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('shape,grid', [
    ((32, 32, 32), (2, 2, 2)),  # smaller than img_size=64: position embedding shrinks 4^3 -> 2^3
    ((64, 64, 96), (4, 4, 6)),  # non-cubic: 4^3 -> 4x4x6
])
def test_sa_position_embedding_resizes(shape, grid):
    enc = _sa_encoder()
    captured = {}
    enc.stages[2].register_forward_hook(_capture_output(captured, 't'))
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        out = enc(x)
    n = grid[0] * grid[1] * grid[2]
    assert out.grid == grid and out.tokens.shape == (2, 1 + n, 96) and out.attn_heads.shape == (2, 4, n)
    # the SA module recomputed by hand with a trilinearly resized position embedding
    sa, t = enc.sa, captured['t']
    pos = sa.pos_embed[:, 1:].reshape(1, 4, 4, 4, 96).permute(0, 4, 1, 2, 3)
    pos = F.interpolate(pos, size=grid, mode='trilinear', align_corners=False).flatten(2).transpose(1, 2)
    with torch.no_grad():
        h = torch.cat([sa.cls_token.expand(2, -1, -1), t.reshape(2, n, 96)], 1)
        h = h + torch.cat([sa.pos_embed[:, :1], pos], 1)
        for blk in sa.blocks:
            h = h + blk.attn(blk.norm1(h))
            h = h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))
        expected = sa.norm(h)
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 3. Mask token
# ---------------------------------------------------------------------------------------------------------------

def _masked_setup():
    enc = _sa_encoder()
    x = torch.randn(2, 1, 32, 32, 64)
    mask = torch.rand(2, 16, 16, 32) < 0.4
    return enc, x, mask


def test_mask_token_replaces_patch_embeddings():
    enc, x, mask = _masked_setup()
    with torch.no_grad():
        plain, masked = enc(x), enc(x, mask=mask)
    f0, ref0 = masked.features[0].permute(0, 2, 3, 4, 1), plain.features[0].permute(0, 2, 3, 4, 1)  # b d h w c
    token = F.layer_norm(enc.mask_token.detach(), (12,))
    torch.testing.assert_close(f0[mask], token.expand(int(mask.sum()), -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f0[~mask], ref0[~mask], atol=0, rtol=0)
    # the mask changes everything downstream
    for i in range(1, 5):
        assert (masked.features[i] - plain.features[i]).abs().max() > 1e-3
    assert (masked.attn - plain.attn).abs().max() > 0


def test_mask_hides_the_input_under_it():
    "Changing the voxels of masked patches only changes nothing at all: they are fully replaced."
    enc, x, mask = _masked_setup()
    voxel_mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)[:, None]
    x2 = torch.where(voxel_mask, torch.randn_like(x), x)
    with torch.no_grad():
        a, b = enc(x, mask=mask), enc(x2, mask=mask)
        c = enc(x2)
    assert_maps_close(a.features, b.features, atol=0, rtol=0)
    torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)
    assert (c.features[0] - a.features[0]).abs().max() > 1e-3  # without the mask x2 does differ


def test_mask_flattened_is_accepted():
    enc, x, mask = _masked_setup()
    with torch.no_grad():
        a, b = enc(x, mask=mask), enc(x, mask=mask.flatten(1))
    assert_maps_close(a.features, b.features, atol=0, rtol=0)
    torch.testing.assert_close(a.attn_heads, b.attn_heads, atol=0, rtol=0)


def test_mask_token_gets_gradient():
    enc, x, mask = _masked_setup()
    enc(x, mask=mask).features[0].square().mean().backward()
    assert enc.mask_token.grad is not None and enc.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize('bad', [
    torch.zeros(2, 16, 16, 16, dtype=torch.bool),  # wrong grid
    torch.zeros(2, 16 * 16 * 16, dtype=torch.bool),  # wrong flattened length
    torch.zeros(1, 16, 16, 32, dtype=torch.bool),  # wrong batch
    torch.zeros(2, 1, 16, 16, 32, dtype=torch.bool),  # voxel-style channel axis
])
def test_mask_wrong_shape(bad):
    enc, x, _ = _masked_setup()
    with pytest.raises(ValueError, match=r'\(2, 16, 16, 32\)'):
        enc(x, mask=bad)


@pytest.mark.parametrize('bad', [
    torch.zeros(2, 16, 16, 32),  # float 0/1 mask
    torch.zeros(2, 16, 16, 32, dtype=torch.long),  # integer mask
    [[True]],  # not a tensor
])
def test_mask_wrong_type(bad):
    enc, x, _ = _masked_setup()
    with pytest.raises(TypeError, match='bool'):
        enc(x, mask=bad)


# ---------------------------------------------------------------------------------------------------------------
# 4. Input errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape,match', [
    ((1, 2, 32, 32, 32), r'1 input channel'),  # wrong channel count
    ((1, 32, 32, 32), r'5-D'),  # missing batch axis
    ((32, 32, 32), r'5-D'),  # missing batch and channel axes
    ((1, 1, 48, 32, 32), r'divisible by \(32, 32, 32\)'),  # 48 is not a multiple of 2 * 2^4
    ((1, 1, 32, 32, 40), r'divisible'),  # last axis only
])
def test_bad_input_shape(shape, match):
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=match):
        enc.forward_features(torch.zeros(shape))
    with pytest.raises(ValueError, match=match):
        enc(torch.zeros(shape))


def test_bad_input_type():
    with pytest.raises(TypeError, match='torch.Tensor'):
        tiny_encoder()(torch.zeros(1, 1, 32, 32, 32).numpy())


def test_input_channels_config():
    enc = tiny_encoder(in_channels=3)
    with torch.no_grad():
        assert enc(torch.zeros(1, 3, 32, 32, 32)).features[0].shape == (1, 12, 16, 16, 16)
    with pytest.raises(ValueError, match='3 input channel'):
        enc(torch.zeros(1, 1, 32, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# 5. Gradient checkpointing and drop path
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('impl', [
    'reference',  # eager attention recomputed under checkpoint
    'sdpa',  # custom autograd Function recomputed under checkpoint
])
def test_checkpointing_same_outputs_and_gradients(impl):
    a = _sa_encoder(attn_impl=impl)
    b = SwinEncoder(replace(a.config, use_checkpoint=True)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    mask = torch.rand(2, 16, 16, 16) < 0.3
    oa, ob = a(x, mask=mask), b(x, mask=mask)
    assert_maps_close(ob.features, oa.features, atol=0, rtol=0)
    (map_loss(oa.features) + oa.tokens.square().mean()).backward()
    (map_loss(ob.features) + ob.tokens.square().mean()).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.grad is not None and pb.grad is not None, n
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f'{n}: {m}')


@pytest.mark.parametrize('use_checkpoint,grad,calls', [
    (True, True, 2),  # checkpointed: each residual branch of the block runs again during backward
    (False, True, 1),  # not checkpointed: once
    (True, False, 1),  # under no_grad checkpointing is skipped
])
def test_checkpointing_recomputes_blocks(use_checkpoint, grad, calls):
    enc = tiny_encoder(use_checkpoint=use_checkpoint)
    counts = {'attn_residual': 0, 'mlp_residual': 0}
    blk = enc.stages[1].blocks[1]

    def counting(name):  # (forward hooks do not fire in the checkpoint's recomputation)
        branch = getattr(blk, name)

        def run(*args, **kwargs):
            counts[name] += 1
            return branch(*args, **kwargs)
        return run
    for name in counts:
        setattr(blk, name, counting(name))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.set_grad_enabled(grad):
        loss = map_loss(enc.forward_features(x))
        if grad:
            loss.backward()
    assert counts == {'attn_residual': calls, 'mlp_residual': calls}


def test_checkpointing_with_drop_path_in_train_mode():
    "Checkpointing replays the RNG state: train mode with drop path gives the same outputs and gradients."
    a = randomize_(tiny_encoder(drop_path_rate=0.5)).train()
    b = SwinEncoder(replace(a.config, use_checkpoint=True)).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 32, 32, 32)
    torch.manual_seed(1)
    la = map_loss(a.forward_features(x))
    torch.manual_seed(1)
    lb = map_loss(b.forward_features(x))
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-6)
    la.backward()
    lb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
            continue
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f'{n}: {m}')


def test_drop_path_eval_has_no_effect():
    a = randomize_(tiny_encoder(drop_path_rate=0.5)).eval()
    b = tiny_encoder(drop_path_rate=0.0).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(a.forward_features(x), b.forward_features(x), atol=0, rtol=0)


def test_drop_path_train_changes_outputs():
    enc = randomize_(tiny_encoder(drop_path_rate=0.5)).train()
    x = torch.randn(4, 1, 32, 32, 32)
    with torch.no_grad():
        train = enc.forward_features(x)
        evald = enc.eval().forward_features(x)
    torch.testing.assert_close(train[0], evald[0], atol=0, rtol=0)  # the patch embedding has no drop path
    assert (train[4] - evald[4]).abs().max() > 1e-3
    # drop path rates grow linearly with depth to drop_path_rate, as in MONAI
    rates = [getattr(blk.drop_path, 'drop_prob', 0.0) for s in enc.stages for blk in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.5, 8), atol=1e-6, rtol=0)


def test_train_mode_without_drop_path_equals_eval():
    "No dropout anywhere: with drop_path_rate 0, train and eval modes agree."
    enc = randomize_(tiny_encoder()).train()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), enc.eval().forward_features(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# 6. Presets and build_encoder
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kw', [
    dict(patch_size=0),  # zero patch
    dict(window_size=-4),  # negative window
])
def test_encoder_rejects_non_positive_int_sizes(kw):
    "An int size that is not positive is rejected when the encoder is built, naming the field."
    with pytest.raises(ValueError, match=next(iter(kw))):
        SwinEncoder(tiny_config(**kw))


def test_build_encoder_and_encoder_config():
    enc = build_encoder('swin-tiny', attn_impl='reference', sa_stage=None)
    assert isinstance(enc, SwinEncoder) and enc.config == replace(PRESETS['swin-tiny'], attn_impl='reference',
                                                                  sa_stage=None)
    assert isinstance(build_encoder(PRESETS['vit-tiny'], depth=1), ViTEncoder)
    assert isinstance(build_encoder(tiny_config()), SwinEncoder)
    with pytest.raises(ValueError, match=r"preset must be one of .*Did you mean 'swin-tiny'"):
        encoder_config('swin-tyny')
    with pytest.raises(TypeError, match='embed_dims'):
        encoder_config('swin-tiny', embed_dims=3)


def test_state_dict_has_no_relative_position_index():
    enc = tiny_encoder(sa_stage=3)
    sd = enc.state_dict()
    assert not any('relative_position_index' in k for k in sd)
    # ... but the buffers exist and are MONAI's index
    buffers = [n for n, _ in enc.named_buffers() if n.endswith('relative_position_index')]
    assert len(buffers) == 8
    # a state dict round trip keeps the encoder whole
    other = SwinEncoder(enc.config)
    other.load_state_dict(sd, strict=True)


def test_feature_channels():
    assert tiny_encoder().feature_channels == [12, 24, 48, 96, 192]
    assert SwinEncoder(PRESETS['swin-smit']).feature_channels == [48, 96, 192, 384, 768]


def test_swin_smit_preset_shapes():
    "The paper's backbone (its widths, depths and heads) on a 64^3 crop: every map halves, as at 128^3."
    enc = build_encoder('swin-smit').eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        out = enc(x)
    shapes = [tuple(f.shape) for f in out.features]
    assert shapes == [(1, 48, 32, 32, 32), (1, 96, 16, 16, 16), (1, 192, 8, 8, 8), (1, 384, 4, 4, 4),
                      (1, 768, 2, 2, 2)]
    assert out.tokens.shape == (1, 65, 384) and out.grid == (4, 4, 4)
    assert out.attn.shape == (1, 64) and out.attn_heads.shape == (1, 8, 64)
    assert all(torch.isfinite(f).all() for f in out.features)
    torch.testing.assert_close(out.attn.sum(), out.attn_heads.sum(-1).mean(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 7. ViT baseline
# ---------------------------------------------------------------------------------------------------------------

def _vit(impl='reference', **kw) -> ViTEncoder:
    return randomize_(ViTEncoder(PRESETS['vit-tiny'], attn_impl=impl, **kw), std=0.05).eval()


def test_vit_tiny_shapes():
    enc = _vit()
    with torch.no_grad():
        out = enc(torch.randn(2, 1, 32, 32, 32))
    assert len(out.features) == 1 and out.features[0].shape == (2, 96, 4, 4, 4)
    assert out.tokens.shape == (2, 65, 96) and out.cls.shape == (2, 96) and out.patch_tokens.shape == (2, 64, 96)
    assert out.attn.shape == (2, 64) and out.attn_heads.shape == (2, 4, 64) and out.grid == (4, 4, 4)
    torch.testing.assert_close(out.attn, out.attn_heads.mean(1), atol=1e-7, rtol=1e-6)
    assert (out.attn_heads > 0).all() and (out.attn_heads.sum(-1) < 1).all()
    # the feature map is the normalised patch tokens laid out on the grid
    torch.testing.assert_close(out.features[0], rearrange(out.patch_tokens, 'b (d h w) c -> b c d h w', d=4, h=4),
                               atol=0, rtol=0)


def test_vit_other_input_size():
    "The position embedding is resized for another grid (6^3 instead of 4^3)."
    with torch.no_grad():
        out = _vit()(torch.randn(1, 1, 48, 48, 48))
    assert out.features[0].shape == (1, 96, 6, 6, 6) and out.attn.shape == (1, 216) and out.grid == (6, 6, 6)


def test_vit_reference_vs_sdpa():
    ref = _vit('reference')
    fast = ViTEncoder(replace(ref.config, attn_impl='sdpa')).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert_maps_close(b.features, a.features)
    torch.testing.assert_close(b.tokens, a.tokens, **MAP_TOL)
    torch.testing.assert_close(b.attn_heads, a.attn_heads, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.attn, a.attn, atol=1e-6, rtol=1e-5)
    # gradients as well
    map_loss(ref(x).features).backward()
    map_loss(fast(x).features).backward()
    for (n, pa), (_, pb) in zip(ref.named_parameters(), fast.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
            continue
        torch.testing.assert_close(pb.grad, pa.grad, **GRAD_TOL, msg=lambda m, n=n: f'{n}: {m}')


def test_vit_cls_attention_by_hand():
    enc = _vit('sdpa')
    captured = {}
    last = enc.blocks[-1]
    last.register_forward_pre_hook(_capture_input(captured, 'x'), with_kwargs=True)
    with torch.no_grad():
        out = enc(torch.randn(2, 1, 32, 32, 32))
    t = captured['x']
    y = F.layer_norm(t, (96,), last.norm1.weight, last.norm1.bias)
    q, k, _ = rearrange(y @ last.attn.qkv.weight.T + last.attn.qkv.bias, 'b n (three nh hd) -> three b nh n hd',
                        three=3, nh=4)
    expected = torch.softmax(torch.einsum('bhd,bhnd->bhn', q[:, :, 0] * 24 ** -0.5, k), -1)[:, :, 1:]
    torch.testing.assert_close(out.attn_heads, expected, atol=1e-6, rtol=1e-5)


def test_vit_mask_token():
    enc = _vit()
    x = torch.randn(2, 1, 32, 32, 32)
    mask = torch.rand(2, 4, 4, 4) < 0.5
    voxel_mask = mask.repeat_interleave(8, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)[:, None]
    x2 = torch.where(voxel_mask, torch.randn_like(x), x)
    with torch.no_grad():
        plain, a, b, flat = enc(x), enc(x, mask=mask), enc(x2, mask=mask), enc(x, mask=mask.flatten(1))
    torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)  # masked voxels are invisible
    torch.testing.assert_close(a.tokens, flat.tokens, atol=0, rtol=0)
    assert (a.tokens - plain.tokens).abs().max() > 1e-3
    # a fully masked input: the output no longer depends on the input at all
    full = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        o1, o2 = enc(x, mask=full), enc(torch.randn_like(x), mask=full)
    torch.testing.assert_close(o1.tokens, o2.tokens, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r'\(2, 4, 4, 4\)'):
        enc(x, mask=torch.zeros(2, 8, 8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match='bool'):
        enc(x, mask=mask.float())


def test_vit_checkpointing():
    a = _vit('sdpa')
    b = ViTEncoder(replace(a.config, use_checkpoint=True)).eval()
    b.load_state_dict(a.state_dict())
    calls = []
    for enc in (a, b):  # count the first block's forward calls, recomputation included
        forward = enc.blocks[0].forward
        enc.blocks[0].forward = lambda *args, _f=forward, _e=enc, **kw: calls.append(_e is b) or _f(*args, **kw)
    x = torch.randn(1, 1, 32, 32, 32)
    oa, ob = a(x), b(x)
    torch.testing.assert_close(ob.tokens, oa.tokens, atol=0, rtol=0)
    map_loss([oa.tokens]).backward()
    map_loss([ob.tokens]).backward()
    assert calls.count(False) == 1 and calls.count(True) == 2  # b recomputed its block during backward
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f'{n}: {m}')


def test_vit_bad_input():
    enc = _vit()
    with pytest.raises(ValueError, match=r'divisible by \(8, 8, 8\)'):
        enc(torch.zeros(1, 1, 32, 32, 36))
    with pytest.raises(ValueError, match='5-D'):
        enc(torch.zeros(1, 32, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# The stage's window-order token layout against the grid layout
# ---------------------------------------------------------------------------------------------------------------

def _set_window_layout(enc, on: bool):
    from dagman_fast.swin import SwinStage
    for m in enc.modules():
        if isinstance(m, SwinStage):
            m.window_layout = on
    return enc


@pytest.mark.parametrize('impl,merging,depths,checkpointed', [
    ('reference', 'v2', (2, 2, 2, 2), False),
    ('sdpa', 'legacy', (2, 2, 2, 2), False),
    ('sdpa', 'v2', (1, 3, 2, 1), True),  # odd depths: the last block's windows are unshifted or shifted
])
def test_window_layout_equals_grid_layout(impl, merging, depths, checkpointed):
    "The same forward to the bit and the same gradients to float rounding, with a mask token and SA."
    torch.manual_seed(0)
    a = randomize_(_sa_encoder(attn_impl=impl, merging=merging, depths=depths, use_checkpoint=checkpointed))
    x, mask = torch.randn(2, 1, 64, 64, 64), torch.rand(2, 32, 32, 32) < 0.4
    runs = []
    for on in (False, True):
        _set_window_layout(a, on).zero_grad()
        out = a(x, mask=mask)
        (map_loss(out.features) + out.tokens.square().mean()).backward()
        runs.append((out.features, {n: p.grad.clone() for n, p in a.named_parameters()}))
    assert_maps_close(runs[1][0], runs[0][0], atol=0, rtol=0)
    for n, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f'{n}: {m}')
    assert all(s._moves for s in a.stages), 'every 64^3 stage divides into windows: the layout should be taken'


def test_window_layout_falls_back_where_it_cannot_apply():
    "A padded stage, a layout turned off or an attention probe keep the grid layout (and the results)."
    enc = randomize_(tiny_encoder(attn_impl='reference')).eval()
    with torch.no_grad():
        enc.forward_features(torch.randn(1, 1, 96, 96, 96))  # stage grids 48, 24, 12, 6: the 6^3 stage is padded
    assert [bool(s._moves) for s in enc.stages] == [True, True, True, False]
    stage = enc.stages[0]
    x = torch.randn(1, 8, 8, 8, 12)
    plans = stage.plans((8, 8, 8), x.device)
    assert stage._use_window_layout(x, plans)
    stage.blocks[1].attn_probe = lambda *a: None
    assert not stage._use_window_layout(x, plans)
    stage.blocks[1].attn_probe, stage.window_layout = None, False
    assert not stage._use_window_layout(x, plans)


@pytest.mark.parametrize('merging', ['v2', 'legacy'])
def test_merge_order_gathers_what_patch_merging_concatenates(merging):
    from dagman_fast.swin import PatchMerging
    pm = randomize_(PatchMerging(5, merging))
    x = torch.randn(2, 4, 6, 8, 5)
    order = pm.merge_order((4, 6, 8))
    assert sorted(order.tolist()) == list(range(4 * 6 * 8))
    gathered = x.flatten(1, 3)[:, order].view(2, 2, 3, 4, 40)
    torch.testing.assert_close(pm(gathered, gathered=True), pm(x), atol=0, rtol=0)
