"""Fine-tuning from public weights: MONAI's self-supervised Swin UNETR checkpoint and SMIT's, in their own layouts.

The checkpoints are fabricated (random weights) with the real key names, prefixes, extra keys and shapes, from a
MONAI `SwinTransformer`; the loaded encoder must compute what that MONAI module computes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from monai.networks.nets.swin_unetr import SwinTransformer as MonaiSwin

from dagman_fast.checkpoint import SMIT_MERGE_ORDER, load_encoder, smit_to_monai
from dagman_fast.classify import cls_learner
from dagman_fast.swin import PatchMerging, SwinEncoder

TINY = dict(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
            num_heads=(1, 2, 2, 4), spatial_dims=3)


def monai_swin(**kw) -> MonaiSwin:
    return randomize_(MonaiSwin(**{**TINY, **kw})).eval()


def same_maps(enc: SwinEncoder, twin: MonaiSwin):
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        ours, theirs = enc.eval().forward_features(x), twin(x, normalize=True)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def to_fc(k: str) -> str:
    return k.replace('.mlp.linear1.', '.mlp.fc1.').replace('.mlp.linear2.', '.mlp.fc2.')


def test_monai_self_supervised_checkpoint(tmp_path):
    "model_swinvit.pt: {'state_dict': module.* keys, timm's mlp.fc1 names, the SSL heads}, legacy merging."
    twin = monai_swin(downsample='merging')  # what MONAI's SSL pretraining and SwinUNETR default to
    sd = {f'module.{to_fc(k)}': v for k, v in twin.state_dict().items()}
    assert 'module.layers1.0.blocks.0.mlp.fc1.weight' in sd and 'module.layers1.0.blocks.0.attn.relative_position_index' in sd
    sd.update({'module.rotation_head.weight': torch.randn(4, 192), 'module.rotation_head.bias': torch.randn(4),
               'module.contrastive_head.weight': torch.randn(512, 192), 'module.conv.0.weight': torch.randn(8, 192, 1, 1, 1)})
    torch.save({'state_dict': sd, 'epoch': 100, 'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4}]}},
               tmp_path / 'model_swinvit.pt')
    enc = load_encoder(tmp_path / 'model_swinvit.pt')
    assert enc.config.merging == 'legacy' and enc.config.embed_dim == 12 and enc.config.depths == (2, 2, 2, 2)
    same_maps(enc, twin)
    wrong = load_encoder(tmp_path / 'model_swinvit.pt', merging='v2')  # the merging is not in the weights
    with pytest.raises(AssertionError):
        same_maps(wrong, twin)


def smit_merging_reference(x, norm_w, norm_b, reduction_w):
    "SMIT's PatchMerging.forward (models/Trans.py), written out: its order of the 8 sub-voxels, norm, reduction."
    x0, x1 = x[:, 0::2, 0::2, 0::2, :], x[:, 1::2, 0::2, 0::2, :]
    x2, x3 = x[:, 0::2, 1::2, 0::2, :], x[:, 0::2, 0::2, 1::2, :]
    x4, x5 = x[:, 1::2, 1::2, 0::2, :], x[:, 0::2, 1::2, 1::2, :]
    x6, x7 = x[:, 1::2, 0::2, 1::2, :], x[:, 1::2, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_w, norm_b), reduction_w)


def test_smit_patch_merging_is_ours_with_its_channel_blocks_reordered():
    c = 6
    norm_w, norm_b, red = torch.randn(8 * c), torch.randn(8 * c), torch.randn(2 * c, 8 * c)
    sd = smit_to_monai({'layers.0.downsample.norm.weight': norm_w, 'layers.0.downsample.norm.bias': norm_b,
                        'layers.0.downsample.reduction.weight': red})
    ours = PatchMerging(c, 'v2')
    ours.load_state_dict({'norm.weight': sd['layers1.0.downsample.norm.weight'],
                          'norm.bias': sd['layers1.0.downsample.norm.bias'],
                          'reduction.weight': sd['layers1.0.downsample.reduction.weight']})
    x = torch.randn(2, 4, 6, 8, c)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), smit_merging_reference(x, norm_w, norm_b, red), atol=1e-5, rtol=1e-5)
        unordered = PatchMerging(c, 'v2')
        unordered.load_state_dict({'norm.weight': norm_w, 'norm.bias': norm_b, 'reduction.weight': red})
        assert not torch.allclose(unordered(x), smit_merging_reference(x, norm_w, norm_b, red), atol=1e-3)


def smit_state_dict(twin: MonaiSwin, prefix: str = '') -> dict:
    "The MONAI module's weights as SMIT's encoder holds them (`layers.i`, fc names, SMIT's merging order, extras)."
    inverse = [SMIT_MERGE_ORDER.index(j) for j in range(8)]
    sd = {}
    for k, v in twin.state_dict().items():
        k = to_fc(k)
        if k.startswith('layers'):
            i, rest = k[len('layers'):].split('.0.', 1)
            k = f'layers.{int(i) - 1}.{rest}'
            if '.downsample.' in k:
                dim = v.shape[-1] // 8
                v = v.reshape(*v.shape[:-1], 8, dim)[..., inverse, :].reshape(v.shape)
        sd[prefix + k] = v
    c = twin.embed_dim
    sd[prefix + 'mask_token'] = torch.randn(1, 1, c)
    for i in range(4):  # SMIT's per-stage output norms (its skip features)
        sd[f'{prefix}norm{i}.weight'], sd[f'{prefix}norm{i}.bias'] = torch.randn(c * 2 ** i), torch.randn(c * 2 ** i)
    return sd


@pytest.mark.parametrize('published', [True, False])
def test_smit_checkpoints(tmp_path, published):
    "The published weights ({'student': module.backbone.transformer.*}) and the pretraining script's save."
    twin = monai_swin(downsample='mergingv2', patch_norm=True, qkv_bias=False)  # SMIT's encoder settings
    if published:
        student = smit_state_dict(twin, 'module.backbone.transformer.')
        student.update({'module.backbone.head.mlp.0.weight': torch.randn(32, 192),
                        'module.backbone.head.last_layer.weight_g': torch.randn(64, 1),
                        'module.backbone.decoder1.weight': torch.randn(192, 32, 1, 1, 1)})
        obj = {'student': student, 'teacher': {k: v + 1 for k, v in student.items()}, 'epoch': 3}
    else:
        obj = {'epoch': 1, 'state_dict': smit_state_dict(twin), 'optimizer': {'state': {}, 'param_groups': []}}
    torch.save(obj, tmp_path / 'smit.pth')
    enc = load_encoder(tmp_path / 'smit.pth')
    cfg = enc.config
    assert (cfg.merging, cfg.patch_norm, cfg.qkv_bias, cfg.window_size, cfg.num_heads) == ('v2', True, False, 4,
                                                                                         (1, 2, 2, 4))
    same_maps(enc, twin)  # the student's weights (the teacher's are all off by one)


def test_a_plain_monai_state_dict_needs_its_merging(tmp_path):
    "`dagman export --monai` writes MONAI's names without the merging (v2 for a default encoder): not guessed."
    twin = monai_swin(downsample='mergingv2')
    torch.save(twin.state_dict(), tmp_path / 'swin_monai.pth')
    with pytest.raises(ValueError, match="pass merging='legacy'.*or 'v2'"):
        load_encoder(tmp_path / 'swin_monai.pth')
    same_maps(load_encoder(tmp_path / 'swin_monai.pth', merging='v2'), twin)


def test_public_weights_fine_tune_through_cls_learner(tmp_path):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    twin = monai_swin(downsample='merging')
    torch.save({'state_dict': {f'module.{to_fc(k)}': v for k, v in twin.state_dict().items()}}, tmp_path / 'w.pt')
    ds = [(torch.rand(1, 32, 32, 32), torch.tensor(i % 2)) for i in range(4)]
    dls = DataLoaders(DataLoader(ds, bs=2), DataLoader(ds, bs=2), device='cpu')
    dls.c = 2
    learn = cls_learner(dls, encoder=tmp_path / 'w.pt')
    torch.testing.assert_close(learn.model.encoder.patch_embed.proj.weight, twin.patch_embed.proj.weight)


def test_a_file_in_no_known_layout_names_the_layouts(tmp_path):
    torch.save({'state_dict': {'backbone.conv1.weight': torch.randn(8, 1, 3, 3, 3)}}, tmp_path / 'resnet.pth')
    with pytest.raises(ValueError, match="none of its 1 keys.*MONAI's SwinTransformer.*SMIT's encoder"):
        load_encoder(tmp_path / 'resnet.pth', config={'arch': 'swin'})
    torch.save({'state_dict': {'module.layers1.0.blocks.0.norm1.weight': torch.ones(12)}}, tmp_path / 'cut.pt')
    with pytest.raises(ValueError, match='looks like MONAI Swin weights but does not load'):
        load_encoder(tmp_path / 'cut.pt')
    torch.save({'epoch': 3, 'note': 'no weights'}, tmp_path / 'empty.pt')
    with pytest.raises(ValueError, match='no state dict of tensors'):
        load_encoder(tmp_path / 'empty.pt')
