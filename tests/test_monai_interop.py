"""Tests of `dagman_fast.monai_interop`: `to_monai` and `from_monai` against MONAI's own `SwinTransformer` and
`SwinUNETR` (built by MONAI, random weights), state-dict layouts and prefixes, merging variants, windows read off the
weights, and the errors.
"""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer as MonaiSwinTransformer

from conftest import assert_maps_close, ours_to_monai_name, randomize_, tiny_config, tiny_encoder
from dagman_fast.encoder_configs import PRESETS
from dagman_fast.monai_interop import from_monai, monai_swin_kwargs, to_monai
from dagman_fast.swin import ViTEncoder


# ---------------------------------------------------------------------------------------------------------------
# to_monai / from_monai
# ---------------------------------------------------------------------------------------------------------------

def test_monai_name_mapping_matches_to_monai():
    "Our hand-written name mapping (used for the gradient comparison) agrees with to_monai's keys."
    enc = tiny_encoder()
    expected = {ours_to_monai_name(n) for n, _ in enc.named_parameters() if not n.startswith('mask_token')}
    sd = to_monai(enc)
    assert expected == {k for k in sd if not k.endswith('relative_position_index')}
    # MONAI's relative_position_index buffers are there (one per block) and are MONAI's values
    twin = MonaiSwinTransformer(**monai_swin_kwargs(enc.config))
    for k, v in twin.state_dict().items():
        if k.endswith('relative_position_index'):
            torch.testing.assert_close(sd[k], v, atol=0, rtol=0)


def _monai_swin(downsample: str, **kw) -> MonaiSwinTransformer:
    "A MONAI SwinTransformer with random weights, built by MONAI (not through our kwargs helper)."
    args = dict(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
                num_heads=(1, 2, 2, 4), patch_norm=True, downsample=downsample)
    args.update(kw)
    return randomize_(MonaiSwinTransformer(**args)).eval()


@pytest.mark.parametrize('downsample,merging', [
    ('mergingv2', 'v2'),   # MONAI's PatchMergingV2 <-> our 'v2'
    ('merging', 'legacy'),  # MONAI's default (v0.9) PatchMerging <-> our 'legacy'
])
def test_from_monai_module(downsample, merging):
    m = _monai_swin(downsample)
    enc = from_monai(m, attn_impl='reference').eval()
    assert enc.config.merging == merging
    assert enc.config.embed_dim == 12 and enc.config.depths == (2, 2, 2, 2)
    assert enc.config.num_heads == (1, 2, 2, 4) and enc.config.window_size == 4 and enc.config.patch_norm
    assert enc.sa is None
    x = torch.randn(2, 1, 32, 64, 64)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), m(x, normalize=True))


@pytest.mark.parametrize('prefix', [
    '',                # a plain SwinTransformer state dict
    'module.',         # saved from DataParallel / DDP
    'swinViT.',        # the encoder part of a SwinUNETR, already filtered
    'module.swinViT.',  # both wrappers
])
def test_from_monai_state_dict_prefixes(prefix):
    m = _monai_swin('merging', patch_norm=False, qkv_bias=False)
    sd = {prefix + k: v for k, v in m.state_dict().items()}
    enc = from_monai(sd, merging='legacy').eval()  # a state dict does not say its merging
    assert enc.config.merging == 'legacy' and not enc.config.patch_norm and not enc.config.qkv_bias
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), m(x, normalize=True))


def test_from_monai_state_dict_with_merging_argument():
    "A v2 state dict needs merging='v2': with it the maps match, with 'legacy' they do not, without it is refused."
    m = _monai_swin('mergingv2')
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = m(x, normalize=True)
        assert_maps_close(from_monai(m.state_dict(), merging='v2').eval().forward_features(x), ref)
        wrong = from_monai(m.state_dict(), merging='legacy').eval().forward_features(x)
    assert (wrong[1] - ref[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="merging='legacy'"):
        from_monai(m.state_dict())


def test_from_monai_refuses_swin_unetr_v2_weights():
    "use_v2=True adds residual conv blocks (layers1c...) that SwinEncoder lacks: refuse rather than drop them."
    m = MonaiSwinTransformer(**{**monai_swin_kwargs(tiny_config()), 'use_v2': True})
    with pytest.raises(ValueError, match='use_v2'):
        from_monai(m)
    with pytest.raises(ValueError, match='use_v2'):
        from_monai(m.state_dict(), merging='v2')


def _swin_unetr(**kw) -> SwinUNETR:
    args = dict(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                window_size=4, patch_size=2)
    args.update(kw)
    return SwinUNETR(**args).eval()


@pytest.mark.parametrize('downsample,merging', [
    ('merging', 'legacy'),  # SwinUNETR's default downsampling
    ('mergingv2', 'v2'),    # SwinUNETR v2-style merging
])
def test_from_monai_swin_unetr_module(downsample, merging):
    net = _swin_unetr(downsample=downsample)
    randomize_(net.swinViT)
    enc = from_monai(net).eval()
    assert enc.config.merging == merging and enc.config.patch_norm is False  # SwinUNETR's default patch_norm
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), net.swinViT(x, normalize=True))


