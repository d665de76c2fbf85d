"""Why fine-tuning a pretrained encoder lost to its linear probe on AdrenalMNIST3D, one change at a time (issue 14).

    python bench/bench_finetune_recipe.py --encoder runs/medmnist/dagman/encoder.pth             # every variant
    python bench/bench_finetune_recipe.py --encoder E --variants old recipe full --out runs/ft   # some of them

`--encoder` is an `encoder.pth` of `bench/bench_medmnist.py` (its pretraining on the 1188 training images; the
script keeps it under `--out`). Each variant fine-tunes that encoder on the official training split (28^3, zero-padded
to 32^3 by the model) and reports:

- the validation AUC after every epoch, and the epoch the recipe keeps (`SaveModelCallback` on the validation AUC;
  the fastai schedules keep their last epoch, as `learn.fine_tune` does);
- test AUC, accuracy, sensitivity, specificity, and the share of test cases called abnormal (0 when a model calls
  every case normal), scored once, on the kept weights;
- feature drift: 1 - linear CKA (Kornblith et al. 2019) between the pooled features of the encoder before and
  after fine-tuning, on the validation images (0: the same features up to a rotation and scale).

Variants (seed 0 unless `--seeds`), each differing from the one above it in one thing:

    old        fastai `fine_tune(4, 1e-3, freeze_epochs=1)`: the schedule the table of issue 5 used
    old-lr1e-4 the same at a tenth of the learning rate
    old-frozen the same with 5 frozen epochs (only the head trains: a probe without feature standardisation)
    recipe     `fine_tune_recipe(E, 1e-3)`: layer-wise decay 0.75, 10% warm-up then cosine, the best validation epoch
    +weights   and balanced class weights
    +augment   and augmentation of the training batches (`BatchAugment3D`: flips, affine, intensity)
    +drop-path and drop path 0.1
    full       and the pooled features standardised before the head (`FeatureNorm`): the defaults of `cls_learner`
               (what `dagman finetune` does)
    full-noweights                the full recipe without class weights
    recipe+norm, old+norm         the standardisation alone, with the recipe's and with fastai's schedule
    full-lr3e-4, full-lr3e-3      the full recipe at other learning rates
    full-decay0.5, full-decay0.9  the full recipe with other layer decays
    full-lp    the full recipe started from the linear probe's head (LP-FT, Kumar et al. 2022)
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed

from dagman_fast.classify import cls_learner, evaluate_classifier, medmnist3d_dls
from dagman_fast.checkpoint import load_encoder

from bench_medmnist import _features, fit_head  # noqa: E402  (bench/ is on the path when run as a script)

FLAG = 'adrenalmnist3d'
OFF = dict(class_weights=None, augment=False, drop_path=None, norm=False)
FULL = dict(class_weights='balanced', augment=True, drop_path=0.1, norm=True)
VARIANTS = {
    'old': dict(schedule='fastai', lr=1e-3, **OFF),
    'old-lr1e-4': dict(schedule='fastai', lr=1e-4, **OFF),
    'old-frozen': dict(schedule='frozen', lr=1e-3, **OFF),
    'recipe': dict(schedule='recipe', lr=1e-3, **OFF),
    '+weights': dict(schedule='recipe', lr=1e-3, **{**OFF, 'class_weights': 'balanced'}),
    '+augment': dict(schedule='recipe', lr=1e-3, **{**OFF, 'class_weights': 'balanced', 'augment': True}),
    '+drop-path': dict(schedule='recipe', lr=1e-3, **{**FULL, 'norm': False}),
    'full': dict(schedule='recipe', lr=1e-3, **FULL),
    'full-noweights': dict(schedule='recipe', lr=1e-3, **{**FULL, 'class_weights': None}),
    'recipe+norm': dict(schedule='recipe', lr=1e-3, **{**OFF, 'norm': True}),
    'old+norm': dict(schedule='fastai', lr=1e-3, **{**OFF, 'norm': True}),
    'full-lr3e-4': dict(schedule='recipe', lr=3e-4, **FULL),
    'full-lr3e-3': dict(schedule='recipe', lr=3e-3, **FULL),
    'full-decay0.5': dict(schedule='recipe', lr=1e-3, layer_decay=0.5, **FULL),
    'full-decay0.9': dict(schedule='recipe', lr=1e-3, layer_decay=0.9, **FULL),
    'full-lp': dict(schedule='recipe', lr=1e-3, lp_head=True, **FULL),
}


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    "Linear CKA of two feature matrices `(n, d1)`, `(n, d2)` (Kornblith et al. 2019): 1 for the same up to rotation."
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))


class ValAUC:
    "Validation AUC after each epoch, from the recorder (the first metric of `cls_metrics`)."

    def __init__(self, learn):
        self.learn = learn

    def __call__(self):
        names = list(self.learn.recorder.metric_names[1:-1])  # without 'epoch' and 'time', as the values
        return [round(float(v[names.index('auc')]), 4) for v in self.learn.recorder.values]


def probe_head(learn, seed: int, epochs: int = 30) -> None:
    """LP-FT's first step: the head fitted alone on frozen, unaugmented, standardised features, as
    `bench_medmnist.linear_probe` fits its probe (`fit_head`), with the learner's class weights."""
    model, dls = learn.model, learn.dls
    plain = lambda dl: DataLoader(dl.dataset, bs=64)  # in order, no drop_last
    (xtr, ytr), (xva, yva) = (_features(model, plain(dl)) for dl in (dls.train, dls.valid))
    if model.norm:  # the standardisation starts from the training features' statistics
        fn = model.head[0].eval()
        fn.running_mean.copy_(xtr.mean(0)), fn.running_var.copy_(xtr.var(0))
        xtr, xva = fn(xtr), fn(xva)
    set_seed(seed)
    fit_head(model.head[-1], xtr, ytr, xva, yva, epochs, lr=1e-2, wd=1e-3, weight=learn.loss_func.func.weight)


