"""Patch-dropout fill: does the noisy teacher still rank the cells like the clean one, with 'zero' or 'token' fill?

    python bench/bench_patch_drop_fill.py                       # swin-tiny, crop 64, real LIDC CT from ../shared/data
    python bench/bench_patch_drop_fill.py --epochs 20 --draws 5 --workdir /tmp/fill
    python bench/bench_patch_drop_fill.py --set cross_view=False --set ema_momentum=0.99

Pretrains DAGMaN twice on the same data with the same seed (`set_seed(0)` before each build) and the paper's schedule
(`fit_warmup_cosine(epochs, 5e-4)`), once per `patch_drop_fill` ('zero', 'token'). Then, for each trained teacher and
for the untrained (random-init) one, on fixed views drawn once with a fixed seed, it compares the [CLS] -> cell
attention (head mean, `out.attn`) of the noisy teacher (patch dropout `p` in 0.1, 0.2, 0.3, filled with 'zero' or
'token' at measurement time, whatever the training fill) with the clean teacher's over `--draws` dropout masks:

- Spearman: rank correlation of the two attention vectors (1: same order; 0: chance).
- top-70% shared: the share of the clean teacher's top-70% cells (the cells the student would mask, before hints)
  that are still in the noisy teacher's top 70% (1: same set; chance: k/N).

Figures are mean +- sd over views x draws. Also prints the first/last epoch means of the loss terms and teacher
entropies from `learn.pretrain_log`. `--set KEY=VALUE` passes a `DAGMaNConfig` (or encoder) override to every model.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastai.torch_core import set_seed

from dagman_fast.recipes import parse_settings as parse_set  # the same KEY=VALUE parsing as dagman pretrain --set
from dagman_fast.data import ct_ssl_dls
from dagman_fast.learner import dagman_learner
from dagman_fast.masking import count, patch_dropout_mask

FILLS = ('zero', 'token')
TERMS = ('aitd', 'ampd', 'gitd', 'amip', 'train_loss')


def build(dls, fill, args, path):
    set_seed(0)
    return dagman_learner(dls, encoder=args.encoder, out_dim=args.out_dim, head_hidden=args.head_hidden,
                          patch_drop_fill=fill, path=path, checkpoint=None, **args.overrides)


def fixed_views(dls, n_batches: int, seed: int = 123) -> torch.Tensor:
    "All views of the first `n_batches` training batches, drawn once with `seed`: `(n, 1, *crop)`."
    set_seed(seed)
    views = []
    for i, batch in enumerate(dls.train):
        if i == n_batches:
            break
        views += list(batch)
    return torch.cat(views)


def ranks(a: torch.Tensor) -> torch.Tensor:
    return a.argsort(-1).argsort(-1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    "Row-wise Spearman correlation of `(b, n)` scores (ties: none in float attention)."
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def top_shared(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    "Row-wise share of the top-`k` cells of `a` that are also in the top `k` of `b`."
    ta = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, -1).indices, True)
    tb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, -1).indices, True)
    return (ta & tb).sum(-1).float() / k


@torch.no_grad()
def agreement(model, x, ratios, draws, mask_ratio) -> dict:
    """`({(fill, p): (Spearman, top-k shared)}, cells, k)`, the values per view x draw; the same dropout masks for
    every model and both fills."""
    enc = model.teacher.encoder.eval()
    clean = enc(x).attn.float()
    n = clean.shape[-1]
    k = count(mask_ratio, n)
    res = {}
    for p in ratios:
        for fill in FILLS:
            gen = torch.Generator().manual_seed(1000 + int(100 * p))  # same masks for both fills and all models
            rho, shared = [], []
            for _ in range(draws):
                drop = patch_dropout_mask(x.shape[0], model.patch_grid(x.shape[2:]), p, generator=gen)
                noisy = enc(x, drop, fill).attn.float()
                rho.append(spearman(clean, noisy))
                shared.append(top_shared(clean, noisy, k))
            res[fill, p] = torch.cat(rho), torch.cat(shared)
    return res, n, k


def fmt(v: torch.Tensor) -> str:
    return f'{v.mean():.3f} +- {v.std():.3f}'


def table(title, header, rows):
    print(f'\n{title}\n')
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')


def cpu_name() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name'))
    except (OSError, StopIteration):
        return 'unknown CPU'


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help='CT folder (default: ../shared/data/lidc_idri beside the repo)')
    p.add_argument('--encoder', default='swin-tiny')
    p.add_argument('--crop', type=int, default=64)
    p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--out-dim', type=int, default=1024)
    p.add_argument('--head-hidden', type=int, default=512)
    p.add_argument('--ratios', type=float, nargs='+', default=[0.1, 0.2, 0.3], help='patch dropout at measurement')
    p.add_argument('--draws', type=int, default=10, help='dropout masks per (model, fill, ratio)')
    p.add_argument('--batches', type=int, default=3, help='fixed batches (x 2 views) to measure on')
    p.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE',
                   help='config override for every model, e.g. cross_view=False (repeatable)')
    p.add_argument('--workdir', default=None, help='scratch folder for the cache and the logs (default: a new temp dir)')
    args = p.parse_args()
    args.overrides = parse_set(args.sets)
    t_start = time.perf_counter()
    data = Path(args.data) if args.data else Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'lidc_idri'
    if not data.exists():
        raise SystemExit(f'no CT at {data}: pass --data')
    tmp = Path(args.workdir or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    print(f'command: python {" ".join(shlex.quote(a) for a in sys.argv)}')
    print(f'device: CPU, {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}')
    dls = ct_ssl_dls(data, crop=args.crop, bs=1, cache_dir=tmp / 'cache', progress=False)
    print(f'data {data}: {len(dls.volumes)} volumes, {len(dls.train)} steps/epoch; encoder {args.encoder}, crop '
          f'{args.crop}, heads {args.out_dim}/{args.head_hidden}; {args.epochs} epochs, fit_warmup_cosine(lr={args.lr}); '
          f'overrides {args.overrides or "none"}')
    x = fixed_views(dls, args.batches)
    learn = build(dls, 'zero', args, tmp / 'untrained')
    mask_ratio = learn.model.config.mask_ratio
    results, logs = {}, {}
    results['untrained'], n, k = agreement(learn.model, x, args.ratios, args.draws, mask_ratio)
    for fill in FILLS:
        learn = build(dls, fill, args, tmp / fill)
        t0 = time.perf_counter()
        with learn.no_bar(), learn.no_logging():
            learn.fit_warmup_cosine(args.epochs, args.lr)
        logs[fill] = learn.pretrain_log
        print(f'trained with fill={fill!r}: {args.epochs} epochs in {time.perf_counter() - t0:.0f} s')
        results[f'trained {fill}'], _, _ = agreement(learn.model, x, args.ratios, args.draws, mask_ratio)

    print(f'\nmeasured on {x.shape[0]} fixed views, {args.draws} dropout draws each; {n} cells, top {k} '
          f'(chance: Spearman 0, top-{k} shared {k / n:.3f})')
    head = ['teacher', 'fill at measurement'] + [f'p = {r}' for r in args.ratios]
    for i, name in enumerate(('Spearman rank correlation, noisy vs clean teacher attention',
                              f'Share of the clean top-{k} cells (top 70%) kept by the noisy teacher')):
        rows = [[model, fill] + [fmt(res[fill, r][i]) for r in args.ratios]
                for model, res in results.items() for fill in FILLS]
        table(f'{name} (mean +- sd over views x draws)', head, rows)

    def first_last(fill, key):
        rows = logs[fill]
        return f'{float(rows[0][key]):.3f} -> {float(rows[-1][key]):.3f}' if rows and key in rows[0] else '-'
    table(f'Pretraining loss terms, epoch 0 -> epoch {args.epochs - 1} (epoch means)',
          ['term'] + [f'fill {f}' for f in FILLS], [[t] + [first_last(f, t) for f in FILLS] for t in TERMS])
    ent = [f'{t}_{s}' for t in ('aitd', 'ampd', 'gitd') for s in ('entropy', 'mean_entropy')]
    table(f'Teacher entropies (nats; log(out_dim) = {torch.log(torch.tensor(float(args.out_dim))):.3f}), '
          f'epoch 0 -> epoch {args.epochs - 1}', ['entropy'] + [f'fill {f}' for f in FILLS],
          [[e] + [first_last(f, e) for f in FILLS] for e in ent])
    print(f'\nwall time: {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
    main()
