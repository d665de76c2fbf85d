"""Bad arguments, settings, disks and runs (issue 17): one-line errors with the right exit status, before any work;
no false success; nothing left behind. Each case is a reproduction from the issue or one of the same kind."""
from __future__ import annotations

import errno
import gc
import os

import pytest

from dagman_fast.cli import _environment_error, main
from dagman_fast.core import RunError
from dagman_fast.recipes import coerce_setting, parse_settings


def run_cli(capsys, *argv):
    "Exit status, stdout and stderr of `dagman ARGV` run in this process (argparse errors exit through SystemExit)."
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(err: str, *words):
    last = err.strip().splitlines()[-1]
    assert last.startswith('dagman: error: '), err
    assert 'Traceback' not in err, err
    for w in words:
        assert w in last, (w, last)


TINY = ['pretrain', '--synthetic', '2', '--preset', 'swin-tiny', '--crop', '32', '--bs', '1']
STAGE3 = ['--set', 'encoder.sa_stage=3', '--set', 'mask_stage=3']  # not the small-view default of 32^3 crops


@pytest.mark.parametrize('key,text,kind,expected', [
    ('noisy_teacher', 'false', 'bool', False), ('noisy_teacher', 'False', 'bool', False),
    ('noisy_teacher', '0', 'bool', False), ('noisy_teacher', 'no', 'bool', False),
    ('cross_view', 'true', 'bool', True), ('cross_view', 'YES', 'bool', True), ('cross_view', '1', 'bool', True),
    ('mask_ratio', '0.6', 'float', 0.6), ('mask_ratio', '1', 'float', 1.0),
    ('mask_stage', 'none', 'int | None', None), ('mask_stage', '2', 'int | None', 2),
    ('clip_grad', 'None', 'float | None', None), ('masking', 'block', 'str', 'block'),
    ('losses', "('amip', 'gitd')", 'tuple', ('amip', 'gitd')), ('losses', 'amip,gitd', 'tuple', ('amip', 'gitd')),
    ('depths', '(2, 2, 2, 2)', 'tuple', (2, 2, 2, 2)), ('depths', '[1, 1]', 'tuple', (1, 1)),
    ('img_size', '64', 'int | tuple', 64), ('img_size', '(64, 64, 32)', 'int | tuple', (64, 64, 32)),
    ('loss_weights', "{'aitd': 1}", 'dict', {'aitd': 1}),
    ('encoder.use_checkpoint', 'true', 'bool | tuple', True), ('encoder.use_checkpoint', '0', 'bool | tuple', False),
    ('encoder.use_checkpoint', '(1, 2)', 'bool | tuple', (1, 2)), ('encoder.use_checkpoint', '[2]', 'bool | tuple', (2,)),
])
def test_set_values_parse_by_the_fields_type(key, text, kind, expected):
    v = coerce_setting(key, text, kind)
    assert v == expected and type(v) is type(expected)


@pytest.mark.parametrize('item,words', [
    ('noisy_teacher=maybe', ['noisy_teacher', 'true or false']),
    ('noisy_teacher=2', ['noisy_teacher', 'true or false']),
    ('mask_ratio=abc', ['mask_ratio', 'a number']),
    ('mask_ratio=True', ['mask_ratio', 'a number']),
    ('ema_momentum=(1,)', ['ema_momentum', 'a number']),
    ('sinkhorn_iters=1.5', ['sinkhorn_iters', 'an integer']),
    ('encoder.depths=1', ['encoder.depths', 'a tuple']),
    ('loss_weights=0.1', ['loss_weights', 'a dict']),
    ('mask_ratios=0.5', ['mask_ratios', 'not a DAGMaNConfig field']),
    ('encoder.depth_s=1', ['encoder.depth_s', 'not an encoder field']),
    ('mask_ratio', ['KEY=VALUE']),
    ('encoder.use_checkpoint=2', ['encoder.use_checkpoint', 'for one stage write (2,)']),
    ('encoder.use_checkpoint=all', ['encoder.use_checkpoint', 'stage numbers']),
])
def test_set_refuses_wrong_types_and_unknown_keys(item, words):
    with pytest.raises(RunError) as e:
        parse_settings([item])
    assert e.value.status == 2
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_boolean_false_reaches_the_run_config(tmp_path, capsys):
    "The issue's first reproduction: `--set noisy_teacher=false` was stored as the string 'false' (truthy)."
    out = tmp_path / 'r1'
    models = out / 'models'
    models.mkdir(parents=True)
    orphan = models / '.checkpoint.pth.abc123.tmp'  # what a write killed mid-way leaves behind
    orphan.write_bytes(b'partial')
    with pytest.warns(UserWarning, match='partial checkpoint'):
        rc, _, err = run_cli(capsys, *TINY, '--epochs', '1', '--set', 'noisy_teacher=false', '--out', str(out))
    assert rc == 0, err
    import json
    cfg = json.loads((out / 'config.json').read_text())['dagman']
    assert cfg['noisy_teacher'] is False
    assert not orphan.exists() and (models / 'checkpoint.pth').exists()
    assert not list(models.glob('.checkpoint.pth.*.tmp'))


