"""Nothing lost (issue 26): no command destroys work, a run folder is written by one run at a time, and a failed
command leaves no empty folder behind. Each case is a reproduction from the issue or one of the same kind."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

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


# ---------------------------------------------------------------- no write follows a link out of the run folder


def _plant_links(out, names, victims):
    "A link at each of `names` in `out`, to its own file outside `out`; returns {victim: content}."
    planted = {}
    for name in names:
        victim = victims / name.replace('/', '_')
        victim.write_text(f'not yours: {name}')
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to(victim)
        planted[victim] = victim.read_text()
    return planted


def test_pretrain_replaces_links_planted_in_its_folder_and_never_writes_through_them(tmp_path, capsys):
    out, victims = tmp_path / 'run', tmp_path / 'elsewhere'
    out.mkdir(), victims.mkdir()
    names = ['config.json', 'pretrain_log.csv', 'pretrain_log.png', 'encoder.pth', 'encoder.json',
             'synthetic_data/synthetic_000.nii.gz']
    planted = _plant_links(out, names, victims)
    rc, _, err = run_cli(capsys, 'pretrain', '--synthetic', '2', '--preset', 'swin-tiny', '--crop', '32', '--bs', '1',
                         '--epochs', '1', '--out', str(out))
    assert rc == 0, err
    assert {v: v.read_text() for v in planted} == planted  # nothing outside the folder changed
    for name in names:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name  # the run's own files
    assert sorted(p.name for p in victims.iterdir()) == sorted(v.name for v in planted)


def test_finetune_replaces_links_planted_in_its_folder(tmp_path, capsys):
    from test_cli import _fake_medmnist
    _fake_medmnist(tmp_path)
    out, victims = tmp_path / 'cls', tmp_path / 'elsewhere'
    out.mkdir(), victims.mkdir()
    names = ['roc_valid.png', 'roc_test.png', 'models/best.pth']
    planted = _plant_links(out, names, victims)
    rc, _, err = run_cli(capsys, 'finetune', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--epochs', '1',
                         '--out', str(out))
    assert rc == 0, err
    assert {v: v.read_text() for v in planted} == planted
    assert not any((out / n).is_symlink() for n in names)


@pytest.mark.parametrize('command', ['pretrain', 'finetune'])
def test_a_folder_in_out_that_links_elsewhere_is_refused(tmp_path, capsys, command):
    from test_cli import _fake_medmnist
    _fake_medmnist(tmp_path)
    out, elsewhere = tmp_path / 'run', tmp_path / 'elsewhere'
    out.mkdir(), elsewhere.mkdir()
    (out / 'models').symlink_to(elsewhere, target_is_directory=True)
    argv = (['pretrain', '--synthetic', '2', '--crop', '32', '--epochs', '1'] if command == 'pretrain' else
            ['finetune', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--epochs', '1'])
    rc, _, err = run_cli(capsys, *argv, '--out', str(out))
    assert rc == 1
    assert_one_line_error(err, 'models is a link to', 'remove the link')
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ['models']


# ---------------------------------------------------------------- SIGTERM and SIGINT: one line, nothing left behind


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_pretraining_ends_in_one_line_removes_its_temporary_cache_and_keeps_its_checkpoint(tmp_path, signum):
    "No --cache-dir: the run's cache is a temporary folder (in TMPDIR), which a stop must remove, as an end would."
    import torch
    from test_kill_resume import _log
    tmp, out = tmp_path / 'tmp', tmp_path / 'run'
    tmp.mkdir()
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'TMPDIR': str(tmp)}
    cmd = [sys.executable, '-m', 'dagman_fast.cli', 'pretrain', '--synthetic', '2', '--preset', 'swin-tiny', '--crop',
           '32', '--bs', '1', '--epochs', '200', '--out', str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpt = out / 'models' / 'checkpoint.pth'
    deadline = time.time() + 300
    while (not _log(out) or not ckpt.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, 'the run ended before it could be stopped'
    assert list(tmp.glob('dagman_ct_cache_*'))  # the temporary cache, while the run goes on
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'dagman: stopped by {signal.Signals(signum).name}'), err[-2000:]
    assert '--resume' in lines[0]
    assert not list(tmp.glob('dagman_ct_cache_*'))  # removed
    ck = torch.load(ckpt, weights_only=True)  # whole
    assert ck['n_epoch'] == 200 and ck['epoch'] >= 0
    assert not list(ckpt.parent.glob('.*.tmp'))


def test_a_signal_during_a_checkpoint_write_waits_until_the_file_is_whole(tmp_path):
    "SIGINT lands while `atomic_save` writes: the file is written and renamed first, then the stop is raised."
    import collections
    import threading

    import torch

    from dagman_fast.checkpoint import atomic_save
    from dagman_fast.core import Stopped, stop_on_signals

    class Slow:  # pickled slowly: the signal arrives in the middle of torch.save
        def __reduce__(self):
            time.sleep(0.5)
            return (collections.OrderedDict, ())  # read back as an empty OrderedDict (weights_only allows it)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop_on_signals()
    path = tmp_path / 'checkpoint.pth'
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(Stopped):
            atomic_save({'epoch': 3, 'slow': Slow(), 'w': torch.ones(3)}, path)
            time.sleep(2)  # the stop is raised here at the latest
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    ck = torch.load(path, weights_only=True)
    assert ck['epoch'] == 3 and ck['slow'] == {} and torch.equal(ck['w'], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pth']


def test_stop_on_signals_turns_both_signals_into_stopped_and_signals_deferred_holds_them_back():
    import threading

    from dagman_fast.core import Stopped, signals_deferred, stop_on_signals
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop_on_signals()
    try:
        seen = []
        try:
            with signals_deferred():
                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
                time.sleep(0.5)  # the signal arrives here, held back
                seen.append('block ended')
            time.sleep(2)
        except Stopped as e:
            seen.append(e.signum)
        assert seen == ['block ended', signal.SIGINT]  # delivered once the block ended, as Stopped
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # Python's default would end the process, with no cleanup
            time.sleep(2)
        except Stopped as e:
            seen.append(str(e))
        assert seen[-1] == 'SIGTERM'
        assert issubclass(Stopped, KeyboardInterrupt) and not issubclass(Stopped, Exception)
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def test_resume_continues_the_method_settings_and_data_the_folder_records(tmp_path, capsys):
    "A run started with a method, a preset, --set values and data, resumed with --resume alone: the same run."
    import json

    import torch
    out = tmp_path / 'run'
    first = ['pretrain', '--synthetic', '2', '--method', 'smit', '--preset', 'swin-tiny', '--crop', '32', '--bs', '1',
             '--lr', '1e-3', '--seed', '3', '--set', 'out_dim=64', '--set', 'head_hidden=32', '--set',
             'mask_ratio=0.6', '--epochs', '2', '--out', str(out)]
    rc, _, err = run_cli(capsys, *first)
    assert rc == 0, err
    args = json.loads((out / 'config.json').read_text())['run']['args']
    assert (args['method'], args['preset'], args['lr'], args['seed'], args['synthetic']) == ('smit', 'swin-tiny', 1e-3, 3, 2)
    assert args['settings'] == {'out_dim': 64, 'head_hidden': 32, 'mask_ratio': 0.6}
    ckpt = out / 'models' / 'checkpoint.pth'
    torch.save({**torch.load(ckpt, weights_only=True), 'n_epoch': 3}, ckpt)  # as a run killed after 2 of 3 epochs
    before = digest(ckpt)
    resume = ['pretrain', '--out', str(out), '--resume']
    for extra, named in [(['--method', 'dagman'], '--method dagman: the run in'),
                         (['--set', 'mask_ratio=0.5'], '--set mask_ratio=0.5: the run in'),
                         (['--set', 'patch_drop=0.2'], 'no --set patch_drop'),
                         (['--lr', '5e-4'], 'was started with --lr 0.001'),
                         (['--crop', '64'], '--crop 64')]:
        rc, _, err = run_cli(capsys, *resume, *extra)
        assert rc == 2, (extra, err)
        assert_one_line_error(err, named)
        assert digest(ckpt) == before
    # --resume alone (and a value given again, the same): the run's method, settings, crop and synthetic data
    rc, printed, err = run_cli(capsys, *resume, '--lr', '1e-3')
    assert rc == 0, err
    assert 'method smit, encoder swin-tiny, crop 32' in printed and 'at epoch 2' in printed
    ck = torch.load(ckpt, weights_only=True)
    assert (ck['epoch'], ck['config']['dagman']['mask_ratio'], ck['config']['dagman']['out_dim']) == (2, 0.6, 64)


@pytest.mark.slow
def test_ctrl_c_during_preprocess_ends_in_one_line_without_the_workers_tracebacks(tmp_path):
    "Ctrl-C reaches the whole process group: the parent answers it in one line; the workers ignore it and are ended."
    from dagman_fast.data import synthetic_ct
    synthetic_ct(tmp_path / 'scans', n=12, size=96)
    cache = tmp_path / 'cache'
    proc = subprocess.Popen([sys.executable, '-m', 'dagman_fast.cli', 'preprocess', str(tmp_path / 'scans'),
                             '--cache-dir', str(cache), '--crop', '32', '--workers', '2'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    deadline = time.time() + 300
    while not list(cache.rglob('*.pt')) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, 'preprocessing ended before it could be stopped'
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130
    assert err.strip() == 'dagman: stopped by SIGINT', err[-2000:]
