"""Data-parallel training on the CPU (gloo), launched as users launch it: `torchrun`, and `accelerate launch`.

The runs themselves are in `tests/ddp_worker.py` (Python API, `learn.distrib_ctx()`); the command line's runs are
at the end. Every run is a few seconds of a tiny encoder; most of each test is starting Python twice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kill_resume import _log, assert_same_logs, kill_after

from dagman_fast.checkpoint import load_checkpoint, load_encoder
from dagman_fast.data import synthetic_ct
from dagman_fast.distributed import all_mean, broadcast_object, gather_objects, rank, replicas_differ, world_size

WORKER = Path(__file__).parent / 'ddp_worker.py'
ENV = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}


def torchrun(*args, n: int = 2, timeout: int = 600, check: bool = True, env=None) -> subprocess.CompletedProcess:
    "`torchrun --standalone --nproc_per_node n ARGS` (a free port each time); a Python file or `-m module`."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def worker(mode: str, out: Path, bs: int, n: int = 1, *extra) -> list[dict]:
    "Run `ddp_worker.py MODE` on `n` processes (1: a plain `python`), return each rank's saved results."
    if n == 1:
        res = subprocess.run([sys.executable, str(WORKER), mode, str(out), '--bs', str(bs), *extra],
                             capture_output=True, text=True, env=ENV, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        torchrun(WORKER, mode, out, '--bs', bs, *extra, n=n)
    return [torch.load(out / f'rank{r}.pt', weights_only=True) for r in range(n)]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    "max |a - b| / max |a|, in float64."
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def test_single_process_collectives_are_no_ops():
    t = torch.arange(3.0)
    assert all_mean(t) is t and gather_objects({'a': 1}) == [{'a': 1}] and broadcast_object(5) == 5
    assert rank() == 0 and world_size() == 1 and replicas_differ(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize('n,bs,drop_last,expected', [(10, 3, True, 1), (10, 3, False, 2), (6, 4, True, 0),
                                                      (8, 2, True, 2), (0, 2, False, 0)])
def test_each_rank_counts_the_batches_of_its_own_share(n, bs, drop_last, expected):
    "fastai's DistributedDL says ceil(batches / ranks) (10 samples, batch 3, 2 ranks: 2); a share of 5 gives 1."
    from fastai.data.load import DataLoader as FastaiDL

    from dagman_fast.distributed import _DistributedDL
    dl = _DistributedDL(FastaiDL(list(range(n)), bs=bs, drop_last=drop_last), rank=1, world_size=2, device='cpu')
    assert len(dl) == expected


# ---------------------------------------------------------------- the equivalence of one step


@pytest.fixture(scope='session')  # one run per session (per worker under xdist)
def one_step(tmp_path_factory):
    "One DAGMaN step: one process with a batch of 8, and 2 gloo processes with 4 each (the same samples and draws)."
    tmp = tmp_path_factory.mktemp('step')
    single = worker('step', tmp / 'one', 8)[0]
    two = worker('step', tmp / 'two', 4, 2)
    return single, two


@pytest.mark.slow
def test_two_processes_of_batch_b_step_like_one_process_of_batch_2b(one_step):
    single, (r0, r1) = one_step
    assert single['world'] == 1 and r0['world'] == 2
    after1, after2 = single['after'], r0['after']
    floats = [k for k, v in after1.items() if v.is_floating_point()]
    assert any(k.startswith('student.') for k in floats) and any(k.startswith('teacher.') for k in floats)
    assert sum('center' in k for k in floats) == 3  # AITD, AMPD, GITD
    # the step did something: every part moved (else equality would prove nothing)
    for part in ('student.', 'teacher.', 'distill.'):
        moved = max(rel_diff(after1[k], single['before'][k]) for k in floats if k.startswith(part))
        assert moved > 1e-4, part
    # student, teacher and centres of 2 x b equal those of 1 x 2b (float64: summation order costs ~1e-12)
    worst = max((rel_diff(after1[k], after2[k]), k) for k in floats)
    assert worst[0] <= 1e-5, worst
    assert torch.equal(after1['step'], after2['step'])


@pytest.mark.slow
def test_the_teacher_and_everything_else_are_identical_on_every_rank(one_step):
    _, (r0, r1) = one_step
    for k in r0['after']:
        assert torch.equal(r0['after'][k], r1['after'][k]), k


@pytest.mark.slow
def test_without_the_centre_all_reduce_the_step_differs(one_step, tmp_path):
    "Negative control: each rank centring with its own batch mean (what the all-reduce prevents) is caught."
    single, _ = one_step
    local = worker('step', tmp_path / 'local', 4, 2, '--local-centres')
    worst = max(rel_diff(single['after'][k], local[0]['after'][k]) for k in single['after'] if 'center' in k)
    assert worst > 1e-3


# ---------------------------------------------------------------- sampling, draws and metrics


@pytest.mark.slow
def test_a_checkpoint_of_one_process_resumed_on_two_draws_differently_on_each(tmp_path):
    "Another number of processes: rank 0's saved random state, then one stream per rank (else every rank draws alike)."
    worker('draws', tmp_path, 2, 1, '--epochs', '1')
    ck = tmp_path / 'models' / 'checkpoint.pth'
    assert load_checkpoint(ck)['world_size'] == 1
    r0, r1 = worker('draws', tmp_path / 'resumed', 2, 2, '--resume', ck)
    assert len(r0['steps']) == len(r1['steps']) == 2 and {st['epoch'] for st in r0['steps']} == {1}
    for a, b in zip(r0['steps'], r1['steps']):
        assert not torch.equal(a['mask'], b['mask']) and not torch.equal(a['drop'], b['drop'])


def accelerate_launch(*args, n: int = 2) -> None:
    "`accelerate launch --multi_gpu`: it starts the processes with torch's launcher, which on the CPU gives gloo."
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', str(n),
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_sharding_draws_and_metrics_under_torchrun_and_accelerate_launch(tmp_path):
    "Two epochs on 2 processes, launched once by torchrun and once by `accelerate launch`, with the same seed."
    first = worker('draws', tmp_path / 'torchrun', 2, 2)
    accelerate_launch(WORKER, 'draws', tmp_path / 'accelerate', '--bs', 2)
    again = [torch.load(tmp_path / 'accelerate' / f'rank{r}.pt', weights_only=True) for r in range(2)]
    r0, r1 = first
    assert r0['world'] == again[0]['world'] == 2
    for epoch in (0, 1):
        seen = [[s for st in r['steps'] if st['epoch'] == epoch for s in st['samples']] for r in (r0, r1)]
        assert sorted(seen[0] + seen[1]) == list(range(8)), seen  # a shard each, together every sample once
    order = [[s for st in r0['steps'] if st['epoch'] == e for s in st['samples']] for e in (0, 1)]
    assert order[0] != order[1]  # reshuffled every epoch
    for a, b in zip(r0['steps'], r1['steps']):  # masks and patch dropout drawn differently on each rank
        assert not torch.equal(a['mask'], b['mask']) and not torch.equal(a['drop'], b['drop'])
    for x, y in zip(first, again):  # ... and the same again for the same seed, whichever launcher started them
        assert len(x['steps']) == len(y['steps']) == 4
        for a, b in zip(x['steps'], y['steps']):
            assert a['samples'] == b['samples']
            assert torch.equal(a['mask'], b['mask']) and torch.equal(a['drop'], b['drop'])
    # validation metrics over all ranks: every rank reports those of the whole validation set (7 samples, one of them
    # repeated by fastai to give both ranks 4: left out again before the metrics), not of its half
    one = worker('metrics', tmp_path / 'one', 4)[0]
    single = one['results']
    assert set(single) == {'valid_loss', 'auc', 'accuracy', 'sensitivity', 'specificity', 'dice'}
    for r in first + again:  # (fastai's valid_loss itself counts the repeated sample: not compared)
        for k, v in single.items():
            if k != 'valid_loss':
                assert r['results'][k] == pytest.approx(v, abs=1e-6), k
        # FeatureStats: each rank pooled its share of the 7 training crops; the summed statistics are those of all 7
        torch.testing.assert_close(r['norm'], one['norm'], rtol=1e-5, atol=1e-7)
    assert one['norm'][1].min() > 0  # a real variance, not an empty share


# ---------------------------------------------------------------- the command line under torchrun

PRETRAIN = ['-m', 'dagman_fast.cli', 'pretrain', '--crop', '32', '--bs', '1', '--set', 'out_dim=64',
            '--set', 'head_hidden=32']


@pytest.fixture(scope='module')
def scans(tmp_path_factory) -> Path:
    "Six synthetic scans the other tests have not seen (another seed and size), and one corrupt file."
    folder = tmp_path_factory.mktemp('ddp_scans')
    synthetic_ct(folder, n=6, size=48, seed=7)
    (folder / 'broken.nii.gz').write_bytes(b'not a scan')
    return folder


@pytest.mark.slow
def test_torchrun_run_from_a_preprocessed_cache_killed_and_resumed_logs_what_an_uninterrupted_run_logs(scans, tmp_path):
    "One test for three runs (each start of torchrun costs seconds): uninterrupted, then killed and resumed."
    cache, tmp, full, part = tmp_path / 'cache', tmp_path / 'tmp', tmp_path / 'full', tmp_path / 'part'
    args = [*PRETRAIN, '--data', scans, '--on-error', 'skip', '--epochs', '3']
    tmp.mkdir()  # the uninterrupted run: the ranks share the preprocessing into one temporary cache, removed after
    res = torchrun(*args, '--out', full, env={**ENV, 'TMPDIR': str(tmp), 'PYTHONWARNINGS': 'default'})
    assert not list(tmp.glob('dagman_ct_cache_*'))
    assert res.stdout.count('data parallel: 2 processes (gloo)') == 1  # said once, by rank 0
    assert 'weights identical on all 2 processes' in res.stdout
    assert 'broken.nii.gz' in res.stdout + res.stderr  # the skipped scan is reported
    assert res.stderr.count(f'skipping {scans / "broken.nii.gz"}') == 1  # warned once, by rank 0
    rows = _log(full)
    assert [r['epoch'] for r in rows] == ['0', '1', '2']  # one log, one row per epoch (not one per rank)
    # 6 scans, 2 ranks, batch 1: 3 steps per epoch on each rank, so the global step is 9 after 3 epochs
    ck = load_checkpoint(full / 'models' / 'checkpoint.pth')
    assert int(ck['model']['step']) == 9 and ck['world_size'] == 2 and len(ck['rng_ranks']) == 2
    run = json.loads((full / 'config.json').read_text())['run']
    assert {k: v for k, v in run.items() if k != 'args'} == dict(world_size=2, batch_size_per_process=1, batch_size=2,
                                                                 replicas_identical=True)
    assert (run['args']['bs'], run['args']['data']) == (1, [str(scans)])  # what --resume continues
    enc = load_encoder(full / 'encoder.pth')
    assert enc(torch.rand(1, 1, 32, 32, 32)).features[-1].isfinite().all()
    assert sorted(p.name for p in (full / 'models').iterdir()) == ['checkpoint.pth']  # no temporary files left

    pre = subprocess.run([sys.executable, '-m', 'dagman_fast.cli', 'preprocess', str(scans), '--cache-dir', str(cache),
                          '--crop', '32', '--workers', '2'], capture_output=True, text=True, env=ENV, timeout=600)
    assert pre.returncode == 0, pre.stderr[-2000:]
    cached = {p: p.stat().st_mtime_ns for p in cache.rglob('*.pt')}
    assert len(cached) == 6
    args += ['--cache-dir', cache]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           *map(str, args), '--out', str(part)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    kill_after(proc, part, rows=1, group=True)  # the launcher and both workers at once, as a cluster's scheduler does
    done = torchrun(*args, '--out', part, '--resume')
    assert 'resuming from' in done.stdout
    # no rank preprocessed anything: the cache is as `dagman preprocess` left it
    assert {p: p.stat().st_mtime_ns for p in cache.rglob('*.pt')} == cached
    assert_same_logs(_log(full), _log(part), 3)
    ea, eb = torch.load(full / 'encoder.pth', weights_only=True), torch.load(part / 'encoder.pth', weights_only=True)
    for k in ea['state_dict']:
        torch.testing.assert_close(ea['state_dict'][k], eb['state_dict'][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize('schedule', [['--schedule', 'fastai', '--epochs', '1', '--freeze-epochs', '1'],
                                      ['--epochs', '2']], ids=['fastai', 'recipe'])
@pytest.mark.slow
def test_torchrun_finetune_gathers_the_metrics_and_rank0_scores_the_test_split(tmp_path, schedule):
    from test_cli import _fake_medmnist

    from dagman_fast.checkpoint import save_encoder
    from dagman_fast.encoder_configs import encoder_config
    from dagman_fast.swin import build_encoder
    _fake_medmnist(tmp_path, n=(16, 7, 6))  # 7 validation cases: fastai repeats one to give both ranks 4
    save_encoder(build_encoder(encoder_config('swin-tiny', img_size=32)), tmp_path / 'encoder.pth')
    # fastai's fine_tune: a frozen epoch, then all layers (DDP wraps the model anew per fit); the recipe (the
    # default): rank 0 saves the best validation epoch and every rank loads it at the end
    out = tmp_path / 'cls'
    res = torchrun('-m', 'dagman_fast.cli', 'finetune', '--medmnist', 'adrenalmnist3d', '--root', tmp_path,
                   '--encoder', tmp_path / 'encoder.pth', *schedule, '--bs', '4', '--out', out)
    assert 'weights identical on all 2 processes' in res.stdout
    assert res.stdout.count('data parallel: 2 processes') == 1
    results = json.loads((out / 'results.json').read_text())
    assert results['valid']['n'] == 7 and results['test']['n'] == 6  # every case once, the repeated one left out
    for split in ('valid', 'test'):
        assert 0 <= results[split]['auc'] <= 1 and 0 <= results[split]['accuracy'] <= 1
    if '--schedule' not in schedule:  # the kept epoch's validation AUC, over both ranks, is that of the saved model
        assert results['kept_epoch'] in (0, 1)
        assert results['valid']['auc'] == pytest.approx(results['kept_by']['auc'], abs=1e-6)
    assert (out / 'classifier.pth').exists() and (out / 'roc_test.png').exists()


def test_exit_process_runs_the_exit_handlers_then_ends_with_the_status(tmp_path):
    "The way a dagman process ends under torchrun: the cleanup runs (here an exit handler writes a file), status kept."
    import subprocess
    import sys
    done = tmp_path / 'cleaned'
    code = ('import atexit, pathlib; atexit.register(lambda: pathlib.Path(r"%s").write_text("yes")); '
            'print("said", flush=False); from dagman_fast.distributed import exit_process; exit_process(3)' % done)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3 and done.read_text() == 'yes'
    assert res.stdout == 'said\n'  # flushed


@pytest.mark.slow
def test_ddp_keeps_the_gloo_threads_running_after_the_group_is_destroyed(tmp_path):
    """Why `exit_process` ends a torchrun process: after DDP, `destroy_process_group` leaves gloo's threads running
    (without DDP it stops them). If a PyTorch release fixes this, this test fails and the workaround can go."""
    script = tmp_path / 'threads.py'
    script.write_text(
        'import os, sys, torch, torch.distributed as dist\n'
        'dist.init_process_group("gloo")\n'
        'if sys.argv[1] == "ddp":\n'
        '    d = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3)); del d\n'
        'dist.barrier(); dist.destroy_process_group()\n'
        'names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))\n'
        'open(f"{sys.argv[2]}_{os.environ[\'RANK\']}", "w").write(" ".join(n for n in names if "gloo" in n))\n'
        'from dagman_fast.distributed import exit_process; exit_process(0)\n')
    for mode in ('plain', 'ddp'):
        torchrun(str(script), mode, tmp_path / mode)
    assert [(tmp_path / f'plain_{r}').read_text() for r in (0, 1)] == ['', '']
    assert [(tmp_path / f'ddp_{r}').read_text() for r in (0, 1)] == ['gloo_tcp_loop pt_gloo_runloop pt_gloo_runloop'] * 2
