"""`dagman preprocess` / `preprocess_scans`: a resumable, parallel cache fill with an index, and the loaders that use
the index instead of reading the scans again (issue 12, "scale out").

A few hundred tiny synthetic volumes (10^3 voxels, crop 8) with bad files among them; the command is killed with
SIGKILL part-way and resumed. Only files under `tmp_path` are written.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import PersistentDataset

from dagman_fast.cli import main
from dagman_fast.data import INDEX_COLUMNS, JOURNAL_FILE, ct_ssl_dls, synthetic_ct
from dagman_fast.preprocess import preprocess_scans, read_ct_index

N_GOOD, SIZE, CROP = 200, 10, 8
# Each bad file, and the words its reason must contain (what the existing checks say about it).
BAD = {'corrupt.nii.gz': 'gzip', 'tiny.nii.gz': 'not a 3-D CT volume', 'flat.nii.gz': 'single value',
       'not_ct.nii.gz': 'Hounsfield units', 'series': 'corrupt'}


def _nifti(path: Path, hu: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def _bad_files(folder: Path) -> None:
    (folder / 'corrupt.nii.gz').write_bytes(b'this is not a NIfTI file')
    _nifti(folder / 'tiny.nii.gz', np.arange(8).reshape(2, 2, 2) * 100.0)
    _nifti(folder / 'flat.nii.gz', np.full((10, 10, 10), 40.0))
    _nifti(folder / 'not_ct.nii.gz', 3000.0 + np.arange(1000).reshape(10, 10, 10))
    (folder / 'series').mkdir()
    (folder / 'series' / 'slice1.dcm').write_bytes(b'\0' * 128 + b'DICM' + b'\x02\x00garbage')


def _cli(*argv, cwd=None, **kw) -> subprocess.Popen:
    "`dagman ARGV` as a subprocess of its own process group (so that a kill reaches its workers too)."
    return subprocess.Popen([sys.executable, '-m', 'dagman_fast.cli', *map(str, argv)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def _journal_rows(folder: Path) -> int:
    try:
        return max(0, len((folder / JOURNAL_FILE).read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _summary(out: str) -> dict:
    "The counts of the command's summary line: '{n} scan(s): {ok} ok, {s} skipped; {p} processed now (...), {r} ...'."
    m = re.search(r'(\d+) scan\(s\): (\d+) ok, (\d+) skipped; (\d+) processed now \((\d+) computed\), (\d+) already '
                  'done', out)
    assert m, out
    return dict(zip(('scans', 'ok', 'skipped', 'processed', 'computed', 'reused'), map(int, m.groups())))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Preprocess the corpus with 2 workers, SIGKILL the command once its journal holds some rows, add a half-written
    line to the journal (as a kill mid-write leaves), and resume. Returns what both runs left."""
    root = tmp_path_factory.mktemp('pre')
    data, cache = root / 'ct', root / 'cache'
    synthetic_ct(data, n=N_GOOD, size=SIZE)
    _bad_files(data)
    args = ('preprocess', data, '--cache-dir', cache, '--crop', CROP, '--workers', 2)
    proc = _cli(*args)
    folder, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        folder = next((f.parent for f in cache.glob(f'*/{JOURNAL_FILE}')), None)
        if folder is not None and _journal_rows(folder) >= 12:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f'the command ended before it could be killed: {proc.communicate()}'
    os.killpg(proc.pid, signal.SIGKILL)  # the command, its forkserver and its workers: nothing gets to clean up
    proc.wait()
    proc.communicate()
    done = {r['path']: r for r in read_ct_index(cache, crop=CROP)}
    assert 12 <= len(done) < N_GOOD, len(done)
    before = {p: os.stat(folder / r['cache']) for p, r in done.items() if r['status'] == 'ok'}
    with open(folder / JOURNAL_FILE, 'a') as f:  # a row cut short by the kill
        f.write(f'{data / "synthetic_001.nii.gz"},1-2-3,ok,,8x8')
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # resumed in this process: no second import
        rc = main([str(a) for a in args])
    assert rc == 0, err.getvalue()
    return dict(data=data, cache=cache, folder=folder, done=done, before=before, out=out.getvalue(),
                err=err.getvalue())


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_scans(run):
    counts = _summary(run['out'])
    total = N_GOOD + len(BAD)
    assert (counts['scans'], counts['ok'], counts['skipped']) == (total, N_GOOD, len(BAD))
    assert counts['reused'] == len(run['done']) and counts['processed'] == total - len(run['done'])
    for path, st in run['before'].items():  # the cache files of finished scans were not written again
        now = os.stat(run['folder'] / run['done'][path]['cache'])
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), path
    assert not (run['folder'] / JOURNAL_FILE).exists()
    assert f'dagman pretrain --cache-dir {run["cache"]} --crop {CROP} --spacing 2 --on-error skip' in run['out']
    # a run on the finished cache does nothing but report
    res = preprocess_scans(run['data'], run['cache'], crop=CROP, progress=False)
    assert (res['processed'], res['reused'], res['ok']) == (0, total, N_GOOD)