@pytest.mark.parametrize('args,status,words', [
    (['--epochs', '0'], 2, ['--epochs', '>= 1']),
    (['--epochs', '-3'], 2, ['--epochs', '>= 1']),
    (['--epochs', 'ten'], 2, ['--epochs', 'integer']),
    (['--lr', '-1'], 2, ['--lr', '> 0']),
    (['--lr', 'nan'], 2, ['--lr']),
    (['--bs', '0'], 2, ['--bs', '>= 1']),
    (['--crop', '0'], 2, ['--crop', '>= 1']),
    (['--crop', '40'], 2, ['--crop 40', 'multiple of 32', '--crop 64']),
    (['--save-every', '0'], 2, ['--save-every', '>= 1']),
    (['--workers', '-1'], 2, ['--workers', '>= 0']),
    (['--valid-pct', '1.5'], 2, ['--valid-pct']),
    (['--spacing', '0'], 2, ['--spacing']),
    (['--warmup', '-1'], 2, ['--warmup']),
    (['--method', 'dino'], 2, ['--method', 'invalid choice']),
    (['--set', 'mask_ratio=1.5'], 2, ['mask_ratio', '[0, 1]']),
    (['--set', 'encoder.depths=(0, 2, 2, 2)'], 2, ['depths', 'positive integer']),
    (['--set', 'encoder.depths=(10000, 2, 2, 2)'], 2, ['transformer blocks', '256']),
    (['--set', 'encoder.embed_dim=-4'], 2, ['embed_dim']),
    (['--resume', 'nowhere.pth'], 2, ['--resume', 'nowhere.pth']),
])
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys, args, status, words):
    out = tmp_path / 'run'
    rc, stdout, err = run_cli(capsys, *TINY, '--epochs', '1', '--out', str(out), *args)
    assert rc == status, err
    assert_one_line_error(err, *words)
    assert not (out / 'synthetic_data').exists()  # nothing was written or read
    assert not (out / 'models').exists()


def test_an_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    f = tmp_path / 'afile'
    f.write_text('x')
    rc, _, err = run_cli(capsys, *TINY, '--out', str(f))
    assert rc == 2
    assert_one_line_error(err, str(f), 'not a folder')
    rc, _, err = run_cli(capsys, *TINY, '--out', str(f / 'sub'))  # a folder below a file cannot be made
    assert rc in (1, 2)
    assert_one_line_error(err, str(f / 'sub'))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / 'ro'
        ro.mkdir()
        ro.chmod(0o500)
        rc, _, err = run_cli(capsys, *TINY, '--out', str(ro / 'run'))
        assert rc == 1
        assert_one_line_error(err, 'cannot write')


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    f = tmp_path / 'afile'
    f.write_text('x')
    with pytest.raises(RunError):
        main(['--debug', 'pretrain', '--out', str(f)])
    with pytest.raises(RunError):
        main(['pretrain', '--out', str(f), '--debug'])
    monkeypatch.setenv('DAGMAN_DEBUG', '1')
    with pytest.raises(RunError):
        main(['pretrain', '--out', str(f)])


def test_an_internal_error_is_one_line_that_says_how_to_see_more(tmp_path, capsys, monkeypatch):
    import dagman_fast.recipes as recipes

    def boom(checkpoint, **kw):
        raise KeyError('stage')
    monkeypatch.setattr(recipes, 'export', boom)
    rc, _, err = run_cli(capsys, 'export', str(tmp_path / 'x.pth'))
    assert rc == 1
    assert_one_line_error(err, 'KeyError', '--debug')


