"""Tests of `dagman_fast.encoder_configs`: JSON round trips, frozen configs, and the checks of every field."""
from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace

import pytest

from conftest import tiny_config
from dagman_fast.encoder_configs import PRESETS, SwinConfig, ViTConfig


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [
    PRESETS['swin-smit'],  # default Swin preset (int sizes)
    tiny_config(window_size=(4, 4, 2), img_size=(64, 64, 96), merging='legacy', sa_stage=2, sa_mode='side'),  # tuples
    PRESETS['vit-tiny'],  # ViT config
    ViTConfig(img_size=(32, 32, 64), patch_size=(8, 8, 16), attn_impl='reference'),  # ViT with tuples
])
def test_config_json_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d['arch'] == ('swin' if isinstance(cfg, SwinConfig) else 'vit')
    back = type(cfg).from_dict(d)
    assert back == cfg
    assert hash(back) == hash(cfg)  # frozen: usable as a dict key


def test_config_from_dict_unknown_field():
    with pytest.raises(ValueError, match='unknown SwinConfig fields'):
        SwinConfig.from_dict({'arch': 'swin', 'embed_dims': 12})
    with pytest.raises(ValueError, match='unknown ViTConfig fields'):
        ViTConfig.from_dict({'depths': (2, 2)})


def test_config_is_frozen():
    with pytest.raises(FrozenInstanceError):
        PRESETS['swin-tiny'].embed_dim = 3


@pytest.mark.parametrize('kw,match', [
    (dict(merging='legacyy'), r"merging must be one of \('v2', 'legacy'\).*Did you mean 'legacy'"),  # typo
    (dict(attn_impl='fast'), r"attn_impl must be one of \('reference', 'sdpa', 'triton', 'auto'\)"),  # unknown impl
    (dict(sa_mode='beside'), r"sa_mode must be one of \('inline', 'side'\)"),  # unknown SA mode
    (dict(sa_stage=7), r'sa_stage must be None or in 1\.\.4'),  # beyond the last stage
    (dict(sa_stage=0), r'sa_stage must be None or in 1\.\.4'),  # stages are 1-based
    (dict(depths=(2, 2, 2), num_heads=(1, 2, 2, 4)), r'same length'),  # mismatched lengths
    (dict(num_heads=(5, 2, 2, 4)), r'not divisible by num_heads\[0\]=5'),  # 12 channels / 5 heads
    (dict(sa_stage=3, sa_num_heads=7), r'sa_num_heads=7'),  # 96 SA channels / 7 heads
    (dict(window_size=(4, 4)), r'window_size'),  # two axes only
    (dict(patch_size=(2, 0, 2)), r'patch_size'),  # non-positive entry of a triple
])
def test_swin_config_invalid(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_swin_config_rejects_non_positive_int_sizes():
    with pytest.raises(ValueError, match='patch_size'):
        tiny_config(patch_size=0)


@pytest.mark.parametrize('kw,match', [
    (dict(attn_impl='flash'), r'attn_impl must be one of'),  # unknown impl
    (dict(embed_dim=96, num_heads=5), r'divisible by num_heads 5'),  # heads do not divide the width
])
def test_vit_config_invalid(kw, match):
    with pytest.raises(ValueError, match=match):
        replace(PRESETS['vit-tiny'], **kw)
