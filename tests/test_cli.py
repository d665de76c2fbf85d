"""The `dagman` command (installed as a console script)."""
import subprocess
import sys

import nibabel as nib
import pytest
import numpy as np

from dagman_fast.cli import main


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


def test_pretrain_resume_and_export(tmp_path, capsys):
    import csv

    import torch
    from monai.networks.nets.swin_unetr import SwinTransformer

    from dagman_fast.learner import load_encoder
    from dagman_fast.swin import monai_swin_kwargs

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


def test_pretrain_rejects_bad_set():
    import pytest
    with pytest.raises(SystemExit, match='KEY=VALUE'):
        main(['pretrain', '--set', 'mask_ratio'])


def test_pretrain_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path, capsys):
    import pytest
    out = tmp_path / 'run'
    assert main(['pretrain', '--out', str(out), '--resume']) == 2
    assert 'no checkpoint' in capsys.readouterr().err
    (out / 'models').mkdir(parents=True)
    (out / 'models' / 'checkpoint.pth').write_bytes(b'x')
    assert main(['pretrain', '--out', str(out)]) == 2
    assert '--resume' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='encoder.drop_path_rate'):
        main(['pretrain', '--out', str(tmp_path / 'other'), '--set', 'drop_path_rate=0'])
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
    with pytest.raises(SystemExit, match='one dataset'):
        main(['finetune', '--out', str(tmp_path / 'x')])
    with pytest.raises(SystemExit, match='fraction'):
        main(['finetune', *data, '--fraction', '0', '--out', str(tmp_path / 'x')])
    assert not (tmp_path / 'x').exists()
