"""Pretraining step time: where a DAGMaN step goes, and DAGMaN against the SMIT baseline on the same engine.

    python bench/bench_pretrain.py                      # swin-tiny, crop 64, real LIDC CT from ../shared/data
    python bench/bench_pretrain.py --data DIR --steps 30 --encoder swin-smit --crop 128

Each method trains `--steps` steps (after `--warmup` untimed ones) with `StepTimer`, which splits a step into data,
teacher forward, masking, student forward, losses, backward + optimiser, EMA update and fastai's bookkeeping. The
methods run one after the other in this process with the same data, seed and heads. Without real data (no
`../shared/data`), synthetic volumes are used and said so.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from fastai.torch_core import set_seed

from dagman_fast.data import ct_ssl_dls, synthetic_ct
from dagman_fast.learner import StepTimer, dagman_learner

PARTS = ['data', 'teacher', 'masking', 'student', 'losses', 'backward', 'ema', 'other']


def run(dls, method, args):
    set_seed(0)
    learn = dagman_learner(dls, method=method, encoder=args.encoder, checkpoint=None, log=None,
                           path=tempfile.mkdtemp(), out_dim=args.out_dim, head_hidden=args.head_hidden)
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
    args = p.parse_args()
    data = args.data
    shared = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'lidc_idri'
    if data is None and shared.exists():
        data = shared
    tmp = Path(tempfile.mkdtemp())
    if data is None:
        print('no real CT found: synthetic volumes')
        data = tmp / 'synthetic'
        synthetic_ct(data, n=8, size=96)
    dls = ct_ssl_dls(data, crop=args.crop, bs=args.bs, cache_dir=tmp / 'cache', progress=False)
    print(f'data {data}: {len(dls.volumes)} volumes; encoder {args.encoder}, crop {args.crop}, bs {args.bs} x 2 views, '
          f'heads {args.out_dim}/{args.head_hidden}; torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}')
    results = {}
    for method in args.methods:
        t0 = time.perf_counter()
        results[method], n = run(dls, method, args)
        print(f'{method}: {n} timed steps in {time.perf_counter() - t0:.0f} s')
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


if __name__ == '__main__':
    main()
