"""What a new user meets first: a quiet `dagman pretrain`, a progress table and CSV log with only the columns that
have values, `dagman --version`, TensorBoard logging, and notebooks whose front matter parses."""
import csv
import subprocess
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest

from dagman_fast.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ['--synthetic', '2', '--crop', '32', '--bs', '1', '--set', 'out_dim=64', '--set', 'head_hidden=32']


def test_version_names_the_package_and_its_stack():
    out = subprocess.run([sys.executable, '-m', 'dagman_fast.cli', '--version'], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    import fastai
    import monai
    import torch
    assert line.startswith(f"dagman_fast {version('dagman_fast')} (")
    for mod in (torch, fastai, monai):  # the modules' own version strings, not the metadata the command reads
        assert f'{mod.__name__} {mod.__version__}' in line, line


@pytest.mark.slow
def test_a_first_pretraining_run_is_quiet_and_logs_only_columns_with_values(tmp_path):
    """The demo's stdout and stderr with every warning shown (`-W default`): no notice a CPU user cannot act on (MONAI's
    nvImageCodec reader), no `valid_loss` column of `None`s, no empty validation bar; the CSV has no empty column."""
    out = tmp_path / 'run'
    res = subprocess.run([sys.executable, '-W', 'default', '-m', 'dagman_fast.cli', 'pretrain', '--out', str(out),
                          '--epochs', '2', *SMALL, '--cache-dir', str(tmp_path / 'cache')],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    for noise in ('nvImageCodec', 'NvImgCodec', 'None', 'valid_loss', 'generator is empty', 'Warning'):
        assert noise not in text, (noise, text)
    header = [ln.split() for ln in text.replace('\r', '\n').splitlines() if ln.strip().startswith('epoch')]
    assert header and header[0] == ['epoch', 'train_loss', 'time'], header
    rows = list(csv.DictReader(open(out / 'pretrain_log.csv')))
    assert len(rows) == 2 and 'valid_loss' not in rows[0]
    empty = [k for k in rows[0] if all(r[k] == '' for r in rows)]
    assert not empty, empty
    assert {'train_loss', 'amip', 'aitd_entropy', 'mask_ratio', 'lr'} <= set(rows[0])


@pytest.mark.slow
def test_a_resumed_run_prints_only_the_epochs_it_trains(tmp_path, capsys):
    common = ['pretrain', '--out', str(tmp_path / 'run'), *SMALL, '--cache-dir', str(tmp_path / 'cache')]
    assert main(common + ['--epochs', '2']) == 0
    capsys.readouterr()
    assert main(common + ['--epochs', '3', '--resume']) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.replace('\r', '\n').splitlines()
            if ln.split() and ln.split()[0].isdigit() and ':' in ln.split()[-1]]
    assert [r[0] for r in rows] == ['2'] and len(rows[0]) == 3, rows  # epoch, train_loss, time: no empty 0 and 1


def test_validation_loss_is_logged_when_there_is_validation_data(tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['pretrain', '--out', str(out), '--epochs', '1', *SMALL, '--synthetic', '4', '--valid-pct', '0.5',
                 '--cache-dir', str(tmp_path / 'cache')]) == 0
    rows = list(csv.DictReader(open(out / 'pretrain_log.csv')))
    assert float(rows[0]['valid_loss']) > 0
    assert 'valid_loss' in capsys.readouterr().out


@pytest.mark.slow
def test_tensorboard_gets_every_figure_of_the_csv_log_with_one_step_count_across_a_resume(tmp_path, capsys):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, tb = tmp_path / 'run', tmp_path / 'tb'
    common = ['pretrain', '--out', str(out), *SMALL, '--tensorboard', str(tb), '--cache-dir', str(tmp_path / 'cache')]
    assert main(common + ['--epochs', '2']) == 0
    assert main(common + ['--epochs', '3', '--resume']) == 0  # a second events file in the same folder
    acc = EventAccumulator(str(tb), size_guidance={'scalars': 0})  # the folder: both files, in order
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    rows = list(csv.DictReader(open(out / 'pretrain_log.csv')))
    figures = [k for k in rows[0] if k not in ('epoch', 'train_loss')]
    assert {f'pretrain/{k}' for k in figures} <= tags, sorted(tags)
    for k in figures:  # one point per epoch, at the epoch's last step (2 volumes, bs 1: 2 steps an epoch)
        points = acc.Scalars(f'pretrain/{k}')
        assert [p.step for p in points] == [2, 4, 6], (k, [p.step for p in points])
        assert [p.value for p in points] == pytest.approx([float(r[k]) for r in rows], rel=1e-5), k
    assert [s.step for s in acc.Scalars('train_loss')] == [1, 2, 3, 4, 5, 6]  # every step once, resumed ones too
    assert 'lr_0' in tags


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # as if tensorboard were not installed
    from tests.test_cli import assert_fails
    assert_fails(capsys, ['pretrain', '--out', str(tmp_path / 'run'), '--epochs', '1', *SMALL,
                          '--tensorboard', str(tmp_path / 'tb')], 'dagman_fast[tensorboard]', status=1)


@pytest.mark.parametrize('nb', sorted((REPO / 'nbs').rglob('*.ipynb')), ids=lambda p: p.name)
def test_front_matter_parses(nb):
    "nbdev reads a notebook's first markdown cell as front matter: a title, a description, no YAML warnings."
    from fastcore.nbio import nb_frontmatter, read_nb
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fm = nb_frontmatter(read_nb(nb))
    assert fm.get('title') and fm.get('description'), (nb.name, fm)


def test_skip_empty_validation_only_skips_empty_loaders():
    "No validation data: no valid_loss column and no validation loop; `get_preds` on other data still predicts."
    import torch
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import DataLoader, TensorDataset

    from dagman_fast.train_utils import SkipEmptyValidation
    x = torch.randn(16, 3)
    train = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    empty = DataLoader(TensorDataset(x[:0], x[:0, :1]), batch_size=4)
    learn = Learner(DataLoaders(train, empty), torch.nn.Linear(3, 1), loss_func=torch.nn.MSELoss(),
                    cbs=SkipEmptyValidation())
    with learn.no_bar():
        learn.fit(1, 1e-2)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'time']
    preds, targs = learn.get_preds(dl=DataLoader(TensorDataset(x, x[:, :1]), batch_size=4))
    assert preds.shape == (16, 1)
    learn.dls = DataLoaders(train, DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4))
    with learn.no_bar():
        learn.fit(1, 1e-2)  # validation data now: the column is back, with a number
    assert 'valid_loss' in learn.recorder.metric_names and learn.recorder.values[-1][1] > 0


@pytest.mark.slow
def test_an_index_of_only_skipped_scans_is_an_error_not_the_demo(tmp_path, capsys):
    from tests.test_cli import assert_fails
    (tmp_path / 'scans').mkdir()
    (tmp_path / 'scans' / 'broken.nii.gz').write_bytes(b'not a scan')
    cache = tmp_path / 'cache'
    assert main(['preprocess', str(tmp_path / 'scans'), '--cache-dir', str(cache), '--crop', '32',
                 '--workers', '1']) == 0
    assert_fails(capsys, ['pretrain', '--out', str(tmp_path / 'run'), '--cache-dir', str(cache), '--crop', '32',
                          '--epochs', '1'], 'were skipped', status=1)
    assert not (tmp_path / 'run' / 'synthetic_data').exists()