def run(name: str, seed: int, args, out: Path) -> dict:
    v = dict(VARIANTS[name])
    set_seed(seed)
    dls = medmnist3d_dls(FLAG, args.root, bs=args.bs)
    enc0 = load_encoder(args.encoder)
    set_seed(seed)
    learn = cls_learner(dls, encoder=enc0, lr=v['lr'], class_weights=v['class_weights'], augment=v['augment'],
                        drop_path=v['drop_path'], norm=v['norm'], path=out / f'{name}_{seed}')
    before = copy.deepcopy(learn.model)
    if v.get('lp_head'):
        probe_head(learn, seed)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging():
        if v['schedule'] == 'fastai':
            learn.fine_tune(args.epochs - 1, v['lr'], freeze_epochs=1)
        elif v['schedule'] == 'frozen':
            learn.freeze()
            learn.fit_one_cycle(args.epochs, v['lr'])
        else:
            learn.fine_tune_recipe(args.epochs, v['lr'], layer_decay=v.get('layer_decay', 0.75))
    secs = time.time() - t0
    res, probs, labels = evaluate_classifier(learn.model, dls.test)  # the test split, once, on the kept weights
    cka = linear_cka(_features(before, dls.valid)[0], _features(learn.model, dls.valid)[0])
    return dict(variant=name, seed=seed, val_auc=ValAUC(learn)(),
                val_loss=[round(float(v[1]), 4) for v in learn.recorder.values],
                kept_epoch=getattr(learn, 'best_epoch', None),
                test_auc=round(res['auc'], 4), test_acc=round(res['accuracy'], 4),
                sensitivity=round(res['sensitivity'], 4), specificity=round(res['specificity'], 4),
                called_abnormal=round(float((probs.argmax(1) == 1).mean()), 3), drift=round(1 - cka, 4),
                seconds=round(secs, 1))


def main(argv=None):
    shared = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'medmnist'
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--encoder', required=True, help='encoder.pth of bench/bench_medmnist.py (pretrained)')
    p.add_argument('--root', default=str(shared), help='folder of adrenalmnist3d.npz (default ../shared/data/medmnist)')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--epochs', type=int, default=10, help='epochs of every variant (fastai: 1 frozen + the rest)')
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch chooses)')
    p.add_argument('--out', default=None, help='output folder (default: a new temporary folder)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix='bench_ft_recipe_'))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.variants:
            rows.append(run(name, seed, args, out))
            print(json.dumps(rows[-1]), flush=True)
            (out / f'results_{"_".join(args.variants)}.json').write_text(
                json.dumps(dict(config=vars(args), rows=rows), indent=1) + '\n')
    print('| variant | kept epoch | val AUC by epoch | test AUC | test ACC | sens | spec | called abnormal | drift |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        aucs = ' '.join(f'{a:.2f}' for a in r['val_auc'])
        print(f"| {r['variant']} | {r['kept_epoch']} | {aucs} | {r['test_auc']:.3f} | {r['test_acc']:.3f} "
              f"| {r['sensitivity']:.2f} | {r['specificity']:.2f} | {r['called_abnormal']:.2f} | {r['drift']:.3f} |")
    return rows


if __name__ == '__main__':
    main()