def test_the_index_is_complete_and_correct(run):
    rows = read_ct_index(run['cache'], crop=CROP)
    text = (run['folder'] / 'index.csv').read_text().splitlines()
    assert text[0] == ','.join(INDEX_COLUMNS) and len(text) == len(rows) + 1 == N_GOOD + len(BAD) + 1
    by_name = {Path(r['path']).name: r for r in rows}
    assert len(by_name) == len(rows)  # each scan once
    for name, words in BAD.items():
        r = by_name[name]
        assert r['status'] == 'skipped' and words in r['reason'] and not r['cache'], r
    assert 'slice1.dcm' in by_name['series']['reason']
    good = [r for r in rows if r['status'] == 'ok']
    assert len(good) == N_GOOD and by_name['synthetic_001.nii.gz']['shape'] != '8x8'  # not the half-written row
    for r in good:
        shape = tuple(int(v) for v in r['shape'].split('x'))
        assert len(shape) == 3 and min(shape) >= CROP and max(shape) <= SIZE, r
        assert (r['source_shape'], r['source_spacing']) == (f'{SIZE}x{SIZE}x{SIZE}', '2x2x2')
        assert (run['folder'] / r['cache']).is_file() and r['stamp'].startswith('1-')
    assert len(list(run['folder'].glob('*.pt'))) == N_GOOD
    assert read_ct_index(run['cache'], crop=CROP + 1) == []  # other settings, another key


@pytest.fixture
def cache_reads(monkeypatch):
    "Every item `PersistentDataset` loads or computes (the cache check is where both happen), by path."
    seen = []
    original = PersistentDataset._cachecheck

    def counted(self, item):
        seen.append(item['image'])
        return original(self, item)
    monkeypatch.setattr(PersistentDataset, '_cachecheck', counted)
    return seen


def test_the_loader_built_from_the_index_reads_no_scan(run, cache_reads, tmp_path):
    kw = dict(crop=CROP, bs=4, cache_dir=run['cache'], on_error='skip', progress=False)
    with pytest.warns(UserWarning, match='listed as skipped'):
        dls = ct_ssl_dls(run['data'], **kw)
    assert cache_reads == []
    assert len(dls.volumes) == N_GOOD and sorted(Path(p).name for p, _ in dls.skipped) == sorted(BAD)
    assert all('listed as skipped' in reason for _, reason in dls.skipped)
    with pytest.warns(UserWarning):
        dls = ct_ssl_dls(None, **kw)  # no source: the scans of the index
    assert cache_reads == [] and len(dls.volumes) == N_GOOD
    xb = dls.one_batch()  # the items themselves still come from the cache
    assert len(xb) == 2 and tuple(xb[0].shape) == (4, 1, CROP, CROP, CROP) and len(cache_reads) == 4
    # without the index every scan is verified again at construction: the count above can fail
    cache_reads.clear()
    some = sorted(run['data'].glob('synthetic_00*.nii.gz'))
    dls = ct_ssl_dls(some, crop=CROP, bs=2, cache_dir=tmp_path / 'fresh', progress=False)
    assert len(cache_reads) == len(some) == 10


def test_indexed_bad_scans_follow_on_error(run, cache_reads):
    kw = dict(crop=CROP, bs=2, cache_dir=run['cache'], progress=False)
    with pytest.raises(ValueError, match=r'corrupt\.nii\.gz: cannot be used as a CT volume: .*gzip'):
        ct_ssl_dls(run['data'] / 'corrupt.nii.gz', **kw)
    with pytest.raises(ValueError, match=r'cannot be used as a CT volume: .* \(listed as skipped in .*index.csv\)'):
        ct_ssl_dls(None, **kw)  # the index's bad scans are refused like any bad scan
    assert cache_reads == []
    with pytest.warns(UserWarning, match='skipping .*tiny.nii.gz'):
        dls = ct_ssl_dls([run['data'] / 'tiny.nii.gz', run['data'] / 'synthetic_005.nii.gz'], on_error='skip', **kw)
    assert len(dls.volumes) == 1 and dls.skipped[0][0].endswith('tiny.nii.gz') and cache_reads == []
    with pytest.raises(FileNotFoundError, match='no index for these settings'):
        ct_ssl_dls(None, **{**kw, 'crop': 16})