@pytest.mark.slow
def test_a_diverging_run_stops_with_status_3(tmp_path, capsys):
    "`--lr 10` took the loss from 22 to 521 and ended with exit 0; now it stops after three epochs far above."
    rc, _, err = run_cli(capsys, *TINY, '--epochs', '8', '--lr', '10', '--out', str(tmp_path / 'r'),
                         *STAGE3)  # the settings of the measurement (with the SA module after stage 2 it turns NaN)
    assert rc == 3, err
    assert_one_line_error(err, 'diverged', 'first-epoch')
    assert 'Exception occured in' not in err  # fastai's wrapper is not shown


def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import dagman_fast.checkpoint as ck
    path = tmp_path / 'models' / 'checkpoint.pth'
    ck.atomic_save({'epoch': 1}, path)
    before = path.read_bytes()

    def full(obj, f):
        f.write(b'some bytes')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4058')
    monkeypatch.setattr(ck.torch, 'save', full)
    usage = namedtuple('usage', 'total used free')
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage(10, 10, 0))
    with pytest.raises(OSError) as e:
        ck.atomic_save({'epoch': 2}, path)
    assert e.value.errno == errno.ENOSPC
    line = _environment_error(e.value)
    assert line.startswith(f'no space left on {path.parent}') and 'kept' in line, line
    assert path.read_bytes() == before
    assert not list(path.parent.glob('.checkpoint.pth.*.tmp'))
    # with space left, the same failure is not called a full disk
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage(10, 0, 10 ** 12))
    with pytest.raises(RuntimeError, match='unexpected pos'):
        ck.atomic_save({'epoch': 2}, path)


def test_a_temporary_cache_is_removed_with_its_dataset(tmp_path):
    from dagman_fast.data import CTPreprocess, CTVolumes, find_ct_scans, synthetic_ct
    scans = synthetic_ct(tmp_path / 'ct', n=1, size=24)
    vols = CTVolumes(find_ct_scans(scans), CTPreprocess(crop=(16, 16, 16)), progress=False)
    cache = vols.cache_dir.parent
    assert cache.name.startswith('dagman_ct_cache_') and any(cache.rglob('*.pt'))
    del vols
    gc.collect()
    assert not cache.exists()
    kept = tmp_path / 'cache'  # a cache the user names is kept
    vols = CTVolumes(find_ct_scans(scans), CTPreprocess(crop=(16, 16, 16)), cache_dir=kept, progress=False)
    del vols
    gc.collect()
    assert any(kept.rglob('*.pt'))


