"""Nothing lost (issue 26): no command destroys work, a run folder is written by one run at a time, and a failed
command leaves no empty folder behind. Each case is a reproduction from the issue or one of the same kind."""
from __future__ import annotations

import hashlib

import pytest
from test_hardening import assert_one_line_error, run_cli

from dagman_fast.checkpoint import save_encoder
from dagman_fast.core import FolderLock
from dagman_fast.swin import build_encoder


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('enc') / 'encoder.pth'
    save_encoder(build_encoder('swin-tiny', img_size=32), path)
    return path


# ---------------------------------------------------------------- outputs never replace inputs


@pytest.mark.parametrize('name', ['encoder.pth', 'encoder.json', 'sub/../encoder.pth'])
def test_export_never_writes_over_its_input_or_the_inputs_sidecar(encoder_file, capsys, name):
    before = {p.name: digest(p) for p in encoder_file.parent.iterdir()}
    rc, _, err = run_cli(capsys, 'export', str(encoder_file), '--out', str(encoder_file.parent / name))
    assert rc == 2
    assert_one_line_error(err, 'an input of this command')
    assert {p.name: digest(p) for p in encoder_file.parent.iterdir()} == before


def test_export_never_writes_a_runs_checkpoint(encoder_file, tmp_path, capsys):
    ck = tmp_path / 'run' / 'models' / 'checkpoint.pth'
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b'a training checkpoint')
    rc, _, err = run_cli(capsys, 'export', str(encoder_file), '--out', str(ck))
    assert rc == 2
    assert_one_line_error(err, "run's checkpoint")
    assert ck.read_bytes() == b'a training checkpoint'


def test_export_writes_a_new_file_beside_its_input(encoder_file, tmp_path, capsys):
    "The control: a name that is no input is written (so the refusals above are about the names)."
    rc, out, _ = run_cli(capsys, 'export', str(encoder_file), '--out', str(tmp_path / 'copy.pth'))
    assert rc == 0 and (tmp_path / 'copy.pth').is_file() and (tmp_path / 'copy.json').is_file()


# ---------------------------------------------------------------- one run per folder


