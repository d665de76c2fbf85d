"""A `dagman pretrain` killed with SIGKILL and resumed with `--resume` logs what an uninterrupted run logs."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _log(out):
    path = out / 'pretrain_log.csv'
    return list(csv.DictReader(open(path))) if path.exists() else []


def kill_after(proc: subprocess.Popen, out, rows: int = 2, group: bool = False) -> None:
    """SIGKILL `proc` (with `group`: its whole process group) once its log in `out` holds `rows` epochs and the
    checkpoint exists (written after the log's row, atomically: it exists only whole)."""
    deadline = time.time() + 600
    ckpt = Path(out) / 'models' / 'checkpoint.pth'
    while (len(_log(out)) < rows or not ckpt.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, 'the run finished before it could be killed'
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_logs(a: list[dict], b: list[dict], epochs: int) -> None:
    "The per-epoch figures of two runs' logs agree (1e-5 relative)."
    assert [r['epoch'] for r in b] == [str(e) for e in range(epochs)]
    for ra, rb in zip(a, b):
        for k in ('train_loss', 'aitd', 'ampd', 'gitd', 'amip', 'aitd_entropy', 'ema_momentum', 'lr'):
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-5 * max(1.0, abs(float(ra[k]))), (ra['epoch'], k)


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    cmd = [sys.executable, '-m', 'dagman_fast.cli', 'pretrain', '--synthetic', '2', '--crop', '32', '--bs', '1',
           '--epochs', '3', '--set', 'out_dim=64', '--set', 'head_hidden=32', '--cache-dir', str(tmp_path / 'cache')]
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    full, part = tmp_path / 'full', tmp_path / 'part'
    subprocess.run(cmd + ['--out', str(full)], check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.Popen(cmd + ['--out', str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    kill_after(proc, part, rows=1)
    done = subprocess.run(cmd + ['--out', str(part), '--resume'], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'resuming from' in done.stdout
    assert_same_logs(_log(full), _log(part), 3)