@pytest.mark.parametrize('overrides,words', [
    (dict(depths=1), ['depths', 'tuple']),
    (dict(depths=(0, 2, 2, 2)), ['depths', 'positive']),
    (dict(depths=(), num_heads=()), ['depths']),
    (dict(depths=(10000, 2, 2, 2)), ['256']),
    (dict(embed_dim=-4), ['embed_dim']),
    (dict(embed_dim=10 ** 5, num_heads=(1, 1, 1, 1)), ['embed_dim', '8192']),
    (dict(img_size=-3), ['img_size']),
    (dict(patch_size=0), ['patch_size']),
    (dict(window_size=(4, 0, 4)), ['window_size']),
    (dict(num_heads=(4, 0, 8, 16)), ['num_heads']),
    (dict(drop_path_rate=1.5), ['drop_path_rate']),
    (dict(mlp_ratio=0), ['mlp_ratio']),
])
def test_swin_config_refuses_impossible_sizes(overrides, words):
    from dagman_fast.encoder_configs import SwinConfig
    with pytest.raises(ValueError) as e:
        SwinConfig(**overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_vit_config_refuses_impossible_sizes():
    from dagman_fast.encoder_configs import ViTConfig
    for kw in (dict(depth=10000), dict(depth=0), dict(embed_dim=0), dict(patch_size=-16)):
        with pytest.raises(ValueError):
            ViTConfig(**kw)


def test_an_encoder_file_with_an_absurd_depth_is_refused_before_building(tmp_path):
    "An edited encoder config (depth 10000) built until memory ran out; now the config refuses it."
    from dagman_fast.checkpoint import ENCODER_FORMAT, atomic_save, load_encoder
    from dagman_fast.swin import build_encoder
    enc = build_encoder('swin-tiny', img_size=32)
    p = tmp_path / 'encoder.pth'
    atomic_save(dict(format=ENCODER_FORMAT, config=dict(enc.config.to_dict(), depths=[10000, 2, 2, 2]),
                     state_dict=enc.state_dict()), p)
    with pytest.raises(ValueError, match='256'):
        load_encoder(p)


# --- finding scans (issue 17, item 4) ---------------------------------------------------------------------------

def _ct(path, shape=(24, 24, 24)):
    import nibabel as nib
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    hu = np.full(shape, -1000.0, np.float32)
    hu[tuple(slice(s // 4, 3 * s // 4) for s in shape)] = 40.0
    nib.save(nib.Nifti1Image(hu + np.random.RandomState(0).rand(*shape).astype(np.float32),
                             np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def _slab(shared_data, folder, keep=None, corrupt=None):
    "The 16 LIDC slices of the shared data copied to `folder`: only indices in `keep`; slice `corrupt` damaged."
    import shutil
    folder.mkdir(parents=True)
    files = sorted((shared_data / 'lidc_idri' / 'LIDC-IDRI-0001' / 'dicom_slab').glob('*.dcm'))
    for i, f in enumerate(files):
        if keep is None or i in keep:
            shutil.copy(f, folder / f.name)
    if corrupt is not None:
        data = files[corrupt].read_bytes()
        (folder / files[corrupt].name).write_bytes(data[:600] + bytes(range(256)) * 8)  # garbage after the header
        return folder / files[corrupt].name
    return folder


def test_several_folders_nested_series_and_mixed_formats(shared_data, tmp_path):
    from dagman_fast.data import find_ct_scans
    a = _ct(tmp_path / 'siteA' / 'p1.nii.gz')
    b = _ct(tmp_path / 'siteB' / 'p2' / 'ct.nii.gz')
    series = _slab(shared_data, tmp_path / 'siteB' / 'p3' / 'study' / 'series1')
    assert find_ct_scans([tmp_path / 'siteA', tmp_path / 'siteB']) == [a, b, series]
    assert find_ct_scans(tmp_path) == [a, b, series]  # one root, nested patient/study/series folders
    assert find_ct_scans([a, tmp_path / 'siteA', a]) == [a]  # a scan named twice counts once
    assert find_ct_scans([b.parent.parent]) == [b, series]  # a glob like siteB/* gives patient folders


@pytest.mark.parametrize('kind', ['dangling', 'looping', 'unreadable', 'empty cell', 'missing in csv'])
def test_bad_entries_are_errors_or_reported_skips(tmp_path, monkeypatch, kind):
    import dagman_fast.data as D
    good = _ct(tmp_path / 'scans' / 'good.nii.gz')
    source, name = tmp_path / 'scans', None
    if kind == 'dangling':
        (tmp_path / 'scans' / 'gone.nii.gz').symlink_to(tmp_path / 'nowhere.nii.gz')
        name = 'gone.nii.gz'
    elif kind == 'looping':
        (tmp_path / 'scans' / 'loop.nii.gz').symlink_to(tmp_path / 'scans' / 'loop.nii.gz')
        name = 'loop.nii.gz'
    elif kind == 'unreadable':  # as root every folder can be read: os.walk's report of one that cannot, simulated
        walk = os.walk

        def walk_with_error(top, onerror=None, **kw):
            onerror(PermissionError(errno.EACCES, 'Permission denied', str(top / 'locked')))
            return walk(top, onerror=onerror, **kw)
        monkeypatch.setattr(D.os, 'walk', walk_with_error)
        name = 'locked'
    else:
        source = tmp_path / 'list.csv'
        cell = '' if kind == 'empty cell' else 'scans/missing.nii.gz'
        source.write_text(f'path,label\nscans/good.nii.gz,0\n{cell},1\n')
        name = 'line 3' if kind == 'empty cell' else 'missing.nii.gz'
    with pytest.raises((ValueError, FileNotFoundError), match=name):
        D.find_ct_scans(source)
    skipped = []
    with pytest.warns(UserWarning, match=name):
        assert D.find_ct_scans(source, on_error='skip', skipped=skipped) == [good]
    assert len(skipped) == 1 and name in skipped[0][0]


def test_the_loader_reports_what_the_search_skipped(tmp_path):
    from dagman_fast.data import ct_ssl_dls
    _ct(tmp_path / 'scans' / 'good.nii.gz')
    (tmp_path / 'scans' / 'gone.nii.gz').symlink_to(tmp_path / 'nowhere.nii.gz')
    with pytest.warns(UserWarning, match='gone.nii.gz'):
        dls = ct_ssl_dls(tmp_path / 'scans', crop=16, bs=1, cache_dir=tmp_path / 'c', on_error='skip', progress=False)
    assert [os.path.basename(p) for p, _ in dls.skipped] == ['gone.nii.gz'] and 'symbolic link' in dls.skipped[0][1]


def test_the_cli_takes_several_data_folders(tmp_path, capsys):
    _ct(tmp_path / 'a' / 'p1.nii.gz', (40, 40, 40))
    _ct(tmp_path / 'b' / 'p2' / 'ct.nii.gz', (40, 40, 40))
    rc, out, err = run_cli(capsys, 'pretrain', '--data', str(tmp_path / 'a'), str(tmp_path / 'b'), '--preset',
                           'swin-tiny', '--crop', '32', '--bs', '1', '--epochs', '1', '--out', str(tmp_path / 'r'),
                           '--cache-dir', str(tmp_path / 'c'))
    assert rc == 0, err
    assert '2 volume(s) used, 0 skipped' in out


# --- degenerate volumes (issue 17, item 5) ----------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(1, 40, 40), (40, 40, 1), (2, 2, 2), (3, 64, 64)])
def test_a_single_slice_or_a_tiny_volume_is_not_ct(tmp_path, shape):
    from dagman_fast.data import CTPreprocess, CTVolumes
    bad = _ct(tmp_path / 'thin.nii.gz', shape)
    with pytest.raises(ValueError, match='not a 3-D CT volume'):
        CTVolumes([bad], CTPreprocess(crop=(16, 16, 16)), tmp_path / 'c', progress=False)
    ok = _ct(tmp_path / 'ok.nii.gz', (4, 64, 64))  # few slices are padded up to the crop: still CT
    assert CTVolumes([ok], CTPreprocess(crop=(16, 16, 16)), tmp_path / 'c', progress=False)[0].shape[0] == 1


def test_a_dicom_series_with_a_missing_slice_is_refused(shared_data, tmp_path):
    from dagman_fast.data import CTPreprocess, CTVolumes
    folder = _slab(shared_data, tmp_path / 'gap', keep=set(range(16)) - {7})
    with pytest.raises(ValueError, match=r'1 slice\(s\) missing'):
        CTVolumes([folder], CTPreprocess(crop=(16, 16, 16)), tmp_path / 'c', progress=False)
    whole = _slab(shared_data, tmp_path / 'whole')  # the complete series passes
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert len(CTVolumes([whole], CTPreprocess(crop=(16, 16, 16)), tmp_path / 'c', progress=False)) == 1


def test_a_corrupt_dicom_slice_is_named_as_corrupt(shared_data, tmp_path):
    from dagman_fast.data import CTPreprocess, CTVolumes
    bad = _slab(shared_data, tmp_path / 'series', corrupt=5)
    with pytest.raises(ValueError, match=f'slice {bad.name} is corrupt'):
        CTVolumes([bad.parent], CTPreprocess(crop=(16, 16, 16)), tmp_path / 'c', progress=False)


@pytest.mark.parametrize('task', [['--medmnist', 'adrenalmnist3d', '--root', '.'],
                                  ['--seg', 'ct.nii.gz', 'seg.nii.gz', '--labels', '1']])
def test_finetune_checks_its_encoder_before_any_data(tmp_path, capsys, task):
    rc, _, err = run_cli(capsys, 'finetune', *task, '--encoder', str(tmp_path / 'nope.pth'),
                         '--out', str(tmp_path / 'ft'))
    assert rc == 2
    assert_one_line_error(err, '--encoder', 'nope.pth')
    assert not (tmp_path / 'ft').exists()


def test_a_dicom_slice_cut_short_is_named_as_corrupt(shared_data, tmp_path):
    "Only the headers are read before loading: a slice whose file ends inside its pixel data is still caught."
    from dagman_fast.data import CTPreprocess, CTVolumes
    folder = _slab(shared_data, tmp_path / 'series')
    cut = sorted(folder.glob('*.dcm'))[9]
    cut.write_bytes(cut.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f'slice {cut.name} is corrupt.*before its pixel data'):
        CTVolumes([folder], CTPreprocess(crop=(16, 16, 16)), tmp_path / 'c', progress=False)
