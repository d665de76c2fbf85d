"""AdrenalMNIST3D downstream benchmark: from scratch vs SMIT vs DAGMaN pretraining, linear probe and fine-tune.

    python bench/bench_medmnist.py --out runs/medmnist   # the BENCHMARKS.md table; keeps encoders, logs, results
    python bench/bench_medmnist.py --out runs/medmnist --size 64 --protocols probe   # the 64^3 images, same encoders
    python bench/bench_medmnist.py --out runs/mm --arms dagman --fraction 0.25        # few-shot: a quarter of the labels
    python bench/bench_medmnist.py --table-from runs/medmnist runs/mm --out runs/all   # one table (and a few-shot
                                                                                      # plot) from several runs
    python bench/bench_medmnist.py --quick               # a smoke run of every step (a minute)
    python bench/bench_medmnist.py --out runs/cv --folds 3   # the paper's protocol: 3-fold CV, the official test held out

Runs can be split over processes (`--arms`, `--seeds`, `--protocols`, each with its own `--out` and
`--encoder-dir` pointing at the pretrained encoders) and their tables joined with `--table-from`.

1. Pretraining (self-supervised, labels unused) on the 1188 official training images, padded 28^3 -> 36^3, two
   random 32^3 views each (`medmnist3d_ssl_dls`), for `--pretrain-epochs` epochs with `dagman_learner`, once per
   method (seed 0). Same encoder for every arm: `swin-tiny` at 32^3 with the SA stage, and the mask, after stage 2
   (a 4^3 grid: after stage 3 a 32^3 input leaves only 2^3 cells to mask), no drop path, heads 1024 x 512.
   Short-run DINO settings (`cross_view=False, ema_momentum=0.99`, teacher temperature held at 0.04): the paper's
   are for 800 epochs and leave the teacher uniform in a few hundred steps (BENCHMARKS.md#superseded-first-pretraining-runs-on-lidc).
2. For every encoder (random init = scratch, smit, dagman) and every seed:
   - linear probe: the frozen encoder's pooled features (eval mode, no augmentation, so computed once) standardised
     with the training statistics, and a linear layer trained on them with fastai (`--probe-epochs`, one cycle,
     its own learning rate and weight decay): the protocol of `cls_learner(linear_probe=True)` plus the usual
     feature standardisation, at a small share of its cost;
   - fine-tune: the recipe, `cls_learner`'s defaults (balanced class weights, `BatchAugment3D` of the training
     batches, drop path 0.1, AdamW) and `learn.fine_tune_recipe(E, lr)` (layer-wise LR decay 0.75 over the Swin
     stages, 10% warm-up then cosine); the scratch arm uses one rate for every layer (`layer_decay=1`). The epoch
     with the best validation AUC is kept (`SaveModelCallback`) and scored once on the official test split: the
     test split never chooses anything.
   Seeds change the head's initialisation, the shuffling, the augmentation and the random encoder of the scratch
   arm; the pretraining itself runs once. `--size 64` evaluates on the 64^3 images with the same encoders (their
   SA position embedding is resized to the larger grid).
   With `--folds K` (the paper's protocol, Appendix B): the official train and val images together are the
   development set, split into K stratified folds (`cv_splits`, seed 0); each fold's model trains on the other
   folds, chooses its epoch on its own fold and is scored on the official test split, which no fold touches.
   Fold k runs with seed k (instead of `--seeds`).
3. A table (mean +- std over seeds of test AUC and ACC; over folds the sample sd), `results.json` and per-run rows go
   to `--out`.

Published MedMNIST v2 (Yang et al. 2023) bests on AdrenalMNIST3D test: AUC 0.839 (ResNet-18 + ACS, 28^3),
ACC 0.802 (auto-sklearn).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.torch_core import set_seed

from dagman_fast.analysis import plot_pretrain_log
from dagman_fast.model import run_defaults
from dagman_fast.data import medmnist3d_ssl_dls
from dagman_fast.classify import (cls_learner, cls_metrics, ClsModel, cv_dls, cv_splits, evaluate_classifier,
                                  few_shot_indices, labelled_items, medmnist3d_dls, subset_dls)
from dagman_fast.checkpoint import load_encoder
from dagman_fast.learner import dagman_learner
from dagman_fast.encoder_configs import encoder_config
from dagman_fast.swin import build_encoder

PUBLISHED = {'auc': (0.839, 'ResNet-18 + ACS (28)'), 'acc': (0.802, 'auto-sklearn')}
FLAG = 'adrenalmnist3d'
ARMS = ('scratch', 'smit', 'dagman')
# The settings `dagman pretrain --medmnist` uses (one source): short-run DINO, tiny-encoder heads, mask on stage 2.
RUN = run_defaults('swin-tiny', 32, 'medmnist')  # what dagman pretrain --medmnist gives swin-tiny
SHORT = {k: RUN[k] for k in ('out_dim', 'head_hidden', 'mask_stage')}


def encoder_cfg():
    return encoder_config('swin-tiny', img_size=32, sa_stage=2, drop_path_rate=RUN['drop_path_rate'])


def pretrain(method: str, args, out: Path) -> tuple[Path, float]:
    "Pretrain once with `method` (seed 0); reuse an earlier run's encoder in `out`."
    enc_path = out / method / 'encoder.pth'
    if enc_path.exists():
        print(f'{method}: reusing {enc_path}')
        return enc_path, None  # not timed in this run
    set_seed(0)
    dls = medmnist3d_ssl_dls(FLAG, args.root, bs=args.bs, seed=0)
    if args.quick:
        dls = subset_dls(dls, list(range(2 * args.bs)))
    learn = dagman_learner(dls, method=method, encoder=encoder_cfg(), path=out / method, lr=args.pretrain_lr, **SHORT)
    t0 = time.time()
    warnings.filterwarnings('ignore', message='Your generator is empty')  # no validation split in pretraining
    learn.fit_warmup_cosine(args.pretrain_epochs, args.pretrain_lr)  # the paper's schedule, as dagman pretrain
    secs = time.time() - t0
    learn.export_encoder(enc_path)
    plot_pretrain_log(out / method / 'pretrain_log.csv', out / method / 'pretrain_log.png', out_dim=SHORT['out_dim'])
    return enc_path, secs


def labelled(args, seed: int, fold: int | None = None):
    set_seed(seed)
    dls = medmnist3d_dls(FLAG, args.root, size=args.size, bs=args.bs)
    if fold is not None:  # the development set (train + val) in folds; the official test split held out
        x, y, test = labelled_items(dls)
        tr, va = cv_splits(y.numpy(), args.folds, test, seed=0)[1][fold]
        dls = cv_dls(x, y, tr, va, test, classes=dls.c, bs=args.bs)
    if args.fraction < 1:
        labels = dls.train.dataset.tensors[1].tolist()
        dls = subset_dls(dls, few_shot_indices(labels, args.fraction, seed=seed))
    return dls


def encoder_for(arm: str, encoders: dict):
    return build_encoder(encoder_cfg()) if arm == 'scratch' else load_encoder(encoders[arm])


@torch.no_grad()
def _features(model: ClsModel, dl) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    xs, ys = zip(*[(model.features(x).float().cpu(), y.cpu()) for x, y in dl])
    return torch.cat(xs), torch.cat(ys)


def linear_probe(arm: str, seed: int, encoders: dict, args, fold: int | None = None) -> dict:
    """A linear layer on frozen, standardised features. The frozen encoder runs in eval mode on unaugmented data, so
    its features are fixed and are computed once (hand-written here for that reason: `cls_learner(linear_probe=True)`
    would run the encoder every epoch)."""
    dls = labelled(args, seed, fold)
    set_seed(seed)
    model = ClsModel(encoder_for(arm, encoders), dls.c, frozen_encoder=True)
    plain = lambda dl: DataLoader(dl.dataset, bs=64)  # in order, no drop_last
    (xtr, ytr), (xva, yva), (xte, yte) = (_features(model, plain(dl)) for dl in (dls.train, dls.valid, dls.test))
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    norm = lambda x: (x - mean) / std
    set_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], dls.c)
    fit_head(head, norm(xtr), ytr, norm(xva), yva, args.probe_epochs, args.probe_lr, args.probe_wd)
    res, _, _ = evaluate_classifier(head, DataLoader(torch.utils.data.TensorDataset(norm(xte), yte), bs=64))
    return res


def fit_head(head: torch.nn.Module, xtr, ytr, xva, yva, epochs: int, lr: float, wd: float, weight=None) -> Learner:
    "Fit `head` on fixed (standardised) features with fastai's one-cycle schedule; `weight`: class weights."
    fdl = lambda x, y, **kw: DataLoader(torch.utils.data.TensorDataset(x, y), bs=64, **kw)
    fdls = DataLoaders(fdl(xtr, ytr, shuffle=True), fdl(xva, yva), device='cpu')
    learn = Learner(fdls, head, loss_func=CrossEntropyLossFlat(weight=weight), opt_func=Adam, wd=wd,
                    metrics=cls_metrics(head.out_features))
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
    return learn


def fine_tune(arm: str, seed: int, encoders: dict, args, fold: int | None = None) -> dict:
    dls = labelled(args, seed, fold)
    set_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:  # SaveModelCallback's best epoch, one folder per run
        learn = cls_learner(dls, encoder=encoder_for(arm, encoders), lr=args.lr, path=tmp)
        with learn.no_bar(), learn.no_logging():
            learn.fine_tune_recipe(args.ft_epochs, args.lr, layer_decay=1.0 if arm == 'scratch' else args.layer_decay)
    res, _, _ = evaluate_classifier(learn.model, dls.test)  # once, on the epoch the validation split chose
    return dict(res, kept_epoch=learn.best_epoch)


def table(rows: list[dict]) -> str:
    lines = ['| size | labels | encoder | protocol | test AUC | test ACC | runs |', '|---|---|---|---|---|---|---|']
    keys = sorted({(r.get('size', 28), r.get('fraction', 1.0)) for r in rows}, key=lambda k: (k[0], -k[1]))
    for size, frac in keys:
        for arm in ARMS:
            for proto in ('linear probe', 'fine-tune'):
                r = [x for x in rows if x['arm'] == arm and x['protocol'] == proto and x.get('size', 28) == size
                     and x.get('fraction', 1.0) == frac]
                if not r:
                    continue
                ddof = 1 if len(r) > 1 and all('fold' in x for x in r) else 0  # folds: the sample sd
                f = lambda k: f"{np.mean([x[k] for x in r]):.3f} ± {np.std([x[k] for x in r], ddof=ddof):.3f}"
                lines.append(f"| {size}^3 | {frac:.0%} | {arm} | {proto} | {f('auc')} | {f('accuracy')} | {len(r)} |")
    lines.append(f"| 28^3 | 100% | published best (MedMNIST v2) | | {PUBLISHED['auc'][0]} ({PUBLISHED['auc'][1]}) | "
                 f"{PUBLISHED['acc'][0]} ({PUBLISHED['acc'][1]}) | |")
    return '\n'.join(lines)


def plot_few_shot(rows: list[dict], path: Path, size: int = 28) -> None:
    "Test AUC against the share of labels (mean and std over seeds), a line per encoder and protocol: the paper's figure."
    from matplotlib.figure import Figure  # no pyplot, as the library's plots
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    colours = dict(zip(ARMS, ('tab:grey', 'tab:orange', 'tab:blue')))
    for arm in ARMS:
        for proto, style in (('fine-tune', '-'), ('linear probe', ':')):
            pts = {}
            for r in rows:
                if r['arm'] == arm and r['protocol'] == proto and r.get('size', 28) == size:
                    pts.setdefault(r.get('fraction', 1.0), []).append(r['auc'])
            if pts:
                fr = sorted(pts)
                ax.errorbar([100 * f for f in fr], [np.mean(pts[f]) for f in fr], yerr=[np.std(pts[f]) for f in fr],
                            ls=style, marker='o', capsize=3, color=colours[arm], label=f'{arm}, {proto}')
    ax.axhline(PUBLISHED['auc'][0], c='grey', lw=1, ls='--', label=f"published best ({PUBLISHED['auc'][1]})")
    ax.set(xlabel='labelled training images (%)', ylabel='test AUC', title=f'AdrenalMNIST3D {size}^3: few-shot')
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None):
    shared = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'medmnist'
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default=str(shared), help='folder of adrenalmnist3d.npz (default ../shared/data/medmnist)')
    p.add_argument('--out', default=None, help='output folder (default: a new temporary folder)')
    p.add_argument('--arms', nargs='+', default=list(ARMS), choices=ARMS)
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--protocols', nargs='+', default=['probe', 'finetune'], choices=['probe', 'finetune'])
    p.add_argument('--size', type=int, default=28, choices=[28, 64], help='image side of the labelled runs')
    p.add_argument('--encoder-dir', default=None, help='folder of pretrained <method>/encoder.pth (default --out)')
    p.add_argument('--table-from', nargs='+', default=None, help="only join the results.json of these --out folders")
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch chooses)')
    p.add_argument('--pretrain-epochs', type=int, default=8)
    p.add_argument('--pretrain-lr', type=float, default=5e-4)
    p.add_argument('--ft-epochs', type=int, default=6, help='fine-tuning epochs (the best validation epoch is kept)')
    p.add_argument('--layer-decay', type=float, default=0.75, help='layer-wise LR decay of pretrained encoders')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--probe-epochs', type=int, default=30)
    p.add_argument('--probe-lr', type=float, default=1e-2)
    p.add_argument('--probe-wd', type=float, default=1e-3)
    p.add_argument('--fraction', type=float, default=1.0, help='stratified share of the labelled training set')
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--quick', action='store_true', help='smoke run: 1 epoch each on a 5%% subset, one seed')
    p.add_argument('--folds', type=int, default=None,
                   help="the paper's protocol: K-fold CV on train + val, scored on the official test split")
    args = p.parse_args(argv)
    if args.table_from:
        rows = [r for d in args.table_from for r in json.loads((Path(d) / 'results.json').read_text())['rows']]
        print(table(rows))
        if args.out and len({r.get('fraction', 1.0) for r in rows}) > 1:
            plot_few_shot(rows, Path(args.out) / 'few_shot.png')
            print(f"few-shot plot: {Path(args.out) / 'few_shot.png'}")
        return rows
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.pretrain_epochs, args.ft_epochs, args.probe_epochs, args.seeds = 1, 1, 2, args.seeds[:1]
        args.fraction, args.bs = min(args.fraction, 0.05), 8
    out = Path(args.out or tempfile.mkdtemp(prefix='bench_medmnist_'))
    out.mkdir(parents=True, exist_ok=True)
    encoders, timing = {}, {}
    for arm in args.arms:
        if arm != 'scratch':
            encoders[arm], timing[f'pretrain_{arm}_s'] = pretrain(arm, args, Path(args.encoder_dir or out))
    rows = []
    runs = [(k, k) for k in range(args.folds)] if args.folds else [(s, None) for s in args.seeds]
    for seed, fold in runs:  # seed- (fold-) major: a stopped run still has every arm for its first seeds
        for arm in args.arms:
            for proto, fn in (('linear probe', linear_probe), ('fine-tune', fine_tune)):
                if proto.split()[-1].replace('-', '') not in args.protocols:
                    continue
                t0 = time.time()
                res = fn(arm, seed, encoders, args, fold)
                rows.append(dict(arm=arm, protocol=proto, seed=seed, size=args.size, fraction=args.fraction,
                                 seconds=round(time.time() - t0, 1), **({} if fold is None else {'fold': fold}), **res))
                print(json.dumps(rows[-1]), flush=True)
                (out / 'results.json').write_text(json.dumps(dict(config=vars(args), timing=timing, rows=rows),
                                                             indent=1) + '\n')
    md = table(rows)
    (out / 'table.md').write_text(md + '\n')
    print(md)
    print(f'results in {out}')
    return rows


if __name__ == '__main__':
    main()
