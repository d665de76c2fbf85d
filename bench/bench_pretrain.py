"""Pretraining step time: where a DAGMaN step goes, and DAGMaN against the SMIT baseline on the same engine.

    python bench/bench_pretrain.py                      # swin-tiny, crop 64, real LIDC CT from ../shared/data
    python bench/bench_pretrain.py --data DIR --steps 30 --encoder swin-smit --crop 128
    python bench/bench_pretrain.py --encoder swin-smit --crop 128 --methods dagman --attn-impls reference triton \
        --json out.json                                 # the paper's scale on CUDA, eager attention against Triton

Each method (for each `--attn-impls` entry: the encoder's attention path) trains `--steps` steps (after `--warmup` untimed ones) with `StepTimer`, which splits a step into data,
teacher forward, masking, student forward, losses, backward + optimiser, EMA update and fastai's bookkeeping. The
methods run one after the other in this process with the same data, seed and heads. Without real data (no
`../shared/data`), synthetic volumes are used and said so.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from fastai.torch_core import set_seed

from dagman_fast.data import ct_ssl_dls, synthetic_ct
from dagman_fast.learner import dagman_learner
from dagman_fast.train_utils import StepTimer

PARTS = ['data', 'teacher', 'masking', 'student', 'losses', 'backward', 'ema', 'other']


def run(dls, method, args, attn_impl='auto'):
    set_seed(0)
    learn = dagman_learner(dls, method=method, encoder=args.encoder, checkpoint=None, log=None, attn_impl=attn_impl,
                           path=tempfile.mkdtemp(), out_dim=args.out_dim, head_hidden=args.head_hidden)
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
    p.add_argument('--json', default=None, help='also write the per-part times here')
    args = p.parse_args()
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
    results, peaks = {}, {}
    for method in args.methods:
        for impl in args.attn_impls:
            name = method if len(args.attn_impls) == 1 else f'{method}/{impl}'
            t0 = time.perf_counter()
            results[name], n = run(dls, method, args, impl)
            peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
            print(f'{name}: {n} timed steps in {time.perf_counter() - t0:.0f} s'
                  + (f', peak memory {peaks[name]:.2f} GiB' if peaks[name] else ''))
    print('\nmean seconds per step (share of the step)')
    print('| part | ' + ' | '.join(results) + ' |')
    print('|---|' + '---|' * len(results))
    for part in PARTS:
        cells = [f'{r[part]:.3f} ({100 * r[part] / sum(r.values()):.1f}%)' for r in results.values()]
        print(f'| {part} | ' + ' | '.join(cells) + ' |')
    print('| **step** | ' + ' | '.join(f'**{sum(r.values()):.3f}**' for r in results.values()) + ' |')
    for method, r in results.items():
        share = 100 * (r['masking'] + r['ema']) / sum(r.values())
        print(f'{method}: masking + EMA = {share:.1f}% of the step')
    if 'dagman' in results and 'smit' in results:
        print(f'dagman / smit step time: {sum(results["dagman"].values()) / sum(results["smit"].values()):.2f}x')
    for method in args.methods:
        base = results.get(f'{method}/reference')
        for impl in args.attn_impls:
            if base and impl != 'reference':
                print(f'{method}: step with eager attention / with {impl}: '
                      f'{sum(base.values()) / sum(results[f"{method}/{impl}"].values()):.2f}x')
    if args.json:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
        Path(args.json).write_text(json.dumps({
            'device': device, 'torch': torch.__version__, 'encoder': args.encoder, 'crop': args.crop, 'bs': args.bs,
            'steps': args.steps, 'seconds_per_step': {k: sum(r.values()) for k, r in results.items()},
            'parts': results, 'peak_gib': peaks}, indent=1))


if __name__ == '__main__':
    main()
