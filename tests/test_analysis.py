"""The paper's analyses (`dagman_fast.analysis`): attention distance and entropy per head against hand-computed windows,
organ crops and clustering on a CT the other tests have not seen, [CLS] attention maps, and `dagman analyze`."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from dagman_fast.analysis import (AttentionStats, attention_distance, attention_entropy, attention_map, attention_stats,
                                  cluster_distances, cluster_report, grid_positions, organ_crops, plot_attention_maps,
                                  plot_head_diversity, window_attention_probs)
from dagman_fast.encoder_configs import encoder_config
from dagman_fast.swin import SwinEncoder, ViTEncoder


def uniform_attention_(encoder) -> SwinEncoder:
    "Zero every query/key projection and relative bias: each query attends uniformly to what its window lets it see."
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(('qkv.weight', 'qkv.bias', 'relative_position_bias_table')):
                p.zero_()
    return encoder


def brute_force(grid: int, window: int, shift: int, stride: int) -> tuple[float, float]:
    """Uniform shifted-window attention by hand, in the original coordinates: a token sees the tokens of its window
    after the cyclic shift that came from the same region (Liu et al., sec. 3.2); mean distance and entropy."""
    p = np.stack(np.meshgrid(*[np.arange(grid)] * 3, indexing='ij'), -1).reshape(-1, 3)
    r = (p - shift) % grid
    region = np.where(r < grid - window, 0, np.where(r < grid - shift, 1, 2)) if shift else np.zeros_like(r)
    key = np.concatenate([r // window, region], 1)
    dists, ents = [], []
    for q in range(len(p)):
        same = (key == key[q]).all(1)
        dists.append(np.linalg.norm((p[same] - p[q]) * stride, axis=1).mean())
        ents.append(math.log(same.sum()))
    return float(np.mean(dists)), float(np.mean(ents))


def test_distance_and_entropy_of_toy_attention():
    pos = grid_positions((1, 1, 3), (1, 1, 2))[None]  # three tokens in a row, 2 voxels apart
    one_hot = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])[None, None]
    torch.testing.assert_close(attention_distance(one_hot, pos, pos)[0, 0], torch.tensor([4.0, 2.0, 2.0]))
    torch.testing.assert_close(attention_entropy(one_hot)[0, 0], torch.zeros(3))
    half = torch.tensor([[0.5, 0.5, 0]] * 3)[None, None]
    torch.testing.assert_close(attention_distance(half, pos, pos)[0, 0], torch.tensor([1.0, 1.0, 3.0]))
    torch.testing.assert_close(attention_entropy(half)[0, 0], torch.full((3,), math.log(2)))


def test_window_probabilities_are_those_the_block_uses():
    "probs @ v reproduces the block's own attention output: the recorded probabilities are the forward's."
    from dagman_fast.kernels.window_attention import window_attention_qkv
    from dagman_fast.swin import WindowAttention
    from dagman_fast.windows import shift_attention_mask
    torch.manual_seed(0)
    attn = WindowAttention(16, 2, (2, 2, 2))
    torch.nn.init.normal_(attn.relative_position_bias_table)
    x = torch.randn(2 * 8, 8, 16)  # 2 samples x 8 windows of a 4^3 grid, shifted by 1
    mask = shift_attention_mask((4, 4, 4), (2, 2, 2), (1, 1, 1))
    probs = window_attention_probs(attn, x, mask)
    torch.testing.assert_close(probs.sum(-1), torch.ones(16, 2, 8))
    qkv = attn.qkv(x).view(16, 8, 3, 2, 8)
    ref = window_attention_qkv(qkv, attn.relative_bias(8), mask, scale=attn.scale, impl='reference')
    torch.testing.assert_close(probs @ qkv[:, :, 2].transpose(1, 2), ref, rtol=1e-5, atol=1e-5)


def test_uniform_attention_against_hand_computed_windows():
    enc = uniform_attention_(SwinEncoder(tiny_config(img_size=32, sa_stage=3)))
    x = torch.rand(2, 1, 32, 32, 32)
    stats = attention_stats(enc, x)
    with AttentionStats(enc, max_elements=5000) as small, torch.no_grad():  # 1 window of 64 tokens at a time
        enc(x)
    for a, b in zip(stats.rows(), small.rows()):
        assert a['distance'] == pytest.approx(b['distance'], rel=1e-6) and a['entropy'] == pytest.approx(b['entropy'])
    rows = {(r['stage'], r['block'], r['head']): r for r in stats.rows()}
    assert {k[0] for k in rows} == {'stage1', 'stage2', 'stage3', 'stage4', 'sa'}
    # stage 1: a 16^3 grid of tokens 2 voxels apart, 4^3 windows, the odd block shifted by 2
    for block, shift in ((0, 0), (1, 2)):
        dist, ent = brute_force(16, 4, shift, 2)
        r = rows[('stage1', block, 0)]
        assert r['distance'] == pytest.approx(dist, rel=1e-5) and r['entropy'] == pytest.approx(ent, rel=1e-5)
    assert rows[('stage1', 1, 0)]['entropy'] < rows[('stage1', 0, 0)]['entropy']  # the shift splits edge windows
    # stage 4: a 2^3 grid of tokens 16 voxels apart; the window is clipped to the grid and never shifted
    for block in (0, 1):
        r = rows[('stage4', block, 3)]
        assert r['distance'] == pytest.approx((3 * 16 + 3 * 16 * 2 ** 0.5 + 16 * 3 ** 0.5) / 8, rel=1e-5)
        assert r['entropy'] == pytest.approx(math.log(8), rel=1e-5)
    # the SA module after stage 3: a 2^3 grid 16 voxels apart plus [CLS]; uniform over 9 keys, distance over 8
    r = rows[('sa', 1, 0)]
    assert r['entropy'] == pytest.approx(math.log(9), rel=1e-5)
    assert r['distance'] == pytest.approx((3 * 16 + 3 * 16 * 2 ** 0.5 + 16 * 3 ** 0.5) / 8, rel=1e-5)
    per = stats.per_stage()
    assert per['stage1']['heads'] == 2 and per['stage4']['heads'] == 8 and per['sa']['heads'] == 8
    assert per['stage4']['distance_var'] == pytest.approx(0.0, abs=1e-6)  # every head alike: no diversity


def test_padded_windows_leave_out_padding_queries():
    "A 24^3 input: stage 1 is 12^3 tokens in 4^3 windows, stage 2 6^3 padded to 8^3: padding queries do not count."
    enc = uniform_attention_(SwinEncoder(tiny_config(img_size=32, sa_stage=None, patch_size=2)))
    with AttentionStats(enc) as st, torch.no_grad():
        enc.stages[0](enc.patch_embed(torch.rand(1, 1, 24, 24, 24)))
        enc.stages[1](torch.rand(1, 6, 6, 6, 24))
    rows = {(r['stage'], r['block']): r for r in st.rows() if r['head'] == 0}
    assert rows[('stage2', 0)]['entropy'] == pytest.approx(math.log(64), rel=1e-5)  # keys: real and padding tokens
    n = st._sums[('stage2', 0)][1]
    assert n == 6 ** 3  # the queries counted: the real tokens only


def test_recording_changes_nothing_and_agrees_across_attention_paths():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32, 32)
    results = {}
    for impl in ('reference', 'sdpa'):
        torch.manual_seed(1)
        enc = SwinEncoder(tiny_config(img_size=32, sa_stage=3, attn_impl=impl)).eval()
        with torch.no_grad():
            plain = enc(x).features[-1]
            with AttentionStats(enc) as st:
                recorded = enc(x).features[-1]
        torch.testing.assert_close(recorded, plain, rtol=0, atol=0)  # the forward itself is untouched
        assert all(getattr(m, 'attn_probe', None) is None for m in enc.modules())  # and the probes are gone after
        results[impl] = st.rows()
    for a, b in zip(results['reference'], results['sdpa']):
        assert a['distance'] == pytest.approx(b['distance'], rel=1e-4)
        assert a['entropy'] == pytest.approx(b['entropy'], rel=1e-4)


def test_vit_stats_and_box_plot(tmp_path):
    enc = uniform_attention_(ViTEncoder(encoder_config('vit-tiny')))
    st = attention_stats(enc, torch.rand(2, 1, 32, 32, 32))
    rows = st.rows()
    assert {r['stage'] for r in rows} == {'vit'} and len(rows) == 4 * 4
    # 4^3 tokens 8 voxels apart, uniform over them and [CLS]
    p = grid_positions((4, 4, 4), (8, 8, 8))
    assert rows[0]['distance'] == pytest.approx(float(torch.cdist(p, p).mean()), rel=1e-5)
    assert rows[0]['entropy'] == pytest.approx(math.log(65), rel=1e-5)
    swin = attention_stats(SwinEncoder(tiny_config(img_size=32, sa_stage=3)), torch.rand(1, 1, 32, 32, 32))
    plot_head_diversity({'vit': st, 'swin': swin}, tmp_path / 'heads.png')
    assert (tmp_path / 'heads.png').stat().st_size > 10_000
    with pytest.raises(TypeError, match='SwinEncoder or ViTEncoder'):
        AttentionStats(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- organ crops and clustering


@pytest.fixture(scope='module')
def phantom(tmp_path_factory) -> tuple[Path, Path]:
    """A CT the other tests have not seen: three 'organs' (ellipsoids of different HU and texture) in soft tissue,
    1.5 mm voxels, with their label map (values 5, 1 and 2, 3 split in two halves: a merged group)."""
    rs = np.random.RandomState(11)
    shape = (60, 56, 52)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing='ij')
    hu = -1000.0 * np.ones(shape)
    body = ((z - 30) / 28) ** 2 + ((y - 28) / 26) ** 2 + ((x - 26) / 24) ** 2 < 1
    hu[body] = 40
    lab = np.zeros(shape, np.uint8)
    organs = [(5, (20, 20, 18), 9, 150.0), (1, (40, 20, 34), 7, -80.0), (2, (30, 38, 20), 6, 230.0)]
    for value, (cz, cy, cx), r, level in organs:
        inside = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < r * r
        hu[inside] = level
        lab[inside] = value
    lab[(lab == 2) & (x > 20)] = 3
    hu += 15 * rs.standard_normal(shape)
    folder = tmp_path_factory.mktemp('phantom')
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), folder / 'ct.nii.gz')
    nib.save(nib.Nifti1Image(lab, affine), folder / 'seg.nii.gz')
    return folder / 'ct.nii.gz', folder / 'seg.nii.gz'


def test_organ_crops_from_nifti_and_arrays(phantom):
    ct, seg = phantom
    organs = {'liver': 5, 'spleen': 1, 'kidneys': (2, 3)}
    x, y, names = organ_crops(ct, seg, organs, size=16, n_per_organ=5, spacing=2.0)
    assert x.shape == (15, 1, 16, 16, 16) and names == ['liver', 'spleen', 'kidneys']
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert 0 <= float(x.min()) and float(x.max()) <= 1  # the HU window, as pretraining sees scans
    # arrays as they are: the centre voxel of every crop lies in its organ (the organs are well inside the volume)
    img, lab = nib.load(ct).get_fdata(), nib.load(seg).get_fdata()
    xa, ya, _ = organ_crops(img, lab, [5, 1, (2, 3)], size=(9, 9, 9), n_per_organ=4, seed=3)
    for v, c in zip(xa, ya):
        level = [150.0, -80.0, 230.0][int(c)]
        assert abs(float(v[0, 4, 4, 4]) - level) < 80  # the organ's HU (noise sd 15)
    with pytest.raises(ValueError, match=r"\['label 7'\] have no voxel"):
        organ_crops(img, lab, [5, 7], size=8)
    with pytest.raises(FileNotFoundError, match='nope.nii.gz'):
        organ_crops(ct.parent / 'nope.nii.gz', seg, [5])


@pytest.mark.slow
def test_cluster_distances_by_hand_and_cluster_report(phantom, tmp_path):
    f = torch.tensor([[0.0, 0], [2, 0], [10, 0], [10, 2]])
    d = cluster_distances(f, torch.tensor([0, 0, 1, 1]))
    assert d['intra'] == pytest.approx(1.0) and d['inter'] == pytest.approx(math.hypot(9, 1))
    assert d['ratio'] == pytest.approx(math.hypot(9, 1))
    x, y, names = organ_crops(*phantom, {'liver': 5, 'spleen': 1, 'kidneys': (2, 3)}, size=16, n_per_organ=8)
    torch.manual_seed(0)
    enc = SwinEncoder(tiny_config(img_size=32, sa_stage=3))
    rep = cluster_report(enc, x, y, names, path=tmp_path, title='random tiny Swin')
    assert rep['n'] == 24 and rep['classes'] == 3 and rep['names'] == names
    # organs of different HU: even random features separate them (chance 1/3)
    assert rep['knn_accuracy'] > 0.6 and rep['ratio'] > 1
    shuffled = cluster_report(enc, x, y[torch.randperm(24, generator=torch.Generator().manual_seed(0))])
    assert shuffled['ratio'] < rep['ratio'] and shuffled['silhouette'] < rep['silhouette']
    saved = json.loads((tmp_path / 'clusters.json').read_text())
    assert saved['ratio'] == pytest.approx(rep['ratio'])
    assert (tmp_path / 'clusters.png').stat().st_size > 10_000
    with pytest.raises(ValueError, match='24 images but 3 labels'):
        cluster_report(enc, x, y[:3])


# ---------------------------------------------------------------- attention maps


def test_attention_map_is_the_sa_attention_upsampled(tmp_path):
    torch.manual_seed(0)
    enc = SwinEncoder(tiny_config(img_size=32, sa_stage=2)).eval()
    vol = torch.rand(1, 32, 32, 32)
    with torch.no_grad():
        out = enc(vol[None])
    m = attention_map(enc, vol)
    assert m.shape == (32, 32, 32)
    ref = torch.nn.functional.interpolate(out.attn.view(1, 1, *out.grid), size=(32, 32, 32), mode='trilinear')[0, 0]
    torch.testing.assert_close(m, ref)
    assert float(m.mean()) * 64 == pytest.approx(1.0, rel=0.05)  # a distribution over the 4^3 tokens, interpolated
    # a 28^3 volume (MedMNIST) is padded to 32^3 like the classifier does, and the map cropped back
    from dagman_fast.classify import ClsModel
    small = torch.rand(1, 28, 28, 28)
    heads = attention_map(ClsModel(enc, 2), small, heads=True)
    assert heads.shape == (4, 28, 28, 28)  # sa_num_heads of tiny_config
    padded = torch.nn.functional.pad(small, [2, 2] * 3)
    torch.testing.assert_close(heads.mean(0), attention_map(enc, padded)[2:30, 2:30, 2:30])
    plot_attention_maps(small, {'pretrained': heads.mean(0), 'same again': heads[0]}, tmp_path / 'maps.png')
    assert (tmp_path / 'maps.png').stat().st_size > 10_000
    with pytest.raises(ValueError, match='sa_stage'):
        attention_map(SwinEncoder(tiny_config(img_size=32)), vol)
    # a ViT: the [CLS] attention of its last block
    vit = ViTEncoder(encoder_config('vit-tiny')).eval()
    with torch.no_grad():
        out = vit(vol[None])
    ref = torch.nn.functional.interpolate(out.attn.view(1, 1, *out.grid), size=(32, 32, 32), mode='trilinear')[0, 0]
    torch.testing.assert_close(attention_map(vit, vol), ref)


# ---------------------------------------------------------------- dagman analyze


def _export(enc, path: Path) -> Path:
    from dagman_fast.checkpoint import save_encoder
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_encoder(enc, path)


@pytest.mark.slow
def test_dagman_analyze_end_to_end(phantom, shared_data, tmp_path, capsys):
    from dagman_fast.cli import main
    torch.manual_seed(0)
    a = _export(SwinEncoder(tiny_config(img_size=32, sa_stage=2)), tmp_path / 'runs' / 'dagman' / 'encoder.pth')
    b = _export(SwinEncoder(tiny_config(img_size=32)), tmp_path / 'runs' / 'smit' / 'encoder.pth')
    ct, seg = phantom
    out = tmp_path / 'analysis'
    assert main(['analyze', '--encoder', str(a), str(b), '--data', str(ct), str(ct), '--label-map', str(seg),
                 str(seg), '--labels', '5', '1', '2,3', '--label-names', 'liver', 'spleen', 'kidneys', '--size', '16',
                 '--n-per-organ', '3', '--map-size', '32', '--n-stats', '2', '--out', str(out)]) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert set(summary['encoders']) == {'dagman', 'smit'} and summary['classes'] == ['liver', 'spleen', 'kidneys']
    dag = summary['encoders']['dagman']
    assert set(dag['per_stage']) == {'stage1', 'stage2', 'stage3', 'stage4', 'sa'}
    assert dag['clustering']['n'] == 18 and 0 <= dag['clustering']['knn_accuracy'] <= 1  # 2 scans x 3 organs x 3
    assert 'sa' not in summary['encoders']['smit']['per_stage'] and 'attention_map' in summary['encoders']['smit']
    rows = json.loads((out / 'attention_stats.json').read_text())
    assert len(rows['smit']) == 2 * (1 + 2 + 2 + 4)  # two blocks a stage, heads (1, 2, 2, 4)
    for f in ('head_diversity.png', 'attention_dagman.png', 'clusters_dagman/clusters.png',
              'clusters_smit/clusters.json'):
        assert (out / f).stat().st_size > (100 if f.endswith('.json') else 5000), f
    assert not (out / 'attention_smit.png').exists()
    # a MedMNIST file: its labels as classes
    npz = shared_data / 'medmnist' / 'adrenalmnist3d.npz'
    assert main(['analyze', '--encoder', str(a), '--names', 'tiny', '--data', str(npz), '--n', '30', '--n-stats', '2',
                 '--out', str(tmp_path / 'mm')]) == 0
    mm = json.loads((tmp_path / 'mm' / 'summary.json').read_text())
    assert mm['n'] == 30 and mm['classes'] == ['0', '1'] and (tmp_path / 'mm' / 'attention_tiny.png').exists()
    capsys.readouterr()
    # errors: one line naming the option and what was expected
    for argv, msg in ((['--data', str(ct)], '--label-map'), (['--data', str(tmp_path / 'x.csv')], 'no such file'),
                      (['--data', str(a)], 'expected a MedMNIST .npz or NIfTI CTs'),
                      (['--data', str(ct), str(ct), '--label-map', str(seg), '--labels', '5'],
                       '--label-map: 1 label maps for 2 --data scans'),
                      (['--data', str(npz), '--names', 'x', 'y'], '--names: 2 names for 1 --encoder'),
                      (['--data', str(npz), '--split', 'valid'], "invalid choice: 'valid'")):
        with pytest.raises(SystemExit) if 'invalid choice' in msg else contextlib.nullcontext():
            status = main(['analyze', '--encoder', str(a), *argv, '--out', str(tmp_path / 'bad')])
            assert status in (1, 2)
        assert msg in capsys.readouterr().err
