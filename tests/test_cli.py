"""The `dagman` command (installed as a console script)."""
import subprocess
import sys

import nibabel as nib
import pytest
import numpy as np

from dagman_fast.cli import main


def assert_fails(capsys, argv, match, status=None):
    """`dagman ARGV` ends in one line `dagman: error: ...` containing `match` (no traceback), with exit status 2 (a bad
    argument) or 1 (bad data), or `status` when given."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    err = capsys.readouterr().err
    assert rc == status if status is not None else rc in (1, 2), (rc, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith('dagman: error: ') and match in last and 'Traceback' not in err, err


def test_console_script_help():
    out = subprocess.run([sys.executable, '-m', 'dagman_fast.cli', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'show-batch' in out.stdout


def test_show_batch_writes_png_and_reports_skipped(tmp_path, capsys):
    hu = np.full((40, 40, 40), -1000.0, np.float32)
    hu[8:32, 8:32, 8:32] = 40.0
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / 'good.nii.gz'))
    (tmp_path / 'broken.nii.gz').write_bytes(b'not a scan')
    out = tmp_path / 'png' / 'batch.png'
    assert main(['show-batch', str(tmp_path), '--crop', '16', '--bs', '1', '--on-error', 'skip', '--out', str(out),
                 '--cache-dir', str(tmp_path / 'cache')]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    err = capsys.readouterr().err
    assert 'skipped' in err and 'broken.nii.gz' in err


@pytest.mark.slow
def test_pretrain_resume_and_export(tmp_path, capsys):
    import csv

    import torch
    from monai.networks.nets.swin_unetr import SwinTransformer

    from dagman_fast.checkpoint import load_encoder
    from dagman_fast.monai_interop import monai_swin_kwargs

    out = tmp_path / 'run'
    common = ['pretrain', '--out', str(out), '--synthetic', '2', '--crop', '32', '--bs', '1',
              '--set', 'out_dim=64', '--set', 'head_hidden=32', '--cache-dir', str(tmp_path / 'cache')]
    assert main(common + ['--epochs', '2']) == 0
    for name in ('encoder.pth', 'encoder.json', 'pretrain_log.csv', 'pretrain_log.png', 'config.json',
                 'models/checkpoint.pth'):
        assert (out / name).exists(), name
    rows = list(csv.DictReader(open(out / 'pretrain_log.csv')))
    assert [r['epoch'] for r in rows] == ['0', '1'] and float(rows[0]['mask_ratio']) > 0
    enc = load_encoder(out / 'encoder.pth')
    assert enc.config.embed_dim == 24  # swin-tiny on the CPU
    # a resumed run with a longer schedule continues from the checkpoint
    assert main(common + ['--epochs', '3', '--resume']) == 0
    assert 'resuming from' in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / 'pretrain_log.csv')))
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert torch.load(out / 'models' / 'checkpoint.pth', weights_only=True)['epoch'] == 2
    # export in MONAI's layout loads strictly into MONAI's SwinTransformer
    assert main(['export', str(out / 'models' / 'checkpoint.pth'), '--out', str(tmp_path / 'm.pth'), '--monai']) == 0
    twin = SwinTransformer(**monai_swin_kwargs(enc.config))
    twin.load_state_dict(torch.load(tmp_path / 'm.pth', weights_only=True), strict=True)


def test_pretrain_rejects_bad_set(capsys):
    assert_fails(capsys, ['pretrain', '--set', 'mask_ratio'], 'KEY=VALUE')


def test_pretrain_refuses_crops_per_scan_with_medmnist(tmp_path, capsys):
    # a MedMNIST volume is one view: the option would be ignored, so it is refused before anything is read or written
    assert_fails(capsys, ['pretrain', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--crops-per-scan',
                          '4', '--out', str(tmp_path / 'run')], '--crops-per-scan is for CT scans', status=2)
    assert not (tmp_path / 'run').exists()


def test_pretrain_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['pretrain', '--out', str(out), '--resume']) == 2
    assert 'no checkpoint' in capsys.readouterr().err
    (out / 'models').mkdir(parents=True)
    (out / 'models' / 'checkpoint.pth').write_bytes(b'x')
    assert main(['pretrain', '--out', str(out)]) == 2
    assert '--resume' in capsys.readouterr().err
    assert_fails(capsys, ['pretrain', '--out', str(tmp_path / 'other'), '--set', 'drop_path_rate=0'], 'encoder.drop_path_rate')
    assert not (tmp_path / 'other').exists()  # nothing written before the options are checked


def _fake_medmnist(root, n=(12, 6, 8)):
    "A file in the official MedMNIST layout: uint8 28^3 images, labels (n, 1); class 1 is brighter."
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(('train', 'val', 'test'), n):
        y = np.arange(k) % 2
        x = (rng.random((k, 28, 28, 28)) * 100 + y[:, None, None, None] * 120).astype(np.uint8)
        arrays[f'{split}_images'], arrays[f'{split}_labels'] = x, y[:, None]
    np.savez(root / 'adrenalmnist3d.npz', **arrays)


@pytest.mark.slow
def test_finetune_and_evaluate(tmp_path, capsys):
    import json

    import torch

    from tests.test_learner import make_learner, quiet_fit
    _fake_medmnist(tmp_path)
    pre = make_learner(tmp_path / 'pre')
    quiet_fit(pre, 1)
    enc = pre.export_encoder(tmp_path / 'enc.pth')
    data = ['--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--bs', '4']
    out = tmp_path / 'ft'
    assert main(['finetune', *data, '--encoder', str(enc), '--epochs', '1', '--out', str(out)]) == 0
    res = json.loads((out / 'results.json').read_text())
    assert res['n_train'] == 12 and res['test']['n'] == 8 and res['valid']['n'] == 6
    assert set(res['test']) >= {'auc', 'accuracy', 'sensitivity', 'specificity'}
    used = {k: res['config'][k] for k in ('bs', 'size', 'class_weights', 'drop_path', 'label_rule', 'seed')}
    assert used == dict(bs=4, size=28, class_weights='balanced', drop_path=0.1, label_rule=None, seed=0)  # not None
    printed = capsys.readouterr().out
    assert 'better model at epoch 0: auc ' in printed and 'Better model found' not in printed  # one short line
    for name in ('classifier.pth', 'roc_test.png', 'roc_valid.png'):
        assert (out / name).exists(), name
    torch.load(out / 'classifier.pth', weights_only=True)
    capsys.readouterr()
    assert main(['evaluate', str(out / 'classifier.pth'), '--out', str(tmp_path / 'ev')]) == 0  # its own data
    again = json.loads((tmp_path / 'ev' / 'results_test.json').read_text())
    assert again == pytest.approx(res['test'])  # the saved classifier reproduces the fine-tuned one
    assert main(['evaluate', str(out / 'classifier.pth'), *data, '--split', 'valid', '--out', str(tmp_path / 'ev')]) == 0
    assert json.loads((tmp_path / 'ev' / 'results_valid.json').read_text()) == pytest.approx(res['valid'])
    probe = tmp_path / 'probe'
    assert main(['finetune', *data, '--linear-probe', '--fraction', '0.5', '--epochs', '1', '--preset', 'swin-tiny',
                 '--out', str(probe)]) == 0
    assert json.loads((probe / 'results.json').read_text())['n_train'] == 6
    assert_fails(capsys, ['finetune', '--out', str(tmp_path / 'x')], 'one dataset')
    assert_fails(capsys, ['finetune', *data, '--fraction', '0', '--out', str(tmp_path / 'x')], 'fraction')
    assert not (tmp_path / 'x').exists()


def _fake_seg_pair(folder, name, seed):
    "A 40^3 soft-tissue volume at 2 mm, air at one edge, with a bright cube (label values 3 and 4) and a dark slab (7)."
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 15, (40, 40, 40)).astype(np.float32)
    lab = np.zeros((40, 40, 40), np.uint8)
    o = 3 * seed  # the objects move between volumes
    hu[4 + o:16 + o, 5:17, 6:18] += 150
    lab[4 + o:16 + o, 5:17, 6:18] = 3
    lab[4 + o:8 + o, 5:17, 6:18] = 4  # the same object, another label value: merged by --labels 3,4
    hu[22:34, 20:36, 10 + o:30 + o] -= 120
    lab[22:34, 20:36, 10 + o:30 + o] = 7
    hu[:, :, :2] = -1000.0  # a strip of air at the edge of the field, as every CT has (no air: not a CT)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = folder / f'{name}_ct.nii.gz', folder / f'{name}_seg.nii.gz'
    nib.save(nib.Nifti1Image(hu, aff), str(paths[0]))
    nib.save(nib.Nifti1Image(lab, aff), str(paths[1]))
    return [str(p) for p in paths]


@pytest.mark.slow
def test_finetune_and_evaluate_segmentation(tmp_path, capsys):
    """`dagman finetune --seg` from an encoder exported by pretraining on other data: whole-volume Dice per named
    class on the held-out volume, an overlay, a segmenter that `dagman evaluate` scores the same again."""
    import json

    import torch

    from dagman_fast.segment import dice_per_class, load_segmenter
    from tests.test_learner import make_learner, quiet_fit
    pre = make_learner(tmp_path / 'pre')
    quiet_fit(pre, 1)
    enc = pre.export_encoder(tmp_path / 'enc.pth')
    train, valid = _fake_seg_pair(tmp_path, 'a', 0), _fake_seg_pair(tmp_path, 'b', 1)
    out = tmp_path / 'seg'
    args = ['finetune', '--seg', *train, '--valid-seg', *valid, '--labels', '3,4', '7', '--label-names', 'bright',
            'dark', '--hu-range', '-200', '300', '--crop', '64', '--bs', '1', '--samples-per-volume', '2',
            '--epochs', '1', '--freeze-epochs', '1', '--cache-dir', str(tmp_path / 'cache')]
    assert main([*args, '--encoder', str(enc), '--out', str(out)]) == 0
    res = json.loads((out / 'results.json').read_text())
    assert res['n_train_volumes'] == 1 and [v['name'] for v in res['valid']['volumes']] == ['b_ct']
    dice = res['valid']['dice']
    assert list(dice) == ['bright', 'dark'] and all(0 <= d <= 1 for d in dice.values())
    assert res['valid']['n_volumes'] == {'bright': 1, 'dark': 1}
    assert (out / 'overlay_b_ct.png').read_bytes()[:4] == b'\x89PNG'
    model = load_segmenter(out / 'segmenter.pth')  # weights only
    assert model.n_classes == 3 and model.data['labels'] == ['3,4', '7']
    # Its Dice is the Dice of its own prediction against the hand-built reference (same 2 mm grid, merged labels).
    from dagman_fast.data import CTPreprocess
    from dagman_fast.segment import SegVolumes
    vols = SegVolumes([valid], CTPreprocess(spacing=(2.0,) * 3, hu_range=(-200.0, 300.0), crop=(64,) * 3),
                      ['3,4', '7'], cache_dir=tmp_path / 'cache2', progress=False)
    from dagman_fast.segment import predict_volume
    ref = vols[0]['label'][0]
    raw = np.asarray(nib.load(valid[1]).dataobj)
    assert int((ref == 1).sum()) == int(np.isin(raw, [3, 4]).sum()) and int((ref == 2).sum()) == int((raw == 7).sum())
    again = dice_per_class(predict_volume(model, vols[0]['image'], 64), ref, 3)
    assert again == pytest.approx(list(dice.values()), abs=1e-6)
    capsys.readouterr()
    assert main(['evaluate', str(out / 'segmenter.pth'), '--out', str(tmp_path / 'ev')]) == 0  # its validation volume
    ev = json.loads((tmp_path / 'ev' / 'results_seg.json').read_text())
    assert ev['dice'] == pytest.approx(dice, abs=1e-6) and (tmp_path / 'ev' / 'overlay_b_ct.png').exists()
    # Fine-tuning started from the pretrained weights: the patch embedding (the smallest rate of the spread, base/200,
    # one Adam step) stays within 1e-4 of them, where a fresh initialisation differs by ~0.02.
    sd = torch.load(enc, weights_only=True)['state_dict']
    assert sd.keys() == model.encoder.state_dict().keys()
    key = next(k for k in sd if k.startswith('patch_embed') and k.endswith('weight') and sd[k].ndim == 5)
    torch.testing.assert_close(model.encoder.state_dict()[key], sd[key], atol=1e-4, rtol=0)
    assert_fails(capsys, ['finetune', '--seg', *train, '--out', str(tmp_path / 'x')], '--labels')
    assert_fails(capsys, ['finetune', '--seg', *train, '--labels', '3', '--label-names', 'a', 'b', '--out', str(tmp_path / 'x')], '2 names for 1')
    assert_fails(capsys, ['finetune', '--seg', *train, '--valid-seg', *valid, '--labels', 'kidney', '--out', str(tmp_path / 'x')], "--labels: 'kidney'")
    assert_fails(capsys, ['finetune', '--seg', *train, '--labels', '3', '--crop', '48', '--out', str(tmp_path / 'x')], 'multiple of 32')  # before any training
    assert_fails(capsys, ['finetune', '--seg', *train, '--labels', '3', '--medmnist', 'adrenalmnist3d', '--out', str(tmp_path / 'x')], '--medmnist: not an option of segmentation')
    assert_fails(capsys, ['finetune', '--seg', *train, '--valid-seg', *train, '--labels', '3', '--out', str(tmp_path / 'x')], 'both training and validation')
    csv_file = tmp_path / 'pairs.csv'
    csv_file.write_text(f'image,label,split\n{train[0]},{train[1]},train\n{valid[0]},{valid[1]},test\n')
    assert_fails(capsys, ['finetune', '--seg-csv', str(csv_file), '--labels', '3', '--out', str(tmp_path / 'x')], "line 3: split 'test'")  # a test row never trains by accident
    assert_fails(capsys, ['evaluate', str(out / 'segmenter.pth'), '--labels', '3', '--out', str(tmp_path / 'x')], 'segments 2')
    assert not (tmp_path / 'x').exists()


@pytest.mark.slow
def test_pretrain_on_medmnist_then_finetune(tmp_path, capsys):
    "`dagman pretrain --medmnist` on the unlabelled training images, then `dagman finetune` from its encoder."
    import json

    _fake_medmnist(tmp_path)
    run = tmp_path / 'pre'
    assert main(['pretrain', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--bs', '4', '--epochs', '1',
                 '--preset', 'swin-tiny', '--out', str(run)]) == 0
    cfg = json.loads((run / 'config.json').read_text())
    # 32^3 views: SA and mask one stage earlier (a 4^3 grid), the short-run DINO settings
    assert cfg['encoder']['img_size'] in (32, [32, 32, 32]) and cfg['encoder']['sa_stage'] == 2
    assert cfg['dagman']['mask_stage'] == 2 and cfg['encoder']['drop_path_rate'] == 0.0
    assert '12 volume(s) used' in capsys.readouterr().out  # the training split only: labels and other splits unused
    out = tmp_path / 'ft'
    assert main(['finetune', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--bs', '4', '--epochs', '1',
                 '--encoder', str(run / 'encoder.pth'), '--out', str(out)]) == 0
    assert json.loads((out / 'results.json').read_text())['test']['n'] == 8
    assert_fails(capsys, ['pretrain', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--data', 'x', '--out',
              str(tmp_path / 'y')], 'not both')


def test_pretrain_help_lists_every_method(capsys):
    from dagman_fast.model import METHODS
    with pytest.raises(SystemExit) as e:
        main(['pretrain', '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f'\n  {name} ' in out, name


@pytest.mark.slow
@pytest.mark.parametrize('method', ['ibot3d', 'sa-stage-4', 'no-amip'])
def test_pretrain_runs_baselines_and_ablations(tmp_path, method):
    import json

    from dagman_fast.model import METHODS
    out = tmp_path / method
    assert main(['pretrain', '--method', method, '--out', str(out), '--synthetic', '2', '--crop', '64', '--bs', '1',
                 '--epochs', '1', '--set', 'out_dim=64', '--set', 'head_hidden=32',
                 '--cache-dir', str(tmp_path / 'cache')]) == 0
    cfg = json.loads((out / 'config.json').read_text())
    spec = METHODS[method]
    assert tuple(cfg['dagman']['losses']) == spec.get('losses', ('aitd', 'ampd', 'gitd', 'amip'))
    assert cfg['dagman']['masking'] == spec.get('masking', 'attention')
    assert cfg['encoder']['sa_stage'] == spec.get('encoder', {}).get('sa_stage', 3)
    assert (out / 'encoder.pth').exists()


@pytest.mark.slow
def test_the_demo_pretrains_on_the_shipped_ct_with_small_view_settings(tmp_path, capsys):
    """No --data: the two shipped chest CTs, 32^3 views in batches of 8, the SA module and the mask after stage 2, and
    the first and last epoch's mean of every loss term in one line; --crops-per-scan sets the epoch's length."""
    import csv
    import json
    out = tmp_path / 'run'
    assert main(['pretrain', '--out', str(out), '--epochs', '2', '--crops-per-scan', '4', '--set', 'out_dim=64',
                 '--set', 'head_hidden=32', '--cache-dir', str(tmp_path / 'cache')]) == 0
    text = capsys.readouterr().out
    assert 'the two small chest CTs the package ships' in text and '2 volume(s) used, 0 skipped' in text, text
    assert 'demo run: 1 steps of 8 x 2 views per epoch' in text, text
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['encoder']['sa_stage'] == 2 and cfg['dagman']['mask_stage'] == 2 and cfg['encoder']['drop_path_rate'] == 0
    rows = list(csv.DictReader(open(out / 'pretrain_log.csv')))
    line = next(ln for ln in text.splitlines() if ln.startswith('losses, mean of the first epoch -> of the last: '))
    for term in ('train_loss', 'aitd', 'ampd', 'gitd', 'amip', 'koleo'):
        assert f'{term} {float(rows[0][term]):.3g} -> {float(rows[-1][term]):.3g}' in line, (term, line)
    assert "the table's train_loss is fastai's running average" in text  # why the table and the CSV differ
    # off a terminal: fastai's table of epochs, no progress bars, no stray bar characters
    assert '█' not in text and '\r' not in text and any(ln.startswith('epoch') for ln in text.splitlines()), text
    assert not (out / 'synthetic_data').exists() and (out / 'pretrain_log.png').exists()


@pytest.mark.slow
def test_the_user_beats_the_method_which_beats_the_run_defaults(tmp_path):
    "One precedence for the command and `dagman_learner`: `--set` > `--method` > the run defaults (a 32^3 demo)."
    import json
    common = ['pretrain', '--synthetic', '2', '--crop', '32', '--bs', '1', '--epochs', '1', '--set', 'out_dim=64',
              '--cache-dir', str(tmp_path / 'cache')]
    stage = {}
    for name, extra in [('dagman', []), ('smit', ['--method', 'smit']),
                        ('smit-user', ['--method', 'smit', '--set', 'encoder.sa_stage=3'])]:
        assert main([*common, *extra, '--out', str(tmp_path / name)]) == 0
        cfg = json.loads((tmp_path / name / 'config.json').read_text())
        stage[name] = (cfg['encoder']['sa_stage'], cfg['dagman']['out_dim'], cfg['dagman']['head_hidden'])
    # the demo's stage 2; smit's no SA module; the user's stage 3; the user's out_dim over the tiny heads' 1024,
    # whose head_hidden (512) stays
    assert stage == {'dagman': (2, 64, 512), 'smit': (None, 64, 512), 'smit-user': (3, 64, 512)}, stage


def test_each_subcommand_is_one_library_call_with_the_same_argument_names():
    import inspect

    from dagman_fast import recipes, tasks
    from dagman_fast.cli import build_parser
    subs = build_parser()._subparsers._group_actions[0].choices
    assert set(subs) == {'show-batch', 'preprocess', 'pretrain', 'finetune', 'evaluate', 'analyze', 'export'}
    for name, s in subs.items():
        mod, fn = s.get_default('func')
        params = {k for k, p in inspect.signature(getattr({'recipes': recipes, 'tasks': tasks}[mod], fn)).parameters.items()
                  if p.kind != p.VAR_KEYWORD}
        dests = {a.dest for a in s._actions} - {'help', 'debug'}
        assert dests - {'set'} == params, (name, sorted(dests ^ params))


@pytest.mark.parametrize('given,expected', [('bf16', 'bf16'), ('fp32', False)])
def test_pretrain_amp_reaches_the_learner(tmp_path, monkeypatch, given, expected):
    import dagman_fast.learner as learner_mod
    seen = {}
    real = learner_mod.dagman_learner

    def spy(dls, **kw):
        seen.update(amp=kw.get('amp'), compile=kw.get('compile'))
        learn = real(dls, **kw)
        seen['mixed'] = [type(c).__name__ for c in learn.cbs if type(c).__name__ == 'DeviceMixedPrecision']
        return learn

    monkeypatch.setattr(learner_mod, 'dagman_learner', spy)
    assert main(['pretrain', '--amp', given, '--out', str(tmp_path / 'run'), '--synthetic', '2', '--crop', '32',
                 '--bs', '2', '--epochs', '1', '--set', 'out_dim=64', '--set', 'head_hidden=32']) == 0
    assert seen['amp'] == expected and seen['compile'] is False
    assert seen['mixed'] == (['DeviceMixedPrecision'] if expected else [])


def test_pretrain_loader_workers_by_device():
    "`--workers` unset: none on the CPU (they would take the step's cores), up to 4 on CUDA; a given number is kept."
    from dagman_fast.recipes import _loader_workers
    assert _loader_workers(None, cuda=False) == 0
    assert _loader_workers(3, cuda=True) == 3 and _loader_workers(0, cuda=True) == 0
    import os
    assert _loader_workers(None, cuda=True) == min(4, len(os.sched_getaffinity(0)))


def _fake_nodules(path, n=30, seed=0):
    "Nodule crops in the layout of the LIDC file: HU images at 32^3, median malignancy 1-5, readers per nodule."
    rng = np.random.default_rng(seed)
    median = rng.choice([1.0, 2.0, 2.5, 4.0, 4.5, 5.0], n)
    hu = rng.normal(-700, 100, (n, 32, 32, 32)) + (median > 3)[:, None, None, None] * 500
    np.savez(path, images_32=hu.astype(np.int16), malignancy_median=median, n_readers=np.full(n, 4))
    return path


def test_finetune_folds_with_a_held_out_test_set(tmp_path, capsys):
    """`--folds 3`: three fold models, each validated on its own fold and scored on one untouched test set (a
    stratified share of the nodules, or MedMNIST's official split), then their ensemble; mean and sd over folds."""
    import json
    npz = _fake_nodules(tmp_path / 'nodules.npz')
    out = tmp_path / 'cv'
    common = ['--preset', 'swin-tiny', '--epochs', '1', '--bs', '4', '--no-augment']
    assert main(['finetune', '--nodules', str(npz), '--size', '32', '--folds', '3', '--test-split', '0.2', *common,
                 '--out', str(out)]) == 0
    res = json.loads((out / 'results.json').read_text())
    assert (res['n_dev'], res['n_test'], len(res['folds'])) == (24, 6, 3)
    assert [f['n_valid'] for f in res['folds']] == [8, 8, 8] and all(f['n_train'] == 16 for f in res['folds'])
    assert all(f['test']['n'] == 6 for f in res['folds'])  # every fold scored on the same test set
    aucs = [f['test']['auc'] for f in res['folds']]
    assert res['test']['auc']['values'] == aucs and res['test']['auc']['n'] == 3
    assert res['test']['auc']['mean'] == pytest.approx(np.mean(aucs))
    assert res['test']['auc']['std'] == pytest.approx(np.std(aucs, ddof=1))
    assert set(res['test_ensemble']) >= {'auc', 'accuracy', 'sensitivity', 'specificity'} and res['test_ensemble']['n'] == 6
    for k in (1, 2, 3):
        assert (out / f'fold{k}' / 'classifier.pth').exists() and (out / f'fold{k}' / 'roc_test.png').exists()
    assert (out / 'roc_test_ensemble.png').exists() and 'mean +- sd' in capsys.readouterr().out
    _fake_medmnist(tmp_path)  # the official test split is the held-out one
    med = ['--medmnist', 'adrenalmnist3d', '--root', str(tmp_path)]
    assert main(['finetune', *med, '--folds', '3', *common, '--out', str(tmp_path / 'cv2')]) == 0
    res = json.loads((tmp_path / 'cv2' / 'results.json').read_text())
    assert res['config']['test_split'] == 'official' and res['n_test'] == 8 and res['n_dev'] == 18
    assert_fails(capsys, ['finetune', '--nodules', str(npz), '--folds', '3', '--test-split', '1.5', '--out',
                          str(tmp_path / 'x')], 'test-split')
    assert_fails(capsys, ['finetune', '--nodules', str(npz), '--test-split', '0.2', '--out', str(tmp_path / 'x')],
                 'goes with --folds')
    assert_fails(capsys, ['finetune', '--nodules', str(npz), '--size', '32', '--folds', '20', '--out',
                          str(tmp_path / 'x')], 'at least 20 development items')


def test_pretrain_epochs_default_by_kind_of_data(tmp_path, capsys, monkeypatch):
    "Real CT (--data or an index) defaults to the paper's 800 epochs; the demo and MedMNIST keep their short run."
    from dagman_fast import recipes
    assert recipes.run_epochs('ct') == recipes.PAPER_EPOCHS == 800
    assert recipes.run_epochs('demo') == recipes.run_epochs('medmnist') == 10
    planned = []

    def fit(self, epochs, *a, **k):  # plan only: record the epochs the run would train
        planned.append(epochs)
    from dagman_fast.learner import DAGMaNLearner
    monkeypatch.setattr(DAGMaNLearner, 'fit_warmup_cosine', fit)
    monkeypatch.setattr(recipes, 'check_replicas', lambda learn: True)
    from dagman_fast.data import demo_ct_scans
    scan = str(demo_ct_scans()[0])
    common = ['--crop', '32', '--bs', '1', '--set', 'out_dim=64', '--set', 'head_hidden=32']
    main(['pretrain', '--data', scan, *common, '--out', str(tmp_path / 'ct')])
    main(['pretrain', *common, '--out', str(tmp_path / 'demo')])
    main(['pretrain', '--data', scan, *common, '--epochs', '3', '--out', str(tmp_path / 'given')])
    assert planned == [800, 10, 3]
    err = capsys.readouterr()
    text = err.out + err.err
    assert "800 epochs, the paper's length on real CT" in text and '10 epochs: the demo is a short run' in text


def test_pretrain_view_augment_crop_only_is_the_papers_views(tmp_path, capsys, monkeypatch):
    "`--view-augment crop-only`: views that differ only by their crops; recorded in config.json for --resume."
    import json

    from dagman_fast import recipes
    from dagman_fast.learner import DAGMaNLearner
    seen = []
    monkeypatch.setattr(DAGMaNLearner, 'fit_warmup_cosine', lambda self, *a, **k: seen.append(self.dls.train.dataset))
    monkeypatch.setattr(recipes, 'check_replicas', lambda learn: True)
    common = ['--crop', '32', '--bs', '1', '--epochs', '1', '--set', 'out_dim=64', '--set', 'head_hidden=32']
    main(['pretrain', *common, '--view-augment', 'crop-only', '--out', str(tmp_path / 'paper')])
    main(['pretrain', *common, '--out', str(tmp_path / 'default')])
    assert [(v.flip_prob, v.intensity) for v in seen] == [(0.0, 0.0), (0.5, 0.1)]
    recorded = [json.loads((tmp_path / r / 'config.json').read_text())['run']['args']['view_augment']
                for r in ('paper', 'default')]
    assert recorded == ['crop-only', 'flip-jitter']
    assert recipes.VIEW_AUGMENTS['crop-only'] == dict(flip_prob=0.0, intensity=0.0)


def test_finetune_protocol_paper_sets_the_papers_values(tmp_path, monkeypatch):
    "`protocol='paper'`: batch 40, 1,000 epochs, 3 folds; a value given explicitly wins over its protocol's."
    from dagman_fast import tasks
    seen = []
    monkeypatch.setattr(tasks, '_train', lambda learn, **train: seen.append(train['epochs']))  # plan only
    npz = _fake_nodules(tmp_path / 'nodules.npz')
    kw = dict(nodules=npz, size=32, preset='swin-tiny', test_split=0.2, no_augment=True)
    res = tasks.finetune(out=tmp_path / 'paper', protocol='paper', **kw)
    assert seen == [1000] * 3 and res['config']['bs'] == 40 and len(res['folds']) == 3
    seen.clear()
    res = tasks.finetune(out=tmp_path / 'given', protocol='paper', epochs=2, folds=2, bs=8, **kw)
    assert seen == [2, 2] and res['config']['bs'] == 8 and len(res['folds']) == 2
    with pytest.raises(Exception, match='protocol'):
        tasks.finetune(out=tmp_path / 'x', protocol='papr', **kw)
