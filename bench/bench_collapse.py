"""Self-distillation that learns: the anti-collapse options on real CT crops and AdrenalMNIST3D (issue 25).

    python bench/bench_collapse.py --data ct --configs paper bn bn-koleo --steps 1500 --out runs/collapse
    python bench/bench_collapse.py --data adrenal --configs bn-koleo --steps 1500 --seeds 0 1 2 --out runs/collapse
    python bench/bench_collapse.py --table runs/collapse                  # the Markdown table of every finished run
    python bench/bench_collapse.py --payoff runs/collapse                 # the probes over seeds against random

Each run pretrains `swin-tiny` (SA module and mask after stage 2, heads 1024 / 512) with `dagman_learner` for about
`--steps` steps of batch 8 x 2 views at 32^3, then writes `OUT/<data>/<config>/seed<k>/` with the per-epoch and
per-step logs and `summary.json`:

- the collapse monitors over the last 20% of the steps: each distillation loss against log K, the teacher's per-sample
  and batch-mean entropy and their gap, the feature cosine between samples (student and teacher) and its slope;
- the payoff, frozen pooled features of the student encoder against a random encoder of the same seed: organ
  classification on crops of the TotalSegmentator CT (no run pretrains on it; k-NN and logistic-regression accuracy,
  stratified 5-fold) and the AdrenalMNIST3D linear probe (logistic regression on the train split, test AUC).

Data: `ct` is random 32^3 crops at 2 mm of LIDC-IDRI-0001 and -0002 (`../shared/data/lidc_idri`), each scan listed
16 times so that a batch holds 8 crops; `adrenal` is the AdrenalMNIST3D train split (labels unused). The CPU model is
printed: compare timings only within one run.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import set_seed

from dagman_fast.all import (ct_ssl_dls, dagman_learner, medmnist3d_ssl_dls, organ_crops, pooled_features,
                             synthetic_ct)
from dagman_fast.callbacks import collapse_kinds
from dagman_fast.model import DINO_DISTILL

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
ORGANS = {'liver': '5', 'spleen': '1', 'kidneys': '2,3', 'bladder': '21', 'femurs': '75,76', 'lungs': '10,11,12,13,14'}
SMALL = dict(sa_stage=2, mask_stage=2, out_dim=1024, head_hidden=512)  # 32^3 views: a 4^3 cell grid at stage 2

# name -> dagman_learner options on top of SMALL. Every study configuration is DINO's distillation settings
# (`DINO_DISTILL`: the library's defaults before this study) plus its changes, so that the names keep their meaning
# whatever the defaults are; 'default' is the library's defaults of the day (the study's winner since issue 25).
def _dino(**changes) -> dict:
    return {**DINO_DISTILL, **changes}


CONFIGS = {
    'default': {},
    'dagman-dino': _dino(),
    'short': _dino(cross_view=False, ema_momentum=0.99, teacher_temp_warmup=10, drop_path_rate=0.0),
    'bn': _dino(head_bn=True),
    'koleo': _dino(koleo_weight=0.1),
    'bn-koleo': _dino(head_bn=True, koleo_weight=0.1),
    'sk': _dino(centering='sinkhorn', sinkhorn_queue=256),
    'bn-koleo-sk': _dino(head_bn=True, koleo_weight=0.1, centering='sinkhorn', sinkhorn_queue=256),
    'bn-koleo-norm': _dino(head_bn=True, koleo_weight=0.1, input_norm='volume'),
    'bn-koleo-ibot': _dino(head_bn=True, koleo_weight=0.1, mask_prob=0.5, mask_ratio_jitter=0.2),
    'linear': _dino(head='linear'),
    'linear-bn-koleo': _dino(head='linear', head_bn=True, koleo_weight=0.1),
    'bn-koleo-dino-sched': _dino(head_bn=True, koleo_weight=0.1, scale_lr=True, wd=0.04, wd_final=0.4),
    'bn-koleo-rel': _dino(head_bn=True, koleo_weight=0.1, teacher_temp_warmup='30%', freeze_last_layer='1%'),
    # the schedules as shares of the run: DINO's 30 warm-up epochs of 300, the last layer frozen for its first 10%
    'rel': _dino(teacher_temp_warmup='10%', freeze_last_layer='10%'),
    'bn-koleo-sk-rel': _dino(head_bn=True, koleo_weight=0.1, centering='sinkhorn', sinkhorn_queue=256,
                            teacher_temp_warmup='10%', freeze_last_layer='10%'),
    'bn-koleo-rel-k256': _dino(head_bn=True, koleo_weight=0.1, teacher_temp_warmup='10%', freeze_last_layer='10%',
                              out_dim=256),
    'warm-rel': _dino(distill_warmup='30%', teacher_temp_warmup='10%', freeze_last_layer='10%'),
    'bn-koleo-warm-rel': _dino(head_bn=True, koleo_weight=0.1, distill_warmup='30%', teacher_temp_warmup='10%',
                              freeze_last_layer='10%'),
    # the same with DINO ViT-S's free prototype norms and a faster EMA (0.99: a time constant of 100 steps)
    'bn-koleo-rel-nll-ema99': _dino(head_bn=True, koleo_weight=0.1, teacher_temp_warmup='10%', freeze_last_layer='10%',
                                   norm_last_layer=False, ema_momentum=0.99),
    'bn-koleo-sk-rel-nll-ema99': _dino(head_bn=True, koleo_weight=0.1, centering='sinkhorn', sinkhorn_queue=256,
                                      teacher_temp_warmup='10%', freeze_last_layer='10%', norm_last_layer=False,
                                      ema_momentum=0.99),
    'linear-bn-koleo-rel-ema99': _dino(head='linear', head_bn=True, koleo_weight=0.1, teacher_temp_warmup='10%',
                                      freeze_last_layer='10%', ema_momentum=0.99),
    'bn-koleo-warm-rel-nll-ema99': _dino(head_bn=True, koleo_weight=0.1, distill_warmup='30%', teacher_temp_warmup='10%',
                                        freeze_last_layer='10%', norm_last_layer=False, ema_momentum=0.99),
    # a sharper teacher: Sinkhorn-Knopp or DINO's centring at a fixed teacher temperature of 0.02
    'c-t02-sv': _dino(head_bn=True, koleo_weight=0.1, teacher_temp=0.02, teacher_temp_final=0.02, freeze_last_layer='10%',
                     norm_last_layer=False, ema_momentum=0.99, cross_view=False),
    'c-t02-mp5': _dino(head_bn=True, koleo_weight=0.1, teacher_temp=0.02, teacher_temp_final=0.02,
                      freeze_last_layer='10%', norm_last_layer=False, ema_momentum=0.99, mask_prob=0.5),
    'sk-t02': _dino(head_bn=True, koleo_weight=0.1, centering='sinkhorn', sinkhorn_queue=256, teacher_temp=0.02,
                   teacher_temp_final=0.02, freeze_last_layer='10%', norm_last_layer=False, ema_momentum=0.99),
    'c-t02': _dino(head_bn=True, koleo_weight=0.1, teacher_temp=0.02, teacher_temp_final=0.02, freeze_last_layer='10%',
                  norm_last_layer=False, ema_momentum=0.99),
    'sk-t02-nobn': _dino(koleo_weight=0.1, centering='sinkhorn', sinkhorn_queue=256, teacher_temp=0.02,
                        teacher_temp_final=0.02, freeze_last_layer='10%', norm_last_layer=False, ema_momentum=0.99),
    'sk-t04-k64': _dino(head_bn=True, koleo_weight=0.1, centering='sinkhorn', sinkhorn_queue=256, out_dim=64,
                       teacher_temp_warmup='10%', freeze_last_layer='10%', norm_last_layer=False, ema_momentum=0.99),
    'bn-koleo-sk-rel-k256': _dino(head_bn=True, koleo_weight=0.1, centering='sinkhorn', sinkhorn_queue=256,
                                 teacher_temp_warmup='10%', freeze_last_layer='10%', out_dim=256),
    # the library's defaults plus one measure the issue names, for the organ linear probe (issue 25, the payoff)
    'default-linear': dict(head='linear'),  # the paper's "linear projection layers" after the SA blocks
    'default-ibot': dict(mask_prob=0.5, mask_ratio_jitter=0.2),  # iBOT: half the views whole, the share +- 0.2
    'default-norm': dict(input_norm='volume'),  # each view standardised
    'default-dino-sched': dict(scale_lr=True, wd=0.04, wd_final=0.4),  # DINO's lr rule and weight-decay cosine
}
METHOD_CONFIGS = {'smit': 'smit', 'nt-only': 'nt-only'}  # --methods: the baselines beside a config


class TimeLimit(Callback):
    "Stops the fit after `seconds` (a GPU check's time box); the schedule was planned for the full run."

    def __init__(self, seconds: float):
        self.seconds = seconds

    def before_fit(self):
        self.t0 = time.time()

    def after_batch(self):
        if self.training and time.time() - self.t0 > self.seconds:
            raise CancelFitException


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def cpu_model() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return 'unknown'


def ssl_dls(data: str, bs: int, seed: int, crop: int = 32, intensity: float = 0.1):
    if data == 'synthetic':  # no ../shared (a GPU machine): the package's synthetic CT volumes
        folder = Path('runs') / 'collapse_synthetic'
        scans = synthetic_ct(folder, n=16, size=max(96, 2 * crop), seed=0)
        return ct_ssl_dls([str(p) for p in scans], crop=crop, spacing=2.0, bs=bs, seed=seed, progress=False,
                          cache_dir=str(folder / 'cache'), intensity=intensity)
    if data == 'ct':  # each scan 16 times per epoch: random crops, `bs` per batch
        scans = [SHARED / 'lidc_idri' / 'LIDC-IDRI-0001.nii.gz', SHARED / 'lidc_idri' / 'LIDC-IDRI-0002_ds2.nii.gz']
        return ct_ssl_dls([str(p) for p in scans], crop=crop, spacing=2.0, bs=bs, seed=seed, progress=False,
                          cache_dir=str(Path('runs') / f'collapse_cache{crop}'), intensity=intensity, crops_per_scan=16)
    return medmnist3d_ssl_dls('adrenalmnist3d', SHARED / 'medmnist', size=28, crop=32, bs=bs, seed=seed,
                              intensity=intensity)


def pooled(encoder, x: torch.Tensor, standardise: bool) -> np.ndarray:
    "The library's `pooled_features` of `x (n, 1, d, h, w)`, each view standardised first when the run did so."
    if standardise:
        dims = tuple(range(1, x.ndim))
        x = (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True).clamp_min(1e-6)
    return pooled_features(encoder, x).numpy()


def probes(encoder, standardise: bool, seed: int) -> dict:
    "Organ k-NN / logistic accuracy on the TotalSegmentator CT and the AdrenalMNIST3D probe's test AUC."
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    ts = SHARED / 'totalsegmentator'
    imgs, labels, _ = organ_crops(ts / 'example_ct.nii.gz', ts / 'example_seg_fast_force_split.nii.gz', ORGANS, size=32,
                                  n_per_organ=16, seed=0)
    f = pooled(encoder, imgs, standardise)
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(5))
    lin = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    res = dict(organ_knn=float(cross_val_score(knn, f, labels.numpy(), cv=cv).mean()),
               organ_linear=float(cross_val_score(lin, f, labels.numpy(), cv=cv).mean()))
    with np.load(SHARED / 'medmnist' / 'adrenalmnist3d.npz') as d:
        split = {s: (torch.from_numpy(d[f'{s}_images'].astype(np.float32) / 255)[:, None], d[f'{s}_labels'].ravel())
                 for s in ('train', 'test')}
    pad = lambda x: torch.nn.functional.pad(x, (2, 2) * 3)  # 28^3 -> 32^3, as pretraining sees them
    xtr, xte = (pooled(encoder, pad(split[s][0]), standardise) for s in ('train', 'test'))
    lin.fit(xtr, split['train'][1])
    res['adrenal_auc'] = float(roc_auc_score(split['test'][1], lin.predict_proba(xte)[:, 1]))
    return res


def summarise(rows: list[dict], heads, out_dim: int) -> dict:
    "The monitors over the last 20% of the per-step rows, the first row's, and the cosine's slope over that tail."
    tail = rows[int(0.8 * len(rows)):] or rows
    mean = lambda k: float(np.mean([r[k] for r in tail if k in r])) if any(k in r for r in tail) else None
    out = dict(steps=rows[-1]['step'], log_k=math.log(out_dim), amip=mean('amip'), amip_first=rows[0].get('amip'))
    for h in heads:
        out[h] = dict(loss=mean(h), first=rows[0].get(h), below_log_k=math.log(out_dim) - mean(h),
                      entropy=mean(f'{h}_entropy'), mean_entropy=mean(f'{h}_mean_entropy'), gap=mean(f'{h}_gap'),
                      s_cos=mean(f'{h}_s_cos'), t_cos=mean(f'{h}_t_cos'), s_std_rel=mean(f'{h}_s_std_rel'),
                      t_std_rel=mean(f'{h}_t_std_rel'), s_cos_first=rows[0].get(f'{h}_s_cos'))
        ys = [r[f'{h}_s_cos'] for r in tail if f'{h}_s_cos' in r]
        out[h]['s_cos_slope_per_100'] = float(np.polyfit(np.arange(len(ys)), ys, 1)[0] * 100 / max(
            rows[1]['step'] - rows[0]['step'], 1)) if len(ys) > 2 else None
    last = {f'{h}_{k}': out[h][k] for h in heads for k in ('entropy', 'mean_entropy')}
    last.update({f'{h}_{w}_cos': out[h][f'{w}_cos'] for h in heads for w in 'st'})
    out['collapse'] = collapse_kinds(last, heads, out_dim)
    return out


def run(data: str, config: str, seed: int, args) -> dict:
    out = Path(args.out) / data / config / f'seed{seed}'
    if (out / 'summary.json').exists():
        print(f'{out}: done before')
        return json.loads((out / 'summary.json').read_text())
    set_seed(seed)
    dls = ssl_dls(data, args.bs, seed, args.crop, args.intensity)
    epochs = max(1, round(args.steps / len(dls.train)))
    method = METHOD_CONFIGS.get(config, 'dagman')
    small = SMALL if args.crop <= 32 else {}  # larger views: SA and mask after stage 3, the method's heads
    opts = {**small, **(CONFIGS.get(config, {}) if method == 'dagman' else CONFIGS.get(args.method_base, {}))}
    if method == 'smit':
        opts.pop('sa_stage', None)  # smit has no SA module; its mask grid stays at stage 2 for 32^3 views
    learn = dagman_learner(dls, method=method, encoder=args.encoder, path=out, checkpoint=None, lr=args.lr, **opts)
    set_seed(seed)
    random_enc = dagman_learner(dls, method=method, encoder=args.encoder, path=out, checkpoint=None,
                                **opts).model.student.encoder  # the same seed's initial weights
    t0 = time.time()
    cbs = [TimeLimit(args.max_minutes * 60)] if args.max_minutes else []
    with learn.no_bar(), learn.no_logging():
        learn.fit_warmup_cosine(epochs, args.lr, cbs=cbs)
    secs = time.time() - t0
    m = learn.model
    learn.export_encoder(out / 'encoder.pth')  # to probe again without pretraining again
    summary = dict(data=data, config=config, method=method, seed=seed, options={k: str(v) for k, v in opts.items()},
                   encoder=args.encoder, crop=args.crop, intensity=args.intensity, device=str(dls.device), gpu=gpu_name(),
                   epochs=epochs, steps_per_epoch=len(dls.train), seconds=round(secs, 1), cpu=cpu_model(),
                   threads=torch.get_num_threads(),
                   monitors=summarise(learn.pretrain_steps, list(m.distill), m.config.out_dim))
    if not args.no_probe and SHARED.exists():
        std = m.config.input_norm == 'volume'
        summary['probe'] = probes(m.student.encoder.cpu(), std, seed)
        summary['probe_random'] = probes(random_enc.cpu(), std, seed)
    (out / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    print(json.dumps(summary))
    return summary


def _summary_of(folder: Path) -> dict | None:
    "A run's `summary.json`, or for a run stopped early (or still going) the monitors of its per-step log so far."
    if (folder / 'summary.json').exists():
        return json.loads((folder / 'summary.json').read_text())
    with open(folder / 'pretrain_log_steps.csv', newline='') as f:
        rows = [{k: float(v) for k, v in r.items() if v not in ('', None)} for r in csv.DictReader(f)]
    if len(rows) < 2:
        return None
    heads = [h for h in ('aitd', 'ampd', 'gitd') if h in rows[0]]
    data, config, seed = folder.parts[-3], folder.parts[-2], folder.parts[-1]
    out_dim = {**SMALL, **CONFIGS.get(config, {})}['out_dim']
    return dict(data=data, config=config + ' (stopped)', seed=int(seed[4:]), seconds=float('nan'),
                monitors=summarise(rows, heads, out_dim))


def table(root: Path) -> str:
    "A Markdown row per finished run under `root`."
    lines = ['| data | config | seed | steps | s/step | AITD / AMPD / GITD below log K | gaps (nats) | student cos '
             '(first -> last 20%, slope /100 steps) | teacher cos | AMIP | collapse | organ k-NN / linear | '
             'random | AdrenalMNIST3D AUC (random) |', '|' + '---|' * 14]
    for p in sorted(root.glob('*/*/seed*/pretrain_log_steps.csv')):
        s = _summary_of(p.parent)
        if s is None:
            continue
        mon = s['monitors']
        hs = [h for h in ('aitd', 'ampd', 'gitd') if h in mon]
        f = lambda v, d=2: '-' if v is None else f'{v:.{d}f}'
        pr, rr = s.get('probe', {}), s.get('probe_random', {})
        lines.append('| ' + ' | '.join([
            s['data'], s['config'], str(s['seed']), str(mon['steps']), f(s['seconds'] / mon['steps']),
            ' / '.join(f(mon[h]['below_log_k']) for h in hs), ' / '.join(f(mon[h]['gap']) for h in hs),
            ' / '.join(f"{f(mon[h]['s_cos_first'])}->{f(mon[h]['s_cos'])} ({f(mon[h]['s_cos_slope_per_100'], 3)})"
                       for h in hs),
            ' / '.join(f(mon[h]['t_cos']) for h in hs), f"{f(mon['amip_first'], 3)}->{f(mon['amip'], 3)}",
            '; '.join(f"{h}: {', '.join(k)}" for h, k in mon['collapse'].items()) or 'none',
            f"{f(pr.get('organ_knn'))} / {f(pr.get('organ_linear'))}",
            f"{f(rr.get('organ_knn'))} / {f(rr.get('organ_linear'))}",
            f"{f(pr.get('adrenal_auc'), 3)} ({f(rr.get('adrenal_auc'), 3)})"]) + ' |')
    return '\n'.join(lines)


def payoff(root: Path) -> str:
    """A Markdown row per (data, config) of the finished runs under `root`: each probe's mean over seeds of the
    pretrained encoder and of the random one, the mean of their per-seed differences, and the seed spread (the
    range, max - min, of the pretrained scores): the payoff is shown where the difference exceeds the spread."""
    runs: dict = {}
    for p in sorted(root.glob('*/*/seed*/summary.json')):
        s = json.loads(p.read_text())
        if 'probe' in s:
            runs.setdefault((s['data'], s['config']), []).append(s)
    lines = ['| data | config | seeds | probe | pretrained (mean) | random (mean) | difference (mean) | seed spread | '
             'shown |', '|' + '---|' * 9]
    for (data, config), ss in runs.items():
        for k in ('organ_knn', 'organ_linear', 'adrenal_auc'):
            pre = np.array([s['probe'][k] for s in ss])
            ran = np.array([s['probe_random'][k] for s in ss])
            diff, spread = float((pre - ran).mean()), float(pre.max() - pre.min())
            lines.append(f"| {data} | {config} | {','.join(str(s['seed']) for s in ss)} | {k} | {pre.mean():.3f} | "
                         f"{ran.mean():.3f} | {diff:+.3f} | {spread:.3f} | "
                         f"{'yes' if diff > spread and len(ss) > 1 else 'no'} |")
    return '\n'.join(lines)


def stages(root: Path) -> str:
    """The organ probe (k-NN / linear accuracy) on the mean tokens of each stage of every saved `encoder.pth` under
    `root`, and of a random encoder of the same class built after `set_seed(seed)`: which features carry what."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dagman_fast.all import load_encoder
    from dagman_fast.swin import pad_to_encoder
    ts = SHARED / 'totalsegmentator'
    imgs, labels, _ = organ_crops(ts / 'example_ct.nii.gz', ts / 'example_seg_fast_force_split.nii.gz', ORGANS, size=32,
                                  n_per_organ=16, seed=0)

    def row(name, enc, seed):
        enc.eval()
        with torch.no_grad():
            maps = enc.forward_features(pad_to_encoder(imgs.float(), enc))
        cv = StratifiedKFold(5, shuffle=True, random_state=seed)
        cells = []
        for m in maps:
            f = m.mean((2, 3, 4)).numpy()
            knn = make_pipeline(StandardScaler(), KNeighborsClassifier(5))
            lin = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
            cells.append(f'{cross_val_score(knn, f, labels.numpy(), cv=cv).mean():.2f} / '
                         f'{cross_val_score(lin, f, labels.numpy(), cv=cv).mean():.2f}')
        return f"| {name} | {' | '.join(cells)} |"

    lines = []
    for path in sorted(root.glob('*/*/seed*/encoder.pth')):
        seed = int(path.parent.name[4:])
        enc = load_encoder(path)
        set_seed(seed)
        lines += [row(f'{path.parent.parent.name}, seed {seed}', enc, seed),
                  row(f'random, seed {seed}', type(enc)(enc.config), seed)]
    return '\n'.join(['| encoder | ' + ' | '.join(f'stage {i}' for i in range(5)) + ' |', '|' + '---|' * 6, *lines])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', choices=('ct', 'adrenal', 'synthetic'), default='ct')
    p.add_argument('--encoder', default='swin-tiny')
    p.add_argument('--crop', type=int, default=32)
    p.add_argument('--max-minutes', type=float, default=None, help='stop each run after this long (a GPU time box)')
    p.add_argument('--configs', nargs='+', default=['default', 'dagman-dino'],
                   help=f'configurations: {sorted(CONFIGS)} or the baselines {sorted(METHOD_CONFIGS)}')
    p.add_argument('--method-base', default='default', help='the configuration the baselines run with')
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--steps', type=int, default=1500)
    p.add_argument('--bs', type=int, default=8)
    p.add_argument('--intensity', type=float, default=0.1,
                   help="the views' intensity scale and shift jitter (ct_ssl_dls's `intensity`; 0: none, the paper's)")
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--threads', type=int, default=None, help='torch threads (1 to run two studies side by side)')
    p.add_argument('--no-probe', action='store_true')
    p.add_argument('--out', default='runs/collapse')
    p.add_argument('--table', default=None, help='print the table of the runs under this folder and stop')
    p.add_argument('--stages', default=None, help="print the organ probe on each stage's features of the saved encoders")
    p.add_argument('--payoff', default=None, help='print the payoff over seeds of the runs under this folder and stop')
    args = p.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return
    if args.payoff:
        print(payoff(Path(args.payoff)))
        return
    if args.stages:
        print(stages(Path(args.stages)))
        return
    if args.steps < 20:
        p.error(f'--steps must be at least 20: the monitors are means over every 10 steps; got {args.steps}')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data != 'synthetic' and not SHARED.exists():
        raise SystemExit(f'--data {args.data} reads the real CT and MedMNIST files of {SHARED}; --data synthetic runs '
                         'without them')
    print(f'CPU: {cpu_model()}, {torch.get_num_threads()} threads')
    for config in args.configs:
        for seed in args.seeds:
            run(args.data, config, seed, args)


if __name__ == '__main__':
    main()
