"""Pretraining step time: where a DAGMaN step goes, and DAGMaN against the SMIT baseline on the same engine.

    python bench/bench_pretrain.py                      # swin-tiny, crop 64, real LIDC CT from ../shared/data
    python bench/bench_pretrain.py --data DIR --steps 30 --encoder swin-smit --crop 128
    python bench/bench_pretrain.py --encoder swin-smit --crop 128 --methods dagman --attn-impls reference triton \
        --json out.json                                 # the paper's scale on CUDA, eager attention against Triton
    python bench/bench_pretrain.py --methods dagman --amps fp32 bf16 --baseline HEAD~5
                                                        # this tree's step in fp32 and bf16, and the step of an older
                                                        # commit (its library, this script) in the same run

Each method (for each `--attn-impls` entry: the encoder's attention path) trains `--steps` steps (after `--warmup` untimed ones) with `StepTimer`, which splits a step into data,
teacher forward, masking, student forward, losses, backward + optimiser, EMA update and fastai's bookkeeping. The
methods run one after the other in this process with the same data, seed and heads. Without real data (no
`../shared/data`), synthetic volumes are used and said so.

FLOPs: one step of each method counted with `count_flops` on a learner whose encoder takes the reference attention
path (plain matmuls the counter knows; the count does not depend on the path). TFLOP/s = FLOPs / step time; MFU = that
over the device's peak in the step's dtype (`peak_tflops`: the data sheet on a GPU, a measured matmul on the CPU).

`--baseline REV`: the library of git revision REV (its `dagman_fast/` and `kernels/`, exported with `git archive`)
and this tree's each run this same benchmark in a subprocess, alternately for `--rounds` rounds (REV, this tree, REV,
this tree, ...: a drift of a shared machine hits both alike); each part is the median over the rounds, and the ratio
of the two steps is given per round too: "today's step" measured in the same run, on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import set_seed
from torch.utils.flop_counter import FlopCounterMode

from dagman_fast.data import ct_ssl_dls, synthetic_ct
from dagman_fast.learner import dagman_learner
from dagman_fast.train_utils import StepTimer

PARTS = ['data', 'teacher', 'masking', 'student', 'losses', 'backward', 'ema', 'other']


def _learner(dls, method, args, attn_impl, amp, compile=False):
    kw = {} if amp == 'default' else dict(amp=False if amp == 'fp32' else amp)
    if compile:  # only then: a baseline revision's learner may not know the option
        kw['compile'] = True
    return dagman_learner(dls, method=method, encoder=args.encoder, checkpoint=None, log=None, attn_impl=attn_impl,
                          path=tempfile.mkdtemp(), out_dim=args.out_dim, head_hidden=args.head_hidden, **kw)


class _CountFlops(Callback):
    "Counts the FLOPs of the first training step (teacher, masking, student, losses, backward), then ends the fit."
    order = -100  # before every callback of the step: the teacher runs in `before_batch`

    def before_batch(self):
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def after_step(self):
        self.counter.__exit__(None, None, None)
        self.flops = self.counter.get_total_flops()
        raise CancelFitException


def step_flops(dls, method, args) -> int:
    "The FLOPs of one training step of `method` (the reference attention path, so that every matmul is counted)."
    set_seed(0)
    learn = _learner(dls, method, args, 'reference', 'fp32')
    counter = _CountFlops()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-4, cbs=[counter])
    return counter.flops


def run(dls, method, args, attn_impl='auto', amp='default'):
    set_seed(0)
    learn = _learner(dls, method, args, attn_impl, amp, args.compile)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(warmup=args.warmup)
    n_iter = len(dls.train)
    epochs = -(-(args.steps + args.warmup) // n_iter)
    with learn.no_bar(), learn.no_logging():
        learn.fit_warmup_cosine(epochs, 5e-4, cbs=[timer])
    return timer.summary(), len(timer.steps) - args.warmup


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help='CT folder (default: ../shared/data/lidc_idri, else synthetic)')
    p.add_argument('--encoder', default='swin-tiny')
    p.add_argument('--crop', type=int, default=64)
    p.add_argument('--bs', type=int, default=2)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--out-dim', type=int, default=1024)
    p.add_argument('--head-hidden', type=int, default=512)
    p.add_argument('--methods', nargs='+', default=['dagman', 'smit'])
    p.add_argument('--attn-impls', nargs='+', default=['auto'], help="the encoder's attention paths to compare")
    p.add_argument('--amps', nargs='+', default=['default'], choices=['default', 'fp32', 'bf16'],
                   help="autocast of each run ('default': the learner's choice, fp32 on the CPU)")
    p.add_argument('--compile', action='store_true',
                   help='compile the encoder blocks (compile_blocks); the compile time falls in the untimed warm-up')
    p.add_argument('--baseline', default=None, metavar='REV', help="also time the library of git revision REV")
    p.add_argument('--rounds', type=int, default=3, help='with --baseline: alternating rounds (default 3)')
    p.add_argument('--json', default=None, help='also write the per-part times here')
    p.add_argument('--timing-only', action='store_true', help=argparse.SUPPRESS)  # a baseline's run: no FLOPs
    args = p.parse_args()
    rounds = _rounds(args) if args.baseline else None
    data = args.data
    shared = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'lidc_idri'
    if data is None and shared.exists():
        data = shared
    tmp = Path(tempfile.mkdtemp())
    if data is None:
        print('no real CT found: synthetic volumes')
        data = tmp / 'synthetic'
        synthetic_ct(data, n=8, size=max(96, args.crop + 32))
    dls = ct_ssl_dls(data, crop=args.crop, bs=args.bs, cache_dir=tmp / 'cache', progress=False)
    print(f'data {data}: {len(dls.volumes)} volumes; encoder {args.encoder}, crop {args.crop}, bs {args.bs} x 2 views, '
          f'heads {args.out_dim}/{args.head_hidden}; torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}')
    results, peaks, flops, dtypes = {}, {}, {}, {}
    for method in args.methods:
        if not args.timing_only:
            flops[method] = step_flops(dls, method, args)
        for impl in args.attn_impls if rounds is None else []:  # with --baseline, timed in the rounds' subprocesses
            for amp in args.amps:
                name = '/'.join([method] + ([impl] if len(args.attn_impls) > 1 else [])
                                + ([amp] if len(args.amps) > 1 else [])) + ('+compile' if args.compile else '')
                t0 = time.perf_counter()
                results[name], n = run(dls, method, args, impl, amp)
                peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
                dtypes[name] = 'bf16' if amp == 'bf16' or (amp == 'default' and torch.cuda.is_available()) else 'fp32'
                print(f'{name}: {n} timed steps in {time.perf_counter() - t0:.0f} s'
                      + (f', peak memory {peaks[name]:.2f} GiB' if peaks[name] else ''))
    if rounds:
        for tag, runs in (('', rounds['new']), (f'@{args.baseline}', rounds['old'])):
            for k in runs[0]['parts']:
                name = k + tag
                results[name] = {part: statistics.median(r['parts'][k][part] for r in runs) for part in PARTS}
                peaks[name], dtypes[name] = runs[0]['peak_gib'].get(k), runs[0]['dtypes'].get(k, 'fp32')
    print('\nmean seconds per step (share of the step)')
    print('| part | ' + ' | '.join(results) + ' |')
    print('|---|' + '---|' * len(results))
    for part in PARTS:
        cells = [f'{r[part]:.3f} ({100 * r[part] / sum(r.values()):.1f}%)' for r in results.values()]
        print(f'| {part} | ' + ' | '.join(cells) + ' |')
    print('| **step** | ' + ' | '.join(f'**{sum(r.values()):.3f}**' for r in results.values()) + ' |')
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
    achieved, peak = {}, {}
    if args.timing_only:  # the library of a baseline revision may not have the FLOP helpers
        flops = {}
    else:
        from dagman_fast.train_utils import mfu, peak_tflops
        peak = {d: peak_tflops(None, torch.bfloat16 if d == 'bf16' else torch.float32) for d in set(dtypes.values())}
        print(f'\nFLOPs of one step (batch {args.bs} x 2 views, counted on the reference attention path): '
              + ', '.join(f'{m} {f / 1e12:.3f} T' for m, f in flops.items()))
        print('peak: ' + ', '.join(f'{d} {p:.3f} TFLOP/s ({src})' for d, (p, src) in peak.items()))
        print('| run | s/step | TFLOP/s | MFU |')
        print('|---|---|---|---|')
    for name, r in results.items():
        f = flops.get(name.split('@')[0].split('/')[0].split('+')[0])  # by method
        if f is None:
            continue
        secs = sum(r.values())
        achieved[name] = dict(tflops=f / secs / 1e12, mfu=mfu(f, secs, peak[dtypes[name]][0]))
        print(f'| {name} | {secs:.3f} | {achieved[name]["tflops"]:.3f} | {achieved[name]["mfu"]:.1%} |')
    for method, r in results.items():
        share = 100 * (r['masking'] + r['ema']) / sum(r.values())
        print(f'{method}: masking + EMA = {share:.1f}% of the step')
    for name, r in results.items():
        if rounds and '@' not in name and f'{name}@{args.baseline}' in results:
            old = results[f'{name}@{args.baseline}']
            each = [sum(o['parts'][name].values()) / sum(n['parts'][name].values())
                    for o, n in zip(rounds['old'], rounds['new'])]
            print(f'{name}: {sum(old.values()) / sum(r.values()):.2f}x the step of {args.baseline} (medians over '
                  f'{len(each)} alternating rounds; per round: ' + ', '.join(f'{x:.2f}x' for x in each) + ')')
    if 'dagman' in results and 'smit' in results:
        print(f'dagman / smit step time: {sum(results["dagman"].values()) / sum(results["smit"].values()):.2f}x')
    for method in args.methods:
        base = results.get(f'{method}/reference')
        for impl in args.attn_impls:
            if base and impl != 'reference':
                print(f'{method}: step with eager attention / with {impl}: '
                      f'{sum(base.values()) / sum(results[f"{method}/{impl}"].values()):.2f}x')
    if args.json:
        Path(args.json).write_text(json.dumps({
            'device': device, 'torch': torch.__version__, 'encoder': args.encoder, 'crop': args.crop, 'bs': args.bs,
            'steps': args.steps, 'seconds_per_step': {k: sum(r.values()) for k, r in results.items()},
            'parts': results, 'peak_gib': peaks, 'dtypes': dtypes, 'flops': flops, 'achieved': achieved,
            'peak_tflops': {d: p for d, (p, _) in peak.items()}}, indent=1))


def _rounds(args) -> dict:
    """This benchmark (same arguments, timing only) in subprocesses, alternately on the library of git revision
    `args.baseline` and on this tree, `args.rounds` times each: `{'old': [results...], 'new': [results...]}`.
    The old `dagman_fast/` and `kernels/` are exported to a temporary folder laid out as an install (kernels inside
    the package) and put first on the path; this script and its options stay the same."""
    root = Path(__file__).resolve().parents[1]
    argv = list(sys.argv[1:])
    for flag, n in (('--baseline', 2), ('--json', 2), ('--rounds', 2)):
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + n]
    res = {'old': [], 'new': []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = subprocess.run(['git', '-C', str(root), 'archive', args.baseline, 'dagman_fast', 'kernels'],
                                 check=True, capture_output=True).stdout
        (tmp / 'old').mkdir()
        subprocess.run(['tar', '-x', '-C', str(tmp / 'old')], input=archive, check=True)
        (tmp / 'old' / 'kernels').rename(tmp / 'old' / 'dagman_fast' / 'kernels')
        for r in range(args.rounds):
            for which in ('old', 'new'):
                out = tmp / f'{which}{r}.json'
                env = dict(os.environ, PYTHONSAFEPATH='1')
                if which == 'old':
                    env['PYTHONPATH'] = str(tmp / 'old') + os.pathsep + os.environ.get('PYTHONPATH', '')
                print(f'round {r + 1}/{args.rounds}: {args.baseline if which == "old" else "this tree"}', flush=True)
                subprocess.run([sys.executable, __file__] + argv + ['--json', str(out), '--timing-only'], check=True,
                               env=env, stdout=subprocess.DEVNULL)
                res[which].append(json.loads(out.read_text()))
    return res


if __name__ == '__main__':
    main()