def test_a_changed_scan_is_redone_and_a_fixed_one_indexed(tmp_path):
    data, cache = tmp_path / 'ct', tmp_path / 'cache'
    paths = synthetic_ct(data, n=3, size=SIZE)
    (data / 'corrupt.nii.gz').write_bytes(b'not a volume')
    first = preprocess_scans(data, cache, crop=CROP, workers=1, progress=False)
    assert (first['processed'], first['ok']) == (4, 3)
    old = {Path(r['path']).name: r for r in read_ct_index(cache, crop=CROP)}
    synthetic_ct(tmp_path / 'other', n=1, size=SIZE + 2, seed=1)[0].replace(paths[1])  # an edited scan
    synthetic_ct(tmp_path / 'fix', n=1, size=SIZE, seed=2)[0].replace(data / 'corrupt.nii.gz')  # a fixed one
    second = preprocess_scans(data, cache, crop=CROP, workers=1, progress=False)
    assert (second['processed'], second['reused'], second['ok'], second['skipped']) == (2, 2, 4, [])
    new = {Path(r['path']).name: r for r in read_ct_index(cache, crop=CROP)}
    edited = paths[1].name
    assert new[edited]['stamp'] != old[edited]['stamp'] and new[edited]['cache'] != old[edited]['cache']
    assert new[edited]['source_shape'] == f'{SIZE + 2}x{SIZE + 2}x{SIZE + 2}'
    assert not (cache / first['key'] / old[edited]['cache']).exists()  # the stale cache file is gone
    assert new['corrupt.nii.gz']['status'] == 'ok' and new[paths[0].name] == old[paths[0].name]


def test_a_deleted_scan_is_left_out_then_dropped_from_the_index(tmp_path):
    data, cache = tmp_path / 'ct', tmp_path / 'cache'
    paths = synthetic_ct(data, n=3, size=SIZE)
    first = preprocess_scans(data, cache, crop=CROP, workers=1, progress=False)
    gone = next(r for r in read_ct_index(cache, crop=CROP) if Path(r['path']).name == paths[1].name)
    paths[1].unlink()
    with pytest.warns(UserWarning, match='1 scan.* no longer exist'):
        dls = ct_ssl_dls(None, crop=CROP, bs=1, cache_dir=cache, progress=False)
    assert sorted(Path(p).name for p in dls.volumes.paths) == sorted(p.name for p in (paths[0], paths[2]))
    again = preprocess_scans(data, cache, crop=CROP, workers=1, progress=False)
    assert (again['processed'], again['ok']) == (0, 2)
    assert gone['path'] not in {r['path'] for r in read_ct_index(cache, crop=CROP)}
    assert not (cache / first['key'] / gone['cache']).exists()  # its cache file went with it


def run_cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize('argv, status, words', [
    (('preprocess', '{data}'), 2, '--cache-dir'),
    (('preprocess', '{tmp}/nowhere', '--cache-dir', '{tmp}/c'), 1, 'nowhere: does not exist'),
    (('preprocess', '{data}', '--cache-dir', '{tmp}/c', '--workers', '0'), 2, '--workers: expected an integer >= 1'),
    (('preprocess', '{data}', '--cache-dir', '{tmp}/c', '--workers', '-2'), 2, '--workers: expected an integer >= 1'),
    (('preprocess', '{data}', '--cache-dir', '{tmp}/c', '--hu-range', '300', '100'), 2, '--hu-range 300 100'),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, status, words):
    data = synthetic_ct(tmp_path / 'ct', n=1, size=SIZE)[0].parent
    rc, out, err = run_cli(capsys, *(a.format(data=data, tmp=tmp_path) for a in argv))
    last = err.strip().splitlines()[-1]
    assert rc == status and last.startswith('dagman: error: ') and words in last, err
    assert not (tmp_path / 'c').exists()  # nothing written


@pytest.mark.slow
def test_pretrain_takes_the_scans_of_the_index(tmp_path, capsys):
    data, cache = tmp_path / 'ct', tmp_path / 'cache'
    synthetic_ct(data, n=3, size=24)
    (data / 'corrupt.nii.gz').write_bytes(b'not a volume')
    rc, out, err = run_cli(capsys, 'preprocess', data, '--cache-dir', cache, '--crop', 32, '--workers', 1)
    assert rc == 0, err
    common = ('--preset', 'swin-tiny', '--bs', 1, '--epochs', 1, '--cache-dir', cache)
    rc, out, err = run_cli(capsys, 'pretrain', *common, '--crop', 64, '--out', tmp_path / 'r0')
    assert rc == 2 and 'no index for --crop 64 --spacing 2; it holds indexes for: --crop 32 --spacing 2' in err
    rc, out, err = run_cli(capsys, 'pretrain', *common, '--crop', 32, '--out', tmp_path / 'r1')
    assert rc == 1 and 'corrupt.nii.gz' in err.strip().splitlines()[-1]  # --on-error raise: the bad scan stops it
    rc, out, err = run_cli(capsys, 'pretrain', *common, '--crop', 32, '--on-error', 'skip', '--out', tmp_path / 'r2')
    assert rc == 0, err
    assert 'the 3 usable scan(s) indexed' in out and '3 volume(s) used, 1 skipped' in out and 'synthetic' not in out