def test_finetune_refuses_a_folder_that_holds_a_finetuning(tmp_path, capsys):
    out = tmp_path / 'cls'
    out.mkdir()
    (out / 'classifier.pth').write_bytes(b'weights')
    (out / 'results.json').write_text('{"auc": 0.8}')
    rc, _, err = run_cli(capsys, 'finetune', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--out', str(out))
    assert rc == 2
    assert_one_line_error(err, 'already holds a fine-tuning')
    assert (out / 'classifier.pth').read_bytes() == b'weights' and (out / 'results.json').read_text() == '{"auc": 0.8}'


@pytest.mark.parametrize('command', [['pretrain', '--synthetic', '2', '--crop', '32', '--bs', '1', '--epochs', '1'],
                                     ['finetune', '--medmnist', 'adrenalmnist3d', '--epochs', '1']])
def test_a_folder_another_run_is_writing_is_refused(tmp_path, capsys, command):
    "A second run with the same --out while the first holds it (the lock the first run takes): refused, nothing written."
    from test_cli import _fake_medmnist
    _fake_medmnist(tmp_path)
    out = tmp_path / 'run'
    out.mkdir()
    with FolderLock(out, 'held by the test'):  # what a running `dagman pretrain --out run` holds
        rc, _, err = run_cli(capsys, *command, *(['--root', str(tmp_path)] if 'finetune' in command else []),
                             '--out', str(out))
    assert rc == 1
    assert_one_line_error(err, 'another dagman run is writing in this folder')
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- a failed command leaves nothing behind


@pytest.mark.parametrize('command', ['pretrain', 'finetune'])
def test_a_failed_run_leaves_no_empty_out_folder(tmp_path, capsys, command):
    data = tmp_path / 'scans'
    data.mkdir()
    (data / 'broken.nii.gz').write_bytes(b'not a scan')
    out = tmp_path / 'never'
    if command == 'pretrain':
        argv = ['pretrain', '--data', str(data), '--crop', '32', '--epochs', '1']
    else:  # a label map that is not there: the pairs are checked once the run has started
        argv = ['finetune', '--seg', str(data / 'broken.nii.gz'), str(data / 'missing.nii.gz'), '--labels', '1',
                '--crop', '32', '--epochs', '1']
    rc, _, err = run_cli(capsys, *argv, '--out', str(out))
    assert rc in (1, 2)
    assert_one_line_error(err)
    assert not out.exists()


# ---------------------------------------------------------------- --resume continues the run the folder records


def test_resume_continues_to_the_epochs_the_run_was_started_with(tmp_path, capsys):
    import torch
    out = tmp_path / 'run'
    tiny = ['pretrain', '--synthetic', '2', '--preset', 'swin-tiny', '--crop', '32', '--bs', '1', '--out', str(out)]
    rc, _, err = run_cli(capsys, *tiny, '--epochs', '2')
    assert rc == 0, err
    # the checkpoint of a run started for 4 epochs and stopped after 2 (as a killed run leaves it)
    ckpt = out / 'models' / 'checkpoint.pth'
    ck = torch.load(ckpt, weights_only=True)
    assert (ck['epoch'], ck['n_epoch']) == (1, 2)
    torch.save({**ck, 'n_epoch': 4}, ckpt)
    before = digest(ckpt)
    # another number of epochs would redraw the learning-rate schedule under a run half done: refused, naming both
    rc, _, err = run_cli(capsys, *tiny, '--resume', '--epochs', '5')
    assert rc == 2
    assert_one_line_error(err, '--epochs 5', 'started for 4 epochs and has done 2')
    assert digest(ckpt) == before
    # without --epochs: the run's own 4 (the default 10 would train 8 more epochs on another schedule)
    rc, printed, err = run_cli(capsys, *tiny, '--resume')
    assert rc == 0, err
    assert 'at epoch 2' in printed
    assert torch.load(ckpt, weights_only=True)['n_epoch'] == 4
    assert (out / 'pretrain_log.csv').read_text().count('\n') == 5  # the header and the epochs 0 to 3


# ---------------------------------------------------------------- the folder of a run, directly


def test_run_folder_removes_the_folder_it_made_only_when_nothing_was_written(tmp_path):
    from dagman_fast.core import RunError
    from dagman_fast.recipes import run_folder
    with pytest.raises(RunError, match='boom'):
        with run_folder(tmp_path / 'empty') as out:
            assert out.is_dir()  # made before the run reads anything
            raise RunError('boom')
    assert not (tmp_path / 'empty').exists()
    with pytest.raises(RunError, match='boom'):
        with run_folder(tmp_path / 'written') as out:
            (out / 'config.json').write_text('{}')
            raise RunError('boom')
    assert (tmp_path / 'written' / 'config.json').read_text() == '{}'  # what a failed run wrote is kept
    (tmp_path / 'theirs').mkdir()
    with pytest.raises(RunError, match='boom'):
        with run_folder(tmp_path / 'theirs'):
            raise RunError('boom')
    assert (tmp_path / 'theirs').is_dir()  # a folder the user made is never removed


def test_preprocess_refuses_a_cache_another_preprocess_is_filling(tmp_path, capsys):
    from dagman_fast.data import synthetic_ct
    from dagman_fast.preprocess import preprocess_scans
    synthetic_ct(tmp_path / 'scans', n=1, size=32, seed=0)
    first = preprocess_scans(tmp_path / 'scans', tmp_path / 'cache', crop=32, progress=False)
    folder = tmp_path / 'cache' / first['key']
    with FolderLock(folder, 'held by the test'):  # what a running `dagman preprocess` holds
        rc, _, err = run_cli(capsys, 'preprocess', str(tmp_path / 'scans'), '--cache-dir', str(tmp_path / 'cache'),
                             '--crop', '32', '--workers', '1')
    assert rc == 1
    assert_one_line_error(err, 'another preprocess run is filling this cache')
    assert not (folder / '.lock').exists()  # the lock leaves no file in the cache