def test_from_monai_swin_unetr_state_dict():
    "The docstring promises a SwinUNETR state dict works: the decoder weights must be ignored."
    net = _swin_unetr()
    randomize_(net.swinViT)
    enc = from_monai({'module.' + k: v for k, v in net.state_dict().items()}, merging='legacy').eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), net.swinViT(x, normalize=True))


@pytest.mark.parametrize('merging,downsample', [
    ('legacy', 'merging'),   # SwinUNETR's default
    ('v2', 'mergingv2'),     # the correct order
])
def test_to_monai_loads_into_swin_unetr(merging, downsample):
    enc = randomize_(tiny_encoder(merging=merging, patch_norm=False)).eval()
    net = _swin_unetr(downsample=downsample)
    net.swinViT.load_state_dict(to_monai(enc), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), net.swinViT(x, normalize=True))


def test_to_monai_as_module():
    enc = randomize_(tiny_encoder(merging='legacy')).eval()
    mod = to_monai(enc, as_module=True).eval()
    assert isinstance(mod, MonaiSwinTransformer)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), mod(x, normalize=True))


def test_to_monai_leaves_out_sa_and_mask_token():
    "SA inline has no MONAI counterpart: its weights stay behind, with a warning that the maps will differ."
    enc = tiny_encoder(sa_stage=3)
    with pytest.warns(UserWarning, match='no MONAI counterpart'):
        sd = to_monai(enc)
    assert not any(k.startswith(('sa.', 'mask_token')) for k in sd)
    MonaiSwinTransformer(**monai_swin_kwargs(enc.config)).load_state_dict(sd, strict=True)


def test_to_monai_rejects_other_types():
    with pytest.raises(TypeError, match='SwinEncoder'):
        to_monai(ViTEncoder(PRESETS['vit-tiny']))


def test_monai_round_trip():
    "to_monai then from_monai gives back the same weights and config (SA and mask token aside)."
    enc = randomize_(tiny_encoder(merging='v2', patch_norm=False))
    back = from_monai(to_monai(enc), merging='v2', img_size=64, sa_num_heads=4)
    assert back.config == enc.config  # cubic sizes come back as ints, as the presets write them
    a, b = enc.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        if not k.startswith('mask_token'):
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_from_monai_garbage_state_dict():
    with pytest.raises(ValueError, match='patch_embed.proj.weight'):
        from_monai({'foo.weight': torch.zeros(3), 'bar.bias': torch.zeros(2)}, merging='v2')


def test_from_monai_missing_weight_is_named():
    "A state dict with one weight missing fails loudly and names it (under our names)."
    sd = _monai_swin('merging').state_dict()
    del sd['layers2.0.blocks.1.attn.qkv.weight']
    with pytest.raises(ValueError, match=r'missing.*stages\.1\.blocks\.1\.attn\.qkv\.weight'):
        from_monai(sd, merging='legacy')


def test_from_monai_rejects_other_types():
    with pytest.raises(TypeError, match='state dict'):
        from_monai([1, 2, 3])


def test_from_monai_non_cubic_window_read_from_module():
    "A module carries its window_size: a non-cubic window needs no hint."
    m = _monai_swin('mergingv2', window_size=(4, 4, 2))
    enc = from_monai(m).eval()
    assert enc.config.window_size == (4, 4, 2)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), m(x, normalize=True))


def test_from_monai_non_cubic_window_state_dict_without_hint():
    "A state dict whose table is not (2w-1)^3 cannot be read as a cubic window: the error asks for window_size."
    m = _monai_swin('mergingv2', window_size=(4, 4, 2))
    with pytest.raises(ValueError, match='window_size'):
        from_monai(m.state_dict(), merging='v2')


def test_from_monai_state_dict_cubic_looking_window_is_checked():
    "(1, 2, 5) has 27 = 3^3 table rows: read as 2^3, the stored relative_position_index exposes the guess."
    m = _monai_swin('mergingv2', window_size=(1, 2, 5))
    with pytest.raises(ValueError, match='window_size'):
        from_monai(m.state_dict(), merging='v2')
    enc = from_monai(m.state_dict(), merging='v2', window_size=(1, 2, 5)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), m(x, normalize=True))


def test_from_monai_non_cubic_window_with_override():
    m = _monai_swin('mergingv2', window_size=(4, 4, 2))
    enc = from_monai(m, window_size=(4, 4, 2)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), m(x, normalize=True))


def test_from_monai_does_not_misread_a_non_cubic_window():
    m = _monai_swin('mergingv2', window_size=(1, 2, 5))
    try:
        enc = from_monai(m).eval()
    except ValueError:
        return  # refusing to guess is fine
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_maps_close(enc.forward_features(x), m(x, normalize=True))
